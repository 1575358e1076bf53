"""`lwm-data convert-vqgan`: LWM's VQ-GAN checkpoint (a pickled flax params tree) -> a diffusers
VQModel that gives LWM's codes.

The reference is LWM's own code: tests/data/lwm_vqgan_reduced.json holds what LWM's `lwm/vqgan.py`,
run under jax, made of deterministic weights and frames (see tests/data/README.md)."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lwm_data.cli.main import app
from lwm_data.errors import ConfigError
from lwm_data.tokenizers.lwm_vqgan import build_vqmodel, convert, read_params
from lwm_data.tokenizers.vision import VQGAN, VQGANSettings, amused_vqgan_config, describe
from tests.lwm_vqgan_weights import frames, lwm_tree_values

DATA = Path(__file__).parent / "data"
LWM = json.loads((DATA / "lwm_vqgan_reduced.json").read_text())


def nested(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *heads, last = path.split("/")
        node = tree
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = value
    return tree


def lwm_checkpoint(path: Path, flat: dict[str, np.ndarray]) -> str:
    """A checkpoint as LWM loads it: pickle.dump of the params tree."""
    with open(path, "wb") as f:
        pickle.dump(nested(flat), f)
    return str(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lwm-vqgan")
    checkpoint = lwm_checkpoint(root / "vqgan", lwm_tree_values(LWM["layout"]))
    convert(checkpoint, str(root / "converted"))
    return root / "converted"


def test_the_converted_model_gives_the_codes_lwms_own_vqgan_gives(converted):
    vqgan = VQGAN.from_pretrained(str(converted))  # [-1, 1], from the directory's own record
    codes = vqgan.encode(frames())
    expected = np.asarray(LWM["codes"])
    assert len(np.unique(expected)) > 200  # the reference is not a degenerate all-one-code case
    assert (codes == expected).mean() >= 0.995, f"{(codes == expected).mean():.4f} of LWM's codes"
    print(f"converted model: {(codes == expected).mean():.2%} of LWM's own codes")
    decoded = vqgan.model.decode(
        torch.from_numpy(expected[:1].reshape(-1)), force_not_quantize=True, shape=(1, 16, 16, 64)
    ).sample.detach()
    means = decoded[0].permute(1, 2, 0).numpy().clip(-1, 1).reshape(32, 8, 32, 8, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(means, np.asarray(LWM["decoded_first_frame_8x8_means"]), atol=2e-3)


def test_the_converted_directory_says_where_it_came_from(converted):
    provenance = json.loads((converted / "lwm_data_vqgan.json").read_text())
    assert provenance["pixel_range"] == "-1,1" and "LWM" in provenance["source"] and provenance["tensors"] == 189
    entry = describe(VQGANSettings(vqgan=str(converted)))
    assert entry["pixel_range"] == "-1,1" and entry["converted_from"]["checkpoint_sha256"]
    with pytest.raises(ConfigError, match="expects pixels in \\[-1,1\\]"):
        describe(VQGANSettings(vqgan=str(converted), pixel_range="0,1"))


# Diffusers' names -> LWM's, written as rules (the converter builds its table another way).
TO_LWM = [
    (r"^(encoder|decoder)\.conv_in\.", r"\1/Conv_0/"),
    (r"^(encoder|decoder)\.conv_out\.", r"\1/Conv_1/"),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1/GroupNorm_0/"),
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", r"\1/MidBlock_0/ResnetBlock_\2/"),
    (r"^encoder\.down_blocks\.(\d)\.resnets\.(\d)\.", r"encoder/DownsamplingBlock_\1/ResnetBlock_\2/"),
    (r"^encoder\.down_blocks\.(\d)\.downsamplers\.0\.conv\.", r"encoder/DownsamplingBlock_\1/Downsample_0/Conv_0/"),
    (r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.", r"decoder/UpsamplingBlock_\1/ResnetBlock_\2/"),
    (r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.conv\.", r"decoder/UpsamplingBlock_\1/Upsample_0/Conv_0/"),
    (r"^(quant_conv|post_quant_conv)\.", r"\1/"),
    (r"norm1\.", "GroupNorm_0/"),
    (r"conv1\.", "Conv_0/"),
    (r"norm2\.", "GroupNorm_1/"),
    (r"conv2\.", "Conv_1/"),
    (r"conv_shortcut\.", "Conv_2/"),
]


def lwm_tree_of(model) -> dict[str, np.ndarray]:
    """A diffusers VQModel's weights in LWM's flax layout."""
    flat = {}
    for name, tensor in model.state_dict().items():
        value = tensor.numpy()
        if name == "quantize.embedding.weight":
            flat["quantize/embeddings"] = value
            continue
        path = name
        for pattern, replacement in TO_LWM:
            path = re.sub(pattern, replacement, path)
        path = (
            path.removesuffix("weight") + ("kernel" if value.ndim == 4 else "scale")
            if path.endswith("weight")
            else path
        )
        flat[path] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    return flat


def reduced_lwm_shape() -> dict:
    """aMUSEd's reduced CPU shape with LWM's 32 GroupNorm groups (every channel count divides by 32)."""
    return {**amused_vqgan_config(reduced=True), "norm_num_groups": 32}


def test_conversion_reproduces_a_diffusers_model_with_the_same_weights(tmp_path):
    from diffusers import VQModel

    torch.manual_seed(3)
    original = VQModel(**reduced_lwm_shape()).eval()
    flat = lwm_tree_of(original)
    assert set(flat) == set(LWM["layout"]) and all(list(v.shape) == LWM["layout"][k] for k, v in flat.items())
    converted = build_vqmodel(read_params(lwm_checkpoint(tmp_path / "vqgan", flat)))
    for name, tensor in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    pixels = torch.from_numpy(frames(2)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        assert torch.equal(converted.encode(pixels).latents, original.encode(pixels).latents)


def test_a_pickle_written_by_flax_and_jax_reads_without_them():
    tree = read_params(str(DATA / "flax_frozendict_jax_arrays.pickle"))  # FrozenDicts of jax arrays
    assert isinstance(tree["encoder"], dict) and tree["quantize"]["embeddings"].tolist() == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]
    assert tree["quant_conv"]["kernel"].dtype == np.float32 and tree["quant_conv"]["kernel"].shape == (1, 1, 64, 2)
    with pytest.raises(ConfigError, match="no DownsamplingBlock_0"):  # a tree this small is no VQ-GAN
        build_vqmodel(tree)


def test_what_is_not_lwms_vqgan_is_refused_saying_what_was_found(tmp_path):
    flat = lwm_tree_values(LWM["layout"])
    cases = {
        "attention": (
            {**flat, "encoder/MidBlock_0/AttnBlock_0/Conv_0/kernel": np.ones((1, 1, 64, 64))},
            "attention blocks",
        ),
        "extra": ({**flat, "decoder/Extra_0/kernel": np.ones((1, 1, 3, 3))}, "tensors of no known module"),
        "missing": ({k: v for k, v in flat.items() if "MidBlock_0/ResnetBlock_0/Conv_1" not in k}, "missing"),
        "half": ({k: v for k, v in flat.items() if k != "encoder/Conv_0/bias"}, "lacks encoder/Conv_0/bias"),
        "shape": ({**flat, "quant_conv/kernel": np.ones((1, 1, 64, 32), np.float32)}, "wrong shape"),
    }
    for name, (tree, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_vqmodel(read_params(lwm_checkpoint(tmp_path / name, tree)))
    (tmp_path / "text").write_text("not a pickle")
    with pytest.raises(ConfigError, match="not a pickled params tree"):
        read_params(str(tmp_path / "text"))
    with open(tmp_path / "other", "wb") as f:
        pickle.dump({"weights": [1, 2]}, f)
    with pytest.raises(ConfigError, match="expected top-level"):
        read_params(str(tmp_path / "other"))
    with open(tmp_path / "code", "wb") as f:
        pickle.dump(Path("/tmp"), f)  # any class outside numpy and containers is refused, never built
    with pytest.raises(ConfigError, match="pathlib"):
        read_params(str(tmp_path / "code"))


def test_convert_vqgan_command_then_encode_and_decode_with_it(tmp_path):
    from lwm_data.testing.media import make_video

    checkpoint = lwm_checkpoint(tmp_path / "vqgan", lwm_tree_values(LWM["layout"]))
    runner = CliRunner()
    result = runner.invoke(app, ["convert-vqgan", "--input", checkpoint, "--output", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    assert "189 tensors" in result.output and "[-1, 1]" in result.output
    (tmp_path / "media").mkdir()
    make_video(tmp_path / "media" / "clip.mp4", frames=6, width=176, height=144)
    (tmp_path / "media" / "clip.txt").write_text("a clip")
    args = ["vision-codes", "--input", str(tmp_path / "media"), "--output", str(tmp_path / "codes"),
            "--vqgan", str(tmp_path / "model"), "--max-frames", "2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "codes" / "manifest.json").read_text())
    assert manifest["vqgan"]["pixel_range"] == "-1,1" and "LWM" in manifest["vqgan"]["converted_from"]["source"]
    result = runner.invoke(
        app, ["vision-decode", "--input", str(tmp_path / "codes"), "--output", str(tmp_path / "png")]
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "png").rglob("*.png"))) == 2
    result = runner.invoke(
        app, ["convert-vqgan", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
