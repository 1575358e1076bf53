"""Checkpoints with torch.distributed.checkpoint (DCP), and the export of final weights.

CHECKPOINT_DIR/step-00000042/ holds one DCP checkpoint: model, optimizer, the position in the
schedule (phase, step), the data position and the RNG state. Each rank writes its own shards; DCP
writes `.metadata` last, so a directory without it is an interrupted save and is never resumed from.
Exact resumption (tested) is on the same world layout. DCP reshards on load, so another number of
ranks should load too (not tested); the data position, a global stream index, then continues under
the new split.

`export_safetensors` writes the text model in Hugging Face's LLaMA layout (model.safetensors +
config.json, loadable by `transformers.LlamaForCausalLM`), and LWM's vision embedding and head beside
it in vision.safetensors. Continuing a checkpoint (`init_from`), the export also carries that
checkpoint's tokenizer and generation config: the directory loads as a whole model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lwm_data.train.model import ModelConfig

STEP_DIR = re.compile(r"^step-(\d+)$")
# What a Hugging Face model directory holds besides its weights and config.json.
COMPANION_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json",
)  # fmt: skip


def step_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step-{step:08d}")


def latest(directory: str) -> str | None:
    """The newest complete checkpoint in `directory`, or None."""
    if not os.path.isdir(directory):
        return None
    steps = [
        int(m.group(1))
        for name in os.listdir(directory)
        if (m := STEP_DIR.match(name)) and os.path.exists(os.path.join(directory, name, ".metadata"))
    ]
    return step_path(directory, max(steps)) if steps else None


def read_progress(path: str) -> dict[str, int]:
    """(phase, step) a checkpoint was taken at, from the small JSON written beside it (checkpoints
    written before phases were named so call the phase `stage`)."""
    progress = _saved_progress(path)
    return {"phase": progress.get("phase", progress.get("stage", 0)), "step": progress["step"]}


def _saved_progress(path: str) -> dict[str, int]:
    with open(os.path.join(path, "progress.json")) as f:
        return json.load(f)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, int], data: dict[str, Any]) -> dict:
    """What a checkpoint holds; DCP fills it in place on load."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {
        "model": model_state,
        "optimizer": optim_state,
        "progress": progress,
        "data": data,
        "rng": torch.get_rng_state(),
    }


def save(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, int], data: dict[str, Any]
) -> None:
    dcp.save(_state(model, optimizer, progress, data), checkpoint_id=path)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        with open(os.path.join(path, "progress.json"), "w") as f:
            json.dump(progress, f)


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, data: dict[str, Any]) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place; return the saved progress and data position."""
    state = _state(model, optimizer, _saved_progress(path), data)  # progress under the keys it was saved with
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    torch.set_rng_state(state["rng"])
    return {"progress": read_progress(path), "data": state["data"]}


# -------------------------------------------------------------------------------------------------
# Hugging Face export

HF_NAMES = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attention\.w([qkvo])\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"head\.weight", "lm_head.weight"),
]
VISION_NAMES = ("vision_embed.weight", "vision_head.weight")


def hf_name(name: str) -> str:
    for pattern, replacement in HF_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise KeyError(f"no Hugging Face name for {name}")


def hf_config(config: ModelConfig, rope_theta: float, max_positions: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": config.dim,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": max_positions,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "lwm_vision_vocab_size": config.vision_vocab_size,
    }


def export_safetensors(
    directory: str,
    model: nn.Module,
    config: ModelConfig,
    rope_theta: float,
    max_positions: int,
    companions_from: str | None = None,
) -> None:
    """Full weights gathered to rank 0 and written there (every rank must call this), with the
    tokenizer and generation config of `companions_from` (the checkpoint the run started from)."""
    from safetensors.torch import save_file

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    state = {name: tensor.detach().float().contiguous() for name, tensor in state.items()}
    tied = config.tie_embeddings  # the head is the embedding: written once, as Hugging Face does
    text = {
        hf_name(name): t
        for name, t in state.items()
        if name not in VISION_NAMES and not (tied and name == "head.weight")
    }
    save_file(text, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    vision = {name: t for name, t in state.items() if name in VISION_NAMES}
    if vision:
        save_file(vision, os.path.join(directory, "vision.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(config, rope_theta, max_positions), f, indent=2)
    if companions_from:
        for name in COMPANION_FILES:
            source = os.path.join(companions_from, name)
            if os.path.exists(source):
                shutil.copyfile(source, os.path.join(directory, name))
