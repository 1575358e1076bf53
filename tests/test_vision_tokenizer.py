"""The VQ-GAN tokenizer: aMUSEd's shape, weights saved and loaded, codes' shape and range, determinism."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lwm_data.errors import ConfigError
from lwm_data.tokenizers import vision
from lwm_data.tokenizers.vision import VQGAN, VQGANSettings, amused_vqgan_config, describe


@pytest.fixture(scope="module")
def vqgan() -> VQGAN:
    return VQGAN.random(reduced=True)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)


def test_config_is_amuseds_vqgan():
    config = amused_vqgan_config()
    assert config["block_out_channels"] == (128, 256, 256, 512, 768)
    assert config["down_block_types"] == ("DownEncoderBlock2D",) * 5
    assert (config["layers_per_block"], config["latent_channels"], config["num_vq_embeddings"]) == (2, 64, 8192)
    assert config["norm_num_groups"] == 32 and not config["mid_block_add_attention"] and config["lookup_from_codebook"]


def test_encode_shape_range_and_determinism(vqgan, frames):
    codes = vqgan.encode(frames)
    assert codes.shape == (3, 16, 16) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 8192
    assert len(np.unique(codes)) > 1  # random weights still spread over the codebook
    again = VQGAN.random(reduced=True).encode(frames)  # same seed, a fresh model
    np.testing.assert_array_equal(codes, again)
    np.testing.assert_array_equal(vqgan.encode(frames[1:2]), codes[1:2])  # batching changes nothing


def test_nearest_code_lookup_matches_the_models_quantizer(vqgan, frames):
    """Same codes as diffusers' quantizer, up to float32 near-ties (random codebooks are dense)."""
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # the default range, LWM's
    with torch.inference_mode():
        latents = vqgan.model.encode(pixels).latents
        expected = vqgan.model.quantize(latents)[2][2].numpy()
    ours = vqgan.encode(frames).reshape(-1)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 64).double()
    distances = torch.cdist(flat, vqgan.model.quantize.embedding.weight.detach().double()).numpy()
    best = distances.min(1)
    rows = np.arange(len(ours))
    assert (ours == expected).mean() > 0.99
    np.testing.assert_allclose(distances[rows, ours], best, rtol=1e-5)
    np.testing.assert_allclose(distances[rows, expected], best, rtol=1e-5)


def test_decode_of_encode_gives_frames(vqgan, frames):
    decoded = vqgan.decode(vqgan.encode(frames))
    assert decoded.shape == (3, 256, 256, 3) and decoded.dtype == np.uint8
    assert decoded.std() > 0


def test_save_pretrained_then_from_pretrained(tmp_path, vqgan, frames):
    vqgan.model.save_pretrained(tmp_path / "vqgan" / "vqvae")
    loaded = VQGAN.from_pretrained(str(tmp_path / "vqgan"), subfolder="vqvae")
    np.testing.assert_array_equal(loaded.encode(frames), vqgan.encode(frames))
    assert loaded.entry["random_weights"] is False and len(loaded.entry["sha256"]) == 64
    settings = VQGANSettings(vqgan=str(tmp_path / "vqgan"), vqgan_subfolder="vqvae")
    assert describe(settings)["sha256"] == loaded.entry["sha256"]


def test_weights_load_from_a_beam_filesystem(tmp_path, vqgan, frames):
    from apache_beam.io.filesystems import FileSystems

    import tests.memfs  # noqa: F401 - registers memfs://

    vqgan.model.save_pretrained(tmp_path)
    for path in tmp_path.iterdir():
        with FileSystems.create(f"memfs://weights/vqvae/{path.name}") as out:
            out.write(path.read_bytes())
    loaded = VQGAN.from_pretrained("memfs://weights", subfolder="vqvae")
    np.testing.assert_array_equal(loaded.encode(frames[:1]), vqgan.encode(frames[:1]))


def test_pixel_range_is_a_setting(frames):
    minus_one_one, zero_one = VQGAN.random(reduced=True), VQGAN.random(reduced=True, pixel_range="0,1")
    assert not np.array_equal(zero_one.encode(frames), minus_one_one.encode(frames))
    with pytest.raises(ConfigError):
        VQGANSettings(pixel_range="0,255")


def test_precision_is_a_setting_recorded_with_the_codes(frames):
    assert describe(VQGANSettings(random_config="reduced"))["precision"] == "fp32"  # auto on cpu
    assert describe(VQGANSettings(random_config="reduced", device="cuda"))["precision"] == "bf16"  # auto on cuda
    half = VQGAN.random(reduced=True, precision="bf16")
    assert half.dtype == torch.bfloat16 and half.entry["precision"] == "bf16"
    codes, exact = half.encode(frames), VQGAN.random(reduced=True, precision="fp32").encode(frames)
    assert codes.shape == exact.shape and (codes == exact).mean() > 0.8  # bf16 moves near-ties only
    with pytest.raises(ConfigError, match="--precision"):
        VQGANSettings(precision="fp16")


def test_random_weights_are_said_loudly_once_and_recorded(caplog):
    vision._warn_random_weights.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lwm_data.vision"):
        first, second = describe(VQGANSettings()), describe(VQGANSettings(random_config="reduced"))
    assert sum("RANDOM weights" in r.message for r in caplog.records) == 1
    assert first["random_weights"] and first["config"] == "amused" and second["config"] == "reduced"
    assert "mean nothing" in first["note"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(ConfigError, match="no GPU"):
        VQGANSettings(device="cuda").check_device()
