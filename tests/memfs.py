"""`memfs://`: an in-process object store for tests, with what gs:// and s3:// lack and have.

No directories (a "directory" is a name prefix), no atomic rename (rename is copy then delete), and
an object becomes visible only when its writer closes, whole, as on GCS. Beam finds it by its
scheme once this module is imported; runs in-process (FnApiRunner) share the store.
"""

from __future__ import annotations

import io
import threading
import time

from apache_beam.io.filesystem import BeamIOError, CompressedFile, CompressionTypes, FileMetadata, FileSystem

_objects: dict[str, bytes] = {}
_lock = threading.Lock()


def clear() -> None:
    with _lock:
        _objects.clear()


def names(prefix: str = "memfs://") -> list[str]:
    with _lock:
        return sorted(p for p in _objects if p.startswith(prefix))


class _Upload(io.BytesIO):
    """Bytes that become the object when closed, never before."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def close(self) -> None:
        if not self.closed:
            with _lock:
                _objects[self.path] = self.getvalue()
        super().close()


class MemoryFileSystem(FileSystem):
    @classmethod
    def scheme(cls) -> str:
        return "memfs"

    def join(self, basepath: str, *paths: str) -> str:
        return "/".join([basepath.rstrip("/"), *(p.strip("/") for p in paths)])

    def split(self, path: str) -> tuple[str, str]:
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path: str) -> None:
        pass

    def has_dirs(self) -> bool:
        return False

    def _list(self, dir_or_prefix: str):
        with _lock:
            items = [(p, len(data)) for p, data in _objects.items() if p.startswith(dir_or_prefix)]
        for path, size in items:
            yield FileMetadata(path, size, time.time())

    def _wrap(self, stream, path: str, compression_type):
        if compression_type == CompressionTypes.AUTO:
            compression_type = CompressionTypes.detect_compression_type(path)
        if compression_type == CompressionTypes.UNCOMPRESSED:
            return stream
        return CompressedFile(stream, compression_type=compression_type)

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        return self._wrap(_Upload(path), path, compression_type)

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        with _lock:
            if path not in _objects:
                raise FileNotFoundError(path)
            data = _objects[path]
        return self._wrap(io.BytesIO(data), path, compression_type)

    def copy(self, source_file_names, destination_file_names) -> None:
        with _lock:
            for source, destination in zip(source_file_names, destination_file_names):
                _objects[destination] = _objects[source]

    def rename(self, source_file_names, destination_file_names) -> None:
        self.copy(source_file_names, destination_file_names)
        self.delete(source_file_names)

    def exists(self, path: str) -> bool:
        with _lock:
            return path in _objects  # objects only, as on GCS: a "directory" does not exist

    def size(self, path: str) -> int:
        with _lock:
            return len(_objects[path])

    def last_updated(self, path: str) -> float:
        return time.time()

    def checksum(self, path: str) -> str:
        return str(self.size(path))

    def metadata(self, path: str) -> FileMetadata:
        return FileMetadata(path, self.size(path), time.time())

    def delete(self, paths) -> None:
        missing = {}
        with _lock:
            for path in paths:
                doomed = [p for p in _objects if p.startswith(path)] if path.endswith("/") else [path]
                for p in doomed:
                    if _objects.pop(p, None) is None:
                        missing[p] = FileNotFoundError(p)
        if missing:
            raise BeamIOError("Delete operation failed", missing)

    def report_lineage(self, path, lineage) -> None:
        pass
