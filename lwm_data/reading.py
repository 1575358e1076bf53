"""Reading input files record by record, for every reader (books, LWM JSONL, model responses).

`READ_ERRORS` are the failures that make a file unreadable (I/O, decompression, Arrow): a reader
turns those into one `unreadable_file` rejection and lets anything else propagate, so a bug in a
parser fails the job instead of hiding as bad input. Files are opened through Beam's filesystems,
which decompress by suffix (.gz, .zst, ...); a truncated .gz or .zst stream raises EOFError
(lwm_data.files), so a cut file is `unreadable_file` after the lines read before the cut.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import zstandard

from lwm_data import files
from lwm_data.errors import Rejection

READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, pa.ArrowException)
DEFAULT_MAX_RECORD_BYTES = 256 * 1024 * 1024
READ_BLOCK_BYTES = 8 * 1024 * 1024


def unreadable(path: str, error: BaseException) -> Rejection:
    return Rejection("unreadable_file", f"{type(error).__name__}: {error}", source=path)


def iter_lines(f, max_bytes: int, block_bytes: int = READ_BLOCK_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line bytes without the newline), or None for a line over max_bytes.

    Reads in blocks, so an over-long line is skipped without ever being held in memory whole.
    """
    line_number, parts, size, oversized = 1, [], 0, False
    while block := f.read(block_bytes):
        start = 0
        while (end := block.find(b"\n", start)) >= 0:
            if not oversized and size + end - start <= max_bytes:
                parts.append(block[start:end])
                yield line_number, b"".join(parts)
            else:
                yield line_number, None
            line_number, parts, size, oversized = line_number + 1, [], 0, False
            start = end + 1
        if not oversized:
            size += len(block) - start
            oversized = size > max_bytes
            parts = [] if oversized else parts + [block[start:]]
    if oversized:
        yield line_number, None
    elif size:
        yield line_number, b"".join(parts)


def read_lines(path: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes] | Rejection]:
    """Every non-blank line of a file as (line number, bytes); a `record_too_large` rejection for a
    line over max_bytes; one `unreadable_file` rejection where the file stops being readable."""
    try:
        with files.open(path) as f:
            for line_number, line in iter_lines(f, max_bytes):
                if line is None:
                    yield Rejection(
                        "record_too_large", f"line longer than {max_bytes} bytes", "", path, f"line {line_number}"
                    )
                elif line.strip():
                    yield line_number, line
    except READ_ERRORS as e:
        yield unreadable(path, e)


def json_object(line: bytes | str) -> dict[str, Any]:
    """A JSONL line's object; raises Rejection (invalid_utf8, invalid_json) for anything else."""
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
    except UnicodeDecodeError as e:
        raise Rejection("invalid_utf8", str(e), line) from None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as e:  # also: too deeply nested, an int of too many digits
        raise Rejection("invalid_json", f"{type(e).__name__}: {e}", text) from None
    if not isinstance(record, dict):
        raise Rejection("invalid_json", f"expected an object, got {type(record).__name__}", text)
    return record


def is_unicode(text: str) -> bool:
    """False for a str with lone surrogates (JSON escapes such as \\ud800), which no UTF-8 sink takes."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
