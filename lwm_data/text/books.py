"""Reading books from files: JSONL (plain, .gz, .zst), Parquet with a `text` column, or plain `.txt`
(one book per file), on any Beam filesystem.

Readers yield one `Book` or `Rejection` per input record, so a caller can count every record and
dead-letter the bad ones; a file that stops being readable (I/O, decompression, Arrow errors) is one
`unreadable_file` rejection, and any other exception propagates (it is a bug, not bad data). Books
come out normalised (`lwm_data.text.chunking.normalize_text`) with a stable `book_id`: the record's `id`
(or `meta.id` / `meta.book_id`) when present, else the first 16 hex digits of the normalised text's
sha256.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from lwm_data import files
from lwm_data.errors import ConfigError, Rejection
from lwm_data.reading import DEFAULT_MAX_RECORD_BYTES, READ_ERRORS, is_unicode, json_object, read_lines, unreadable
from lwm_data.text.chunking import content_hash, looks_binary, normalize_text

_TITLE_KEYS = ("title", "short_book_title", "book_title")
_ID_KEYS = ("id", "book_id")
_COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd")


@dataclass(frozen=True)
class Book:
    book_id: str
    title: str | None
    text: str  # normalised
    text_sha256: str
    source: str
    locator: str


def _without_compression(path: str) -> str:
    for suffix in _COMPRESSION_SUFFIXES:
        if path.lower().endswith(suffix):
            return path[: -len(suffix)]
    return path


def input_format(path: str) -> str:
    name = _without_compression(path).lower()
    for suffix, fmt in (
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
        (".ndjson", "jsonl"),
        (".parquet", "parquet"),
        (".txt", "txt"),
    ):
        if name.endswith(suffix):
            return fmt
    return "unknown"


def read_haystack(pattern: str) -> tuple[list[Book], list[Rejection]]:
    """The books of every file matching a glob, and the records that are not books, for stages that
    read their books whole (needle, evalset); a glob without one usable book is a ConfigError."""
    books, rejected = [], []
    for path in files.list_files(pattern):
        for item in read_books(path):
            (rejected if isinstance(item, Rejection) else books).append(item)
    if not books:
        raise ConfigError(f"no usable books in {pattern} ({len(rejected)} records rejected)")
    return books, rejected


def read_books(path: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Book | Rejection]:
    """Every record of one input file as a Book or a Rejection; an unreadable file is one Rejection."""
    readers = {"jsonl": _read_jsonl, "parquet": _read_parquet, "txt": _read_txt}
    reader = readers.get(input_format(path))
    if reader is None:
        yield Rejection("unknown_format", "expected .jsonl/.json[.gz|.zst], .parquet or .txt", source=path)
        return
    yield from reader(path, max_record_bytes)


def _read_jsonl(path: str, max_record_bytes: int) -> Iterator[Book | Rejection]:
    for item in read_lines(path, max_record_bytes):
        if isinstance(item, Rejection):
            yield item
            continue
        line_number, line = item
        locator = f"line {line_number}"
        try:
            yield book_from_fields(json_object(line), path, locator)
        except Rejection as rejection:
            yield rejection.at(path, locator)


def book_from_fields(record: dict[str, Any], source: str, locator: str) -> Book | Rejection:
    """A Book from a record's `text` and optional `id`/`title`/`meta`, or why not."""
    text = record.get("text")
    if text is None:
        return Rejection("missing_text", "no `text` field", record, source, locator)
    if not isinstance(text, str):
        return Rejection("text_not_string", f"`text` is {type(text).__name__}", record, source, locator)
    book_id, title = _record_id(record), _record_title(record)
    for name, value in (("id", book_id), ("title", title)):
        if value is not None and not is_unicode(value):
            return Rejection("invalid_utf8", f"`{name}` has a lone surrogate", record, source, locator)
    return book_from_text(text, source, locator, book_id, title)


def book_from_text(
    text: str, source: str, locator: str, book_id: str | None = None, title: str | None = None
) -> Book | Rejection:
    if looks_binary(text):
        return Rejection("binary_content", "too many control characters", text, source, locator)
    text = normalize_text(text)
    if not text.strip():
        return Rejection("empty_text", "`text` is empty or whitespace", "", source, locator)
    try:
        digest = content_hash(text)
    except UnicodeEncodeError as e:  # lone surrogates, from JSON escapes
        return Rejection("invalid_utf8", f"lone surrogate at character {e.start}", text, source, locator)
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


def _read_parquet(path: str, max_record_bytes: int) -> Iterator[Book | Rejection]:
    row = 0
    try:
        with files.open(path) as f:
            parquet = pq.ParquetFile(f)
            if "text" not in parquet.schema_arrow.names:
                yield Rejection("missing_text", "Parquet file has no `text` column", source=path)
                return
            wanted = [c for c in ("text", "id", "meta", *_TITLE_KEYS) if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=64, columns=wanted):
                for record in batch.to_pylist():
                    yield book_from_fields(record, path, f"row {row}")
                    row += 1
    except READ_ERRORS as e:
        yield unreadable(path, e).at(path, f"row {row}")


def _read_txt(path: str, max_record_bytes: int) -> Iterator[Book | Rejection]:
    try:
        with files.open(path) as f:
            data = f.read(max_record_bytes + 1)
    except READ_ERRORS as e:
        yield unreadable(path, e)
        return
    if len(data) > max_record_bytes:
        yield Rejection("record_too_large", f"larger than {max_record_bytes} bytes", "", path, "file")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Rejection("invalid_utf8", str(e), data, path, f"byte {e.start}")
        return
    title = _without_compression(path.rsplit("/", 1)[-1]).removesuffix(".txt")
    yield book_from_text(text, path, "file", title=title)
