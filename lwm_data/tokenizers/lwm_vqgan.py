"""LWM's VQ-GAN checkpoint (JAX) -> a diffusers `VQModel` directory: `lwm-data convert-vqgan`.

LWM's `lwm/vqgan.py` loads its VQ-GAN with `pickle.load`: a flax params tree (dicts, or flax
`FrozenDict`s, of numpy or jax arrays) with `encoder`, `decoder`, `quantize`, `quant_conv` and
`post_quant_conv`, the submodules named as flax names them when they are created (`Conv_0`,
`DownsamplingBlock_2`, `ResnetBlock_1`, `GroupNorm_0`, ...). The architecture is aMUSEd's VQ-GAN,
module for module; in diffusers' names:

    encoder.Conv_0, GroupNorm_0, Conv_1               encoder.conv_in, conv_norm_out, conv_out
    encoder.DownsamplingBlock_i.ResnetBlock_j         encoder.down_blocks.i.resnets.j
    encoder.DownsamplingBlock_i.Downsample_0.Conv_0   encoder.down_blocks.i.downsamplers.0.conv
    {encoder, decoder}.MidBlock_0.ResnetBlock_j       {encoder, decoder}.mid_block.resnets.j
    decoder.UpsamplingBlock_k.ResnetBlock_j           decoder.up_blocks.k.resnets.j
    decoder.UpsamplingBlock_k.Upsample_0.Conv_0       decoder.up_blocks.k.upsamplers.0.conv
    decoder.Conv_0, GroupNorm_0, Conv_1               decoder.conv_in, conv_norm_out, conv_out
    ResnetBlock: GroupNorm_0, Conv_0, GroupNorm_1, Conv_1, Conv_2 (1x1 shortcut)
                                                      norm1, conv1, norm2, conv2, conv_shortcut
    quantize.embeddings, quant_conv, post_quant_conv  quantize.embedding, quant_conv, post_quant_conv

LWM's decoder creates its upsampling blocks deepest first, so flax's `UpsamplingBlock_0` is the
deepest, as diffusers' `up_blocks.0` is. LWM's downsampling pads the right and bottom by one before a
stride-2 valid convolution: diffusers' `Downsample2D(padding=0)` does the same. Flax convolution
kernels (kh, kw, in, out) become (out, in, kh, kw); a GroupNorm's `scale` becomes its `weight`
(LWM's GroupNorm: flax's default 32 groups, epsilon 1e-6, as diffusers').

The shape (hidden channels, channel multipliers, res blocks, latent and codebook sizes) is read from
the tree, so reduced checkpoints in LWM's layout convert too. Anything else is refused, saying what
was expected and what was found: attention blocks (LWM's default configuration has none), a tensor
missing, left over or of another shape.

Reading the pickle needs neither jax nor flax: `FrozenDict`s are read as dicts and jax arrays as the
numpy arrays they were saved from. A pickle holding other jax or flax objects says which package
would read it.

The converted directory is a `save_pretrained` VQModel (config.json + safetensors, encoder and
decoder) plus `lwm_data_vqgan.json`, which says it came from LWM and expects pixels in [-1, 1]:
`VQGAN.from_pretrained` reads that range from it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
import tempfile
from typing import Any

import numpy as np

from lwm_data import files
from lwm_data.errors import ConfigError
from lwm_data.tokenizers.vision import LWM_PIXEL_RANGE, PROVENANCE_FILE, amused_vqgan_config

GROUP_NORM_GROUPS = 32  # flax.linen.GroupNorm's default, which LWM's VQ-GAN uses throughout
PARTS = ("encoder", "decoder")
TOP_LEVEL = ("decoder", "encoder", "post_quant_conv", "quant_conv", "quantize")
# What jax arrays pickle as (jax >= 0.4: jax.Array; before it: DeviceArray): a rebuild from the
# numpy array's own pickle state, which `_numpy_array` reads without jax.
_JAX_ARRAY_REBUILDS = {("jax._src.array", "_reconstruct_array"), ("jax._src.device_array", "reconstruct_device_array")}

Tree = dict[str, Any]


# ---- reading the pickle ----


def _frozen_dict(*args: Any, **kwargs: Any) -> dict:
    """flax's FrozenDict, read as the dict it holds."""
    return dict(*args, **kwargs)


def _numpy_array(fun: Any, args: tuple, array_state: tuple, aval_state: Any = None) -> np.ndarray:
    """A pickled jax array, rebuilt as the numpy array jax rebuilds it from."""
    array = fun(*args)
    array.__setstate__(array_state)
    return array


class _ParamsUnpickler(pickle.Unpickler):
    """Reads numpy arrays and containers; FrozenDicts and jax arrays without flax or jax."""

    def find_class(self, module: str, name: str) -> Any:
        top = module.split(".")[0]
        if (module, name) == ("flax.core.frozen_dict", "FrozenDict"):
            return _frozen_dict
        if (module, name) in _JAX_ARRAY_REBUILDS:
            return _numpy_array
        if top in ("numpy", "collections", "builtins", "copyreg", "_codecs"):
            return super().find_class(module, name)
        if top in ("jax", "jaxlib", "flax", "ml_dtypes"):
            if importlib.util.find_spec(top) is None:
                raise ConfigError(
                    f"the checkpoint pickles {module}.{name}, which only {top} reads: pip install jax flax"
                )
            return super().find_class(module, name)
        raise ConfigError(f"not a VQ-GAN params pickle: it holds {module}.{name}")


def read_params(path: str) -> Tree:
    """The params tree of an LWM VQ-GAN checkpoint (any Beam filesystem), leaves as float32 numpy."""
    try:
        data = files.read_bytes(path)
    except OSError as error:  # Beam's BeamIOError included
        raise ConfigError(f"cannot read the checkpoint {path}: {error}") from None
    try:
        tree = _ParamsUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as error:
        raise ConfigError(f"{path} is not a pickled params tree ({type(error).__name__}: {error})") from None
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    if not isinstance(tree, dict) or not set(TOP_LEVEL) <= set(tree):
        found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ConfigError(f"{path} is not LWM's VQ-GAN: expected top-level {list(TOP_LEVEL)}, found {found}")
    return _as_numpy(tree)


def _as_numpy(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(key): _as_numpy(value) for key, value in node.items()}
    return np.asarray(node, dtype=np.float32)


# ---- the shape, from the tree ----


def _numbered(node: Tree, kind: str) -> list[Tree]:
    """`kind_0`, `kind_1`, ... of a node, in order."""
    indices = sorted(int(m.group(1)) for key in node if (m := re.fullmatch(rf"{kind}_(\d+)", key)))
    if indices != list(range(len(indices))):
        raise ConfigError(f"expected {kind}_0..{kind}_{len(indices) - 1}, found {sorted(node)}")
    return [node[f"{kind}_{i}"] for i in indices]


def _out_channels(conv: Tree) -> int:
    return int(conv["kernel"].shape[-1])


def vqmodel_config(tree: Tree) -> dict[str, Any]:
    """diffusers `VQModel` keyword arguments for the network the tree describes."""
    attention = [path for path in _paths(tree) if "AttnBlock_" in path]
    if attention:
        raise ConfigError(f"the checkpoint has attention blocks ({attention[0]}, ...); LWM's VQ-GAN has none")
    encoder, decoder = tree["encoder"], tree["decoder"]
    levels = _numbered(encoder, "DownsamplingBlock")
    if not levels:
        raise ConfigError(f"the encoder has no DownsamplingBlock_0, ...: found {sorted(encoder)}")
    if len(_numbered(decoder, "UpsamplingBlock")) != len(levels):
        raise ConfigError("the encoder and the decoder have different numbers of levels")
    channels = tuple(_out_channels(level["ResnetBlock_0"]["Conv_1"]) for level in levels)
    odd = [c for c in channels if c % GROUP_NORM_GROUPS]
    if odd:
        raise ConfigError(f"channels {odd} are not multiples of LWM's {GROUP_NORM_GROUPS} GroupNorm groups")
    codebook_size, code_dim = tree["quantize"]["embeddings"].shape
    latent_channels = _out_channels(encoder["Conv_1"])
    levels_count = len(levels)
    return {
        **amused_vqgan_config(),
        "in_channels": int(encoder["Conv_0"]["kernel"].shape[2]),
        "out_channels": _out_channels(decoder["Conv_1"]),
        "down_block_types": ("DownEncoderBlock2D",) * levels_count,
        "up_block_types": ("UpDecoderBlock2D",) * levels_count,
        "block_out_channels": channels,
        "layers_per_block": len(_numbered(levels[0], "ResnetBlock")),
        "latent_channels": latent_channels,
        "num_vq_embeddings": int(codebook_size),
        "vq_embed_dim": None if code_dim == latent_channels else int(code_dim),
        "norm_num_groups": GROUP_NORM_GROUPS,
    }


# ---- the weights, renamed ----


def _module_pairs(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(diffusers module, LWM module path) for every module with weights."""
    levels, blocks = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [
        ("encoder.conv_in", "encoder/Conv_0"),
        ("encoder.conv_norm_out", "encoder/GroupNorm_0"),
        ("encoder.conv_out", "encoder/Conv_1"),
        ("quant_conv", "quant_conv"),
        ("post_quant_conv", "post_quant_conv"),
        ("decoder.conv_in", "decoder/Conv_0"),
        ("decoder.conv_norm_out", "decoder/GroupNorm_0"),
        ("decoder.conv_out", "decoder/Conv_1"),
    ]
    resnets = [
        (f"{part}.mid_block.resnets.{j}", f"{part}/MidBlock_0/ResnetBlock_{j}") for part in PARTS for j in (0, 1)
    ]
    for i in range(levels):
        down, up = f"encoder/DownsamplingBlock_{i}", f"decoder/UpsamplingBlock_{i}"
        resnets += [(f"encoder.down_blocks.{i}.resnets.{j}", f"{down}/ResnetBlock_{j}") for j in range(blocks)]
        resnets += [(f"decoder.up_blocks.{i}.resnets.{j}", f"{up}/ResnetBlock_{j}") for j in range(blocks + 1)]
        if i < levels - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"{down}/Downsample_0/Conv_0"))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"{up}/Upsample_0/Conv_0"))
    for diffusers_name, lwm_path in resnets:
        pairs += [
            (f"{diffusers_name}.norm1", f"{lwm_path}/GroupNorm_0"),
            (f"{diffusers_name}.conv1", f"{lwm_path}/Conv_0"),
            (f"{diffusers_name}.norm2", f"{lwm_path}/GroupNorm_1"),
            (f"{diffusers_name}.conv2", f"{lwm_path}/Conv_1"),
            (f"{diffusers_name}.conv_shortcut", f"{lwm_path}/Conv_2"),  # only where channels change
        ]
    return pairs


def _paths(tree: Tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Every leaf by its /-joined path."""
    leaves = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        leaves.update(_paths(value, path) if isinstance(value, dict) else {path: value})
    return leaves


def state_dict(tree: Tree, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tree's tensors under diffusers' names and layouts (every leaf used once, or ConfigError).
    A module missing from the tree is left out here and named by `build_vqmodel`."""
    leaves = _paths(tree)

    def take(path: str) -> np.ndarray:
        if path not in leaves:
            raise ConfigError(f"the checkpoint lacks {path}")
        return leaves.pop(path)

    state = {"quantize.embedding.weight": take("quantize/embeddings")}
    for diffusers_name, lwm_path in _module_pairs(config):
        if f"{lwm_path}/kernel" in leaves:  # a convolution
            state[f"{diffusers_name}.weight"] = take(f"{lwm_path}/kernel").transpose(3, 2, 0, 1)
            state[f"{diffusers_name}.bias"] = take(f"{lwm_path}/bias")
        elif f"{lwm_path}/scale" in leaves:  # a GroupNorm
            state[f"{diffusers_name}.weight"] = take(f"{lwm_path}/scale")
            state[f"{diffusers_name}.bias"] = take(f"{lwm_path}/bias")
    if leaves:
        raise ConfigError(f"tensors of no known module in the checkpoint: {sorted(leaves)[:8]}")
    return state


def build_vqmodel(tree: Tree):
    """A diffusers VQModel holding the tree's weights; refuses what does not fit it exactly."""
    import torch
    from diffusers import VQModel

    config = vqmodel_config(tree)
    model = VQModel(**config)
    expected = model.state_dict()
    converted = state_dict(tree, config)
    missing, extra = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"the checkpoint does not fit the VQ-GAN it describes: missing {missing[:6]}, extra {extra[:6]}"
        )
    wrong = [
        f"{key}: {tuple(converted[key].shape)} for {tuple(value.shape)}"
        for key, value in expected.items()
        if converted[key].shape != value.shape
    ]
    if wrong:
        raise ConfigError(f"tensors of the wrong shape: {wrong[:6]}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in converted.items()}, strict=True)
    return model.eval()


def convert(checkpoint: str, output: str) -> dict[str, Any]:
    """Convert LWM's VQ-GAN checkpoint at `checkpoint` into a VQModel directory at `output` (any Beam
    filesystem); returns what `lwm_data_vqgan.json` records."""
    from lwm_data import __version__

    model = build_vqmodel(read_params(checkpoint))
    provenance = {
        "source": "LWM VQ-GAN (JAX params pickle, lwm/vqgan.py)",
        "checkpoint": checkpoint,
        "checkpoint_sha256": hashlib.sha256(files.read_bytes(checkpoint)).hexdigest(),
        "pixel_range": LWM_PIXEL_RANGE,
        "converted_by": f"lwm-data {__version__}",
        "tensors": len(model.state_dict()),
    }
    with tempfile.TemporaryDirectory(prefix="lwm-vqgan-") as local:
        model.save_pretrained(local)
        with open(os.path.join(local, PROVENANCE_FILE), "w") as f:
            json.dump(provenance, f, indent=2)
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as source, files.create(files.join(output, name)) as target:
                while block := source.read(1 << 24):
                    target.write(block)
    return provenance
