"""Test media made on the spot: the package's synthetic media, and WebDataset shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from lwm_data.testing.media import make_image, make_video, moving_square  # noqa: F401 - re-exported for tests


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A WebDataset shard: members in the order given."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_noise_image(path: Path, width: int = 160, height: int = 120) -> Path:
    """An image of random pixels: incompressible, so its file is about width x height x 3 bytes."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path
