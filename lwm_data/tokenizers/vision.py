"""The vision tokenizer: aMUSEd's VQ-GAN (diffusers `VQModel`), 256x256 RGB frames <-> 16x16 codes.

    vqgan = VQGAN.from_pretrained("amused/amused-256", subfolder="vqvae")   # or a dir on any Beam filesystem
    codes = vqgan.encode(frames)         # (B, 256, 256, 3) uint8 -> (B, 16, 16) int32 in [0, 8192)
    frames = vqgan.decode(codes)         # -> (B, 256, 256, 3) uint8

The shape is aMUSEd's (docs/lwm-format.md): five DownEncoderBlock2D blocks of [128, 256, 256, 512,
768] channels, 64-dim latents, 8192 codes. `VQGAN.random(...)` builds that model (or `reduced`, the
same layout with fewer channels, for CPU tests) with random weights: its codes have the right shape
and range but mean nothing, which the run says loudly, once, and records in its manifest (`entry`).

Pixel range: the checkpoint decides. LWM's VQ-GAN takes [-1, 1] (`x / 127.5 - 1` in float32, as LWM
computes it); a directory made by `lwm-data convert-vqgan` records that (lwm_data_vqgan.json), and
it is the default for any other weights. aMUSEd's own VQ-GAN was trained on [0, 1] (diffusers' aMUSEd
pipeline feeds it unnormalized pixels): pass `pixel_range="0,1"` for an amused-256 snapshot.

Precision: `auto` runs the encoder in bf16 on cuda (fast) and float32 on cpu; `fp32` is float32 with
TF32 off on cuda too, for codes equal to a float32 reference; `bf16` forces bf16.

The nearest-code lookup is done here in float32 (`||z||^2 - 2 z.E + ||E||^2`, one matmul) rather
than by the model's quantizer: the encoder may run in bf16 on a GPU, where distances in bf16 would
pick wrong codes, and a single matmul compiles well. It gives the quantizer's codes (tested).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from lwm_data import files
from lwm_data.config import setting
from lwm_data.errors import ConfigError
from lwm_data.lwm_format.layout import CODEBOOK_SIZE, CODES_SIDE, FRAME_PIXELS

LATENT_CHANNELS = 64
PIXEL_RANGES = {"0,1": (0.0, 1.0), "-1,1": (-1.0, 1.0)}
LWM_PIXEL_RANGE = "-1,1"
PRECISIONS = ("auto", "bf16", "fp32")
PROVENANCE_FILE = "lwm_data_vqgan.json"  # written by `lwm-data convert-vqgan` beside the weights
RANDOM_CONFIGS = ("amused", "reduced")
RANDOM_SEED = 0

log = logging.getLogger("lwm_data.vision")


def amused_vqgan_config(reduced: bool = False) -> dict[str, Any]:
    """diffusers `VQModel` kwargs of aMUSEd's VQ-GAN; `reduced` keeps its layout (5 blocks, 16x16
    codes of 64 dims, 8192 entries) with fewer channels and layers, about 40x cheaper, for CPU tests."""
    channels = (32, 32, 64, 64, 64) if reduced else (128, 256, 256, 512, 768)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 5,
        up_block_types=("UpDecoderBlock2D",) * 5,
        block_out_channels=channels,
        layers_per_block=1 if reduced else 2,
        act_fn="silu",
        latent_channels=LATENT_CHANNELS,
        sample_size=32,
        num_vq_embeddings=CODEBOOK_SIZE,
        norm_num_groups=16 if reduced else 32,
        vq_embed_dim=None,
        scaling_factor=0.18215,
        norm_type="group",
        mid_block_add_attention=False,
        lookup_from_codebook=True,
        force_upcast=False,
    )


@dataclass(frozen=True)
class VQGANSettings:
    """Which VQ-GAN, where it runs, how it is fed."""

    vqgan: str | None = setting(
        None,
        "VQ-GAN weights: a diffusers VQModel dir (any Beam filesystem). Default: RANDOM weights (codes mean nothing).",
    )
    vqgan_subfolder: str = setting("", "Subfolder of --vqgan holding the VQModel (amused/amused-256: vqvae).")
    random_config: str = setting(
        "amused", "Shape of random weights when no --vqgan: amused (full) or reduced (CPU tests)."
    )
    pixel_range: str | None = setting(
        None,
        "Pixels the weights expect: -1,1 (LWM) or 0,1 (aMUSEd's snapshot). Default: the weights' record, else -1,1.",
    )
    precision: str = setting("auto", "auto (bf16 on cuda, fp32 on cpu), bf16, or fp32 (TF32 off: exact codes).")
    device: str = setting("cpu", "cpu or cuda.")
    batch_size: int = setting(16, "Frames per VQ-GAN batch (and per decoded batch of a video).")
    compile: bool = setting(True, "torch.compile the encoder on cuda (ignored on cpu).")
    accelerator: str | None = setting(
        None, "Beam resource hint for the VQ-GAN step, e.g. 'type:nvidia-l4;count:1;install-nvidia-driver' (Dataflow)."
    )

    def __post_init__(self):
        if self.pixel_range is not None and self.pixel_range not in PIXEL_RANGES:
            raise ConfigError(f"--pixel-range must be one of {', '.join(PIXEL_RANGES)}, not {self.pixel_range!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.random_config not in RANDOM_CONFIGS:
            raise ConfigError(f"--random-config must be one of {', '.join(RANDOM_CONFIGS)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, not {self.device!r}")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")

    def check_device(self) -> None:
        """`--device cuda` where this machine has no GPU is a user error, said before the job starts."""
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("--device cuda, but torch sees no GPU here (use --device cpu, or run on GPU workers)")


class VQGAN:
    """A diffusers VQModel used as a tokenizer: batched, under `torch.inference_mode`."""

    def __init__(
        self,
        model,
        entry: dict[str, Any],
        pixel_range: str = LWM_PIXEL_RANGE,
        device: str = "cpu",
        compile: bool = True,
        precision: str = "auto",
    ):
        import torch

        self.device = torch.device(device)
        self.precision = resolved_precision(precision, self.device.type)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        if precision == "fp32" and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.model = model.to(self.device).eval()
        if self.dtype != torch.float32:
            self.model = self.model.to(self.dtype)
        self.low, self.high = PIXEL_RANGES[pixel_range]
        self.pixel_divisor = 255.0 / (self.high - self.low)  # 127.5 for [-1, 1]: x / 127.5 - 1, as LWM
        self.entry = {**entry, "pixel_range": pixel_range, "precision": self.precision}
        codebook = self.model.quantize.embedding.weight.detach().float()
        self._codebook = codebook
        self._codebook_sq = (codebook * codebook).sum(1)
        self._encoder = self._encode_latents
        if compile and self.device.type == "cuda":
            self._encoder = torch.compile(self._encode_latents)
        if entry.get("random_weights"):
            _warn_random_weights()

    @classmethod
    def random(cls, reduced: bool = False, seed: int = RANDOM_SEED, **kwargs) -> VQGAN:
        """aMUSEd's VQ-GAN shape with random weights (deterministic for a seed)."""
        import torch
        from diffusers import VQModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VQModel(**amused_vqgan_config(reduced))
        kwargs["pixel_range"] = kwargs.get("pixel_range") or LWM_PIXEL_RANGE
        return cls(model, random_entry(reduced, seed), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str = "", pixel_range: str | None = None, **kwargs) -> VQGAN:
        """Weights saved by `save_pretrained` (or a Hub snapshot, or `lwm-data convert-vqgan`) in a local
        dir or on any Beam filesystem; `pixel_range` None: the one the directory records, else LWM's."""
        from diffusers import VQModel

        local = _local_copy(os.path.join(path, subfolder) if subfolder else path)
        entry = pretrained_entry(path, subfolder, local)
        model = VQModel.from_pretrained(local)
        return cls(model, entry, pixel_range=checked_pixel_range(pixel_range, entry, path), **kwargs)

    @classmethod
    def from_settings(cls, settings: VQGANSettings) -> VQGAN:
        kwargs = dict(
            pixel_range=settings.pixel_range,
            device=settings.device,
            compile=settings.compile,
            precision=settings.precision,
        )
        if settings.vqgan is None:
            return cls.random(settings.random_config == "reduced", **kwargs)
        return cls.from_pretrained(settings.vqgan, settings.vqgan_subfolder, **kwargs)

    def _encode_latents(self, pixels):
        import torch

        latents = self.model.encode(pixels).latents  # (B, 64, 16, 16)
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()
        distances = self._codebook_sq - 2 * flat @ self._codebook.T  # ||z||^2 is the same for every code
        return torch.argmin(distances, dim=1).view(latents.shape[0], latents.shape[2], latents.shape[3])

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """(B, 256, 256, 3) uint8 RGB -> (B, 16, 16) int32 codes in raster order."""
        import torch

        if frames.ndim != 4 or frames.shape[1:] != (FRAME_PIXELS, FRAME_PIXELS, 3):
            raise ValueError(f"frames must be (B, {FRAME_PIXELS}, {FRAME_PIXELS}, 3), got {frames.shape}")
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2)
            pixels = (pixels.float() / self.pixel_divisor + self.low).to(self.dtype)
            return self._encoder(pixels).to("cpu", torch.int32).numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(B, 16, 16) codes -> (B, 256, 256, 3) uint8 RGB."""
        import torch

        codes = np.asarray(codes).reshape(-1, CODES_SIDE, CODES_SIDE)
        with torch.inference_mode():
            indices = torch.from_numpy(codes.astype(np.int64)).to(self.device).reshape(-1)
            shape = (len(codes), CODES_SIDE, CODES_SIDE, self._codebook.shape[1])
            pixels = self.model.decode(indices, force_not_quantize=True, shape=shape).sample.float()
            scaled = ((pixels - self.low) / (self.high - self.low)).clamp(0, 1) * 255
            return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def random_entry(reduced: bool, seed: int = RANDOM_SEED) -> dict[str, Any]:
    """The manifest entry of random weights: enough to rebuild the same model (decoding needs it)."""
    return {
        "name": "random",
        "config": "reduced" if reduced else "amused",
        "seed": seed,
        "random_weights": True,
        "note": "RANDOM VQ-GAN weights: these codes mean nothing",
    }


def describe(settings: VQGANSettings) -> dict[str, Any]:
    """The manifest entry of the VQ-GAN a job will use, said before the job runs (loudly, for random weights)."""
    precision = resolved_precision(settings.precision, settings.device)
    if settings.vqgan is None:
        _warn_random_weights()
        entry = random_entry(settings.random_config == "reduced")
        return {**entry, "pixel_range": settings.pixel_range or LWM_PIXEL_RANGE, "precision": precision}
    path = os.path.join(settings.vqgan, settings.vqgan_subfolder) if settings.vqgan_subfolder else settings.vqgan
    entry = pretrained_entry(settings.vqgan, settings.vqgan_subfolder, _local_copy(path))
    pixel_range = checked_pixel_range(settings.pixel_range, entry, settings.vqgan)
    return {**entry, "pixel_range": pixel_range, "precision": precision}


def resolved_precision(precision: str, device: str) -> str:
    """bf16 or fp32: `auto` is bf16 on cuda, fp32 elsewhere."""
    return ("bf16" if device == "cuda" else "fp32") if precision == "auto" else precision


def pretrained_entry(path: str, subfolder: str, local: str) -> dict[str, Any]:
    """The manifest entry of weights in a directory, with the provenance `convert-vqgan` recorded."""
    entry = {"path": path, "subfolder": subfolder, "sha256": _weights_sha256(local), "random_weights": False}
    provenance = os.path.join(local, PROVENANCE_FILE)
    if os.path.exists(provenance):
        with open(provenance) as f:
            entry["converted_from"] = json.load(f)
    return entry


def checked_pixel_range(requested: str | None, entry: dict[str, Any], path: str) -> str:
    """The pixel range to feed: the one asked for, else the one the weights record, else LWM's. Asking
    for another range than the weights record is an error, not a silent override."""
    recorded = entry.get("converted_from", {}).get("pixel_range")
    if requested and recorded and requested != recorded:
        raise ConfigError(
            f"the VQ-GAN at {path} expects pixels in [{recorded}] (it says so in {PROVENANCE_FILE}), "
            f"not --pixel-range {requested}"
        )
    return requested or recorded or LWM_PIXEL_RANGE


@lru_cache(maxsize=1)
def _warn_random_weights() -> None:
    log.warning(
        "VQ-GAN has RANDOM weights (no --vqgan given): its codes mean nothing; fine for trying the pipeline, "
        "useless for training. Pass --vqgan: LWM's own (made by `lwm-data convert-vqgan`) or aMUSEd-256's "
        "(a local snapshot, with --vqgan-subfolder vqvae)."
    )


def _local_copy(path: str) -> str:
    """A local directory holding `path`'s files (itself when local): diffusers reads only local dirs."""
    if os.path.isdir(path):
        return path
    matches = files.list_files(path.rstrip("/") + "/*")
    if not matches:
        raise ConfigError(f"no VQ-GAN weights at {path} (expected config.json and diffusion_pytorch_model.*)")
    local = tempfile.mkdtemp(prefix="lwm-vqgan-")
    for match in matches:
        with files.open(match) as source, open(os.path.join(local, os.path.basename(match)), "wb") as out:
            while block := source.read(1 << 24):
                out.write(block)
    return local


def _weights_sha256(directory: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.startswith("diffusion_pytorch_model") or name == "config.json":
            with open(os.path.join(directory, name), "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()
