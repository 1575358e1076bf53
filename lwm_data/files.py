"""Files on any Beam filesystem (local paths, gs://, s3://, hdfs://, or one a test registers): the
one place the cores and the storage modules touch Apache Beam, and only its filesystems.

`open` decompresses by suffix (.gz, .zst, ...), as Beam's FileSystems does, except that a .gz or
.zst stream cut short raises EOFError where Beam's reader would end quietly at the cut; `create`
writes a new file (on object stores, one object appears whole when the handle closes).
"""

from __future__ import annotations

import gzip
import io
import json
from typing import IO, Any

import zstandard
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

STREAM_BLOCK_BYTES = 1 << 20


def join(*parts: str) -> str:
    return FileSystems.join(*parts)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def size(path: str) -> int:
    """A file's size in bytes, from the filesystem's metadata (nothing is read)."""
    return FileSystems.get_filesystem(path).size(path)


def open(path: str) -> IO[bytes]:  # noqa: A001 - the module is the namespace: files.open(path)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=_raw(path))  # raises EOFError at a cut
    if path.endswith(".zst"):
        return io.BufferedReader(_StrictZstd(_raw(path)), STREAM_BLOCK_BYTES)
    return FileSystems.open(path)


def _raw(path: str) -> IO[bytes]:
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


class _StrictZstd(io.RawIOBase):
    """A .zst stream (one frame or several) that raises EOFError when its data ends inside a frame."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            block = self._raw.read(STREAM_BLOCK_BYTES)
            if not block:
                if self._in_frame:
                    raise EOFError("zstd stream ended inside a frame (a truncated file)")
                return 0
            self._pending = self._decompress(block)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame.eof:
                self._frame = zstandard.ZstdDecompressor().decompressobj()
            out.append(self._frame.decompress(data))
            data = self._frame.unused_data if self._frame.eof else b""
            self._in_frame = not self._frame.eof
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def create(path: str) -> IO[bytes]:
    return FileSystems.create(path)


def read_bytes(path: str) -> bytes:
    with open(path) as f:
        return f.read()


def list_files(pattern: str) -> list[str]:
    """The files matching a glob, in name order."""
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def matches_any(pattern: str) -> bool:
    """Whether a glob matches a file, asking the filesystem for one match only."""
    return bool(FileSystems.match([pattern], limits=[1])[0].metadata_list)


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
