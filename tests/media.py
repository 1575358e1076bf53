"""Test media made on the spot: the package's synthetic media, and WebDataset shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from lwm_data.testing.media import make_image, make_video, moving_square  # noqa: F401 - re-exported for tests


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A WebDataset shard: members in the order given."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
