"""Starting from a released checkpoint: a Hugging Face LLaMA directory (`init_from`).

    config.json + model.safetensors            (or model-0000K-of-0000N.safetensors + their index)
    [vision.safetensors]                       LWM's vision embedding and head, as `export` writes them

The model's shape comes from config.json (`model_config`): hidden size, layers, heads and KV heads
(GQA), MLP size, vocabulary, `rms_norm_eps`, `rope_theta` (or transformers' `rope_parameters`), tied
or untied embeddings. What the model does not implement is refused with what to change, never
ignored: a `rope_scaling` other than the default, biases, another activation, another head size.
Hugging Face's LLaMA layout rotates RoPE halves as ours does, so no weight is permuted.

Loading (`load`) never holds the whole model on one rank: the model is built on the meta device,
sharded by the parallel layer (FSDP2), given empty storage, and each rank then reads only its own
slices of every tensor from the safetensors files, through torch.distributed.checkpoint's Hugging
Face reader. Weights the checkpoint lacks are LWM's Stage II: a text-only checkpoint trained with
`vision = true` gets a new vision embedding (8448 x dim) and vision head, initialised as LWM's
`vision_llama.py` initialises them, normal(0, 0.02) (its `initializer_range`); everything else
comes from the checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from lwm_data.errors import ConfigError
from lwm_data.lwm_format.layout import VISION_VOCAB_SIZE
from lwm_data.train.checkpoint import VISION_NAMES, hf_name
from lwm_data.train.model import ModelConfig

VISION_FILE = "vision.safetensors"
LWM_INITIALIZER_RANGE = 0.02  # vision_llama.py: normal(stddev=initializer_range) for the new vision weights


def read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"init_from {directory}: no config.json (expected a Hugging Face LLaMA checkpoint directory)")
    with open(path) as f:
        return json.load(f)


def model_config(directory: str, vision: bool, attention_backend: str = "auto") -> ModelConfig:
    """The ModelConfig a Hugging Face LLaMA checkpoint describes; refuses what the model lacks."""
    hf = read_config(directory)
    where = f"init_from {directory}"
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"{where}: model_type {hf.get('model_type')!r}; the trainer's model is LLaMA")
    scaling = hf.get("rope_scaling") or {}
    rope = hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    if kind != "default":
        raise ConfigError(
            f"{where}: rope_scaling {scaling or rope} is not implemented (the model applies plain RoPE); "
            "train from a checkpoint without it, or remove it from config.json if you mean to drop it"
        )
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{where}: the model is LLaMA with SiLU and no biases; the checkpoint is not")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", dim // heads) != dim // heads:
        raise ConfigError(f"{where}: head_dim {hf['head_dim']} is not hidden_size / heads = {dim // heads}")
    return ModelConfig(
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads", heads),
        mlp_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        vision_vocab_size=VISION_VOCAB_SIZE if vision else 0,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10_000.0)),
        attention_backend=attention_backend,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def has_vision_weights(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, VISION_FILE))


def load(model: nn.Module, directory: str, seed: int) -> list[str]:
    """Fill `model` (sharded or not, with storage) from the checkpoint, each rank reading its own
    slices; new vision weights when the checkpoint has none. Returns the names initialised fresh."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = model.state_dict()
    tied = getattr(model, "config", None) is not None and model.config.tie_embeddings
    fresh = [name for name in VISION_NAMES if name in state and not has_vision_weights(directory)]
    wanted = {
        name if name in VISION_NAMES else hf_name(name): tensor
        for name, tensor in state.items()
        if name not in fresh and not (tied and name == "head.weight")  # a tied head is the embedding
    }
    try:
        dcp.load(wanted, storage_reader=HuggingFaceStorageReader(directory))
    except (RuntimeError, KeyError, ValueError) as error:
        raise ConfigError(
            f"init_from {directory}: the checkpoint does not fit the model it describes: {error}"
        ) from None
    for name in fresh:
        _normal_init(state[name], seed, name)
    return fresh


def _normal_init(parameter: torch.Tensor, seed: int, name: str) -> None:
    """normal(0, LWM's initializer range), the same full tensor on every rank, each keeping its shard."""
    generator = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    full = torch.randn(parameter.shape, generator=generator) * LWM_INITIALIZER_RANGE
    with torch.no_grad():
        if hasattr(parameter, "device_mesh"):  # a DTensor: every rank made the same tensor, no communication
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full, parameter.device_mesh, parameter.placements, src_data_rank=None)
        parameter.copy_(full.to(parameter.device, parameter.dtype))
