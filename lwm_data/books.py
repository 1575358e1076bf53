"""Reading books from files: JSONL (plain, .gz, .zst), Parquet with a `text` column, or plain `.txt`
(one book per file), on any Beam filesystem.

Readers yield one `Book` or `Rejection` per input record, so a caller can count every record and
dead-letter the bad ones; nothing here raises on bad data. Books come out normalised
(`lwm_data.text.normalize_text`) with a stable `book_id`: the record's `id` (or `meta.id` /
`meta.book_id`) when present, else the first 16 hex digits of the normalised text's sha256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from lwm_data.text import content_hash, looks_binary, normalize_text

DEFAULT_MAX_RECORD_BYTES = 256 * 1024 * 1024
_READ_BLOCK = 8 * 1024 * 1024
_TITLE_KEYS = ("title", "short_book_title", "book_title")
_ID_KEYS = ("id", "book_id")


@dataclass(frozen=True)
class Book:
    book_id: str
    title: str | None
    text: str  # normalised
    text_sha256: str
    source: str
    locator: str


@dataclass(frozen=True)
class Rejection:
    reason: str
    source: str
    locator: str
    detail: str
    record: str = ""


def input_format(path: str) -> str:
    name = path.lower().removesuffix(".gz").removesuffix(".zst").removesuffix(".zstd")
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"), (".parquet", "parquet"), (".txt", "txt")):
        if name.endswith(suffix):
            return fmt
    return "unknown"


def read_books(path: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Book | Rejection]:
    """Every record of one input file as a Book or a Rejection; an unreadable file is one Rejection."""
    fmt = input_format(path)
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "txt": _read_txt}
    if fmt not in readers:
        yield Rejection("unknown_format", path, "", "expected .jsonl/.json[.gz|.zst], .parquet or .txt")
        return
    try:
        yield from readers[fmt](path, max_record_bytes)
    except Exception as e:  # noqa: BLE001 - any I/O or decoding failure makes the file unreadable
        yield Rejection("unreadable_file", path, "", f"{type(e).__name__}: {e}")


def _read_jsonl(path: str, max_record_bytes: int) -> Iterator[Book | Rejection]:
    with FileSystems.open(path) as f:
        for line_number, line in iter_lines(f, max_record_bytes):
            locator = f"line {line_number}"
            if line is None:
                yield Rejection("record_too_large", path, locator, f"line longer than {max_record_bytes} bytes")
            elif line.strip():
                yield _book_from_json_line(line, path, locator)


def iter_lines(f, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line bytes without the newline), or None for a line over max_bytes.

    Reads in blocks, so an over-long line is skipped without ever being held in memory whole.
    """
    line_number, parts, size, oversized = 1, [], 0, False
    while block := f.read(_READ_BLOCK):
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


def _book_from_json_line(line: bytes, source: str, locator: str) -> Book | Rejection:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejection("invalid_utf8", source, locator, str(e), line[:200].decode("utf-8", "replace"))
    try:
        record = json.loads(decoded)
    except (ValueError, RecursionError) as e:  # also: too deeply nested, an int of too many digits
        return Rejection("invalid_json", source, locator, f"{type(e).__name__}: {e}", decoded[:200])
    if not isinstance(record, dict):
        return Rejection("invalid_json", source, locator, f"expected an object, got {type(record).__name__}", decoded[:200])
    return book_from_fields(record, source, locator)


def book_from_fields(record: dict[str, Any], source: str, locator: str) -> Book | Rejection:
    """A Book from a record's `text` and optional `id`/`title`/`meta`, or why not."""
    text = record.get("text")
    if text is None:
        return Rejection("missing_text", source, locator, "no `text` field", _excerpt(record))
    if not isinstance(text, str):
        return Rejection("text_not_string", source, locator, f"`text` is {type(text).__name__}", _excerpt(record))
    book_id, title = _record_id(record), _record_title(record)
    for name, value in (("id", book_id), ("title", title)):
        if value is not None and not _is_unicode(value):
            return Rejection("invalid_utf8", source, locator, f"`{name}` has a lone surrogate", _excerpt(record))
    return book_from_text(text, source, locator, book_id, title)


def _is_unicode(text: str) -> bool:
    """False for a str with lone surrogates (JSON escapes such as \\ud800), which no UTF-8 sink takes."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def book_from_text(text: str, source: str, locator: str, book_id: str | None = None, title: str | None = None) -> Book | Rejection:
    if looks_binary(text):
        return Rejection("binary_content", source, locator, "too many control characters", text[:200])
    text = normalize_text(text)
    if not text.strip():
        return Rejection("empty_text", source, locator, "`text` is empty or whitespace")
    try:
        digest = content_hash(text)
    except UnicodeEncodeError as e:  # lone surrogates, from JSON escapes
        return Rejection("invalid_utf8", source, locator, f"lone surrogate at character {e.start}", text[:200])
    return Book(book_id or digest[:16], title, text, digest, source, locator)


def _record_id(record: dict[str, Any]) -> str | None:
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    for holder, key in [(record, "id")] + [(meta, k) for k in _ID_KEYS]:
        value = holder.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


def _record_title(record: dict[str, Any]) -> str | None:
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    for holder in (record, meta):
        for key in _TITLE_KEYS:
            if isinstance(holder.get(key), str):
                return holder[key]
    return None


def _excerpt(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)[:200]


def _read_parquet(path: str, max_record_bytes: int) -> Iterator[Book | Rejection]:
    with FileSystems.open(path) as f:
        parquet = pq.ParquetFile(f)
        if "text" not in parquet.schema_arrow.names:
            yield Rejection("missing_text", path, "", "Parquet file has no `text` column")
            return
        wanted = [c for c in ("text", "id", "meta", *_TITLE_KEYS) if c in parquet.schema_arrow.names]
        row = 0
        for batch in parquet.iter_batches(batch_size=64, columns=wanted):
            for record in batch.to_pylist():
                yield book_from_fields(record, path, f"row {row}")
                row += 1


def _read_txt(path: str, max_record_bytes: int) -> Iterator[Book | Rejection]:
    with FileSystems.open(path) as f:
        data = f.read(max_record_bytes + 1)
    if len(data) > max_record_bytes:
        yield Rejection("record_too_large", path, "file", f"larger than {max_record_bytes} bytes")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Rejection("invalid_utf8", path, f"byte {e.start}", str(e), data[:200].decode("utf-8", "replace"))
        return
    title = path.rsplit("/", 1)[-1].removesuffix(".zstd").removesuffix(".zst").removesuffix(".gz").removesuffix(".txt")
    yield book_from_text(text, path, "file", title=title)
