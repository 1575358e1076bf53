"""Deterministic VQ-GAN weights in LWM's params layout, and deterministic frames: integer arithmetic
only, so this module gives the same arrays under any numpy, here and in the script that ran LWM's own
VQ-GAN on them (tests/data/lwm_vqgan_reduced.json, see its README)."""

from __future__ import annotations

import math
import zlib

import numpy as np


def uniform(seed: int, n: int) -> np.ndarray:
    """n float32 values in [-1, 1), a hash of (seed, index)."""
    with np.errstate(over="ignore"):
        x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return ((x >> np.uint64(11)).astype(np.float64) / 2.0**52 - 1.0).astype(np.float32)


def lwm_tree_values(layout: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """A value for every leaf of an LWM VQ-GAN params layout ({path: shape}): convolutions of unit
    gain, GroupNorm scales near 1, small biases, codebook vectors of the encoder's output scale."""
    values = {}
    for path, shape in layout.items():
        u = uniform(zlib.crc32(path.encode()), math.prod(shape)).reshape(shape)
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            values[path] = u * math.sqrt(3.0 / math.prod(shape[:-1]))
        elif leaf == "scale":
            values[path] = 1 + 0.1 * u
        elif leaf == "bias":
            values[path] = 0.05 * u
        else:  # the codebook
            values[path] = u
    return values


def frames(count: int = 4, size: int = 256) -> np.ndarray:
    """(count, size, size, 3) uint8: gradients, stripes and noise, different in every frame."""
    y, x = np.mgrid[0:size, 0:size].astype(np.int64)
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        noise = (uniform(1000 + i, size * size * 3).reshape(size, size, 3) * 40).astype(np.int64)
        checks = 64 * ((x // 32 + y // 32 + i) % 2)
        base = np.stack([x * (i + 1), y * (3 - i % 3), (x + y) // (i + 2) + checks], axis=-1)
        out[i] = np.clip(base % 256 + noise, 0, 255).astype(np.uint8)
    return out
