"""Files on any Beam filesystem (local paths, gs://, s3://, hdfs://, or one a test registers): the
one place the cores and the storage modules touch Apache Beam, and only its filesystems.

`open` decompresses by suffix (.gz, .zst, ...), as Beam's FileSystems does; `create` writes a new
file (on object stores, one object appears whole when the handle closes).
"""

from __future__ import annotations

import json
from typing import IO, Any

from apache_beam.io.filesystems import FileSystems


def join(*parts: str) -> str:
    return FileSystems.join(*parts)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def size(path: str) -> int:
    """A file's size in bytes, from the filesystem's metadata (nothing is read)."""
    return FileSystems.get_filesystem(path).size(path)


def open(path: str) -> IO[bytes]:  # noqa: A001 - the module is the namespace: files.open(path)
    return FileSystems.open(path)


def create(path: str) -> IO[bytes]:
    return FileSystems.create(path)


def read_bytes(path: str) -> bytes:
    with open(path) as f:
        return f.read()


def list_files(pattern: str) -> list[str]:
    """The files matching a glob, in name order."""
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def write_json(path: str, obj: Any) -> None:
    with create(path) as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False).encode() + b"\n")


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def json_lines(path: str) -> list[bytes]:
    """The non-blank lines of a JSONL file, split on b"\\n" only (str.splitlines would also split at
    U+2028, U+0085, ... inside a record)."""
    return [line for line in read_bytes(path).splitlines() if line.strip()]


def has_dirs(path: str) -> bool:
    """Whether `path`'s filesystem has real directories (local, HDFS) rather than prefixes (object stores)."""
    return FileSystems.get_filesystem(path).has_dirs()


def rename(source: str, destination: str) -> None:
    FileSystems.rename([source], [destination])


def delete(paths: list[str]) -> None:
    FileSystems.delete(paths)


def delete_tree(path: str) -> None:
    """Delete a directory and everything under it, if it is there, with or without real directories."""
    try:  # object stores delete a "directory" by its prefix; local paths are removed recursively
        delete([path if has_dirs(path) else path.rstrip("/") + "/"])
    except OSError:  # BeamIOError included: nothing there
        pass
