"""Books -> ~1K-token chunks (the first step of LWM's long-context recipe), in two passes over the files:

    files --Index: read, normalise, hash--> book keys (+ dead letters)                         [pass 1]
    keys --DropDuplicateBooks (by content, then by id)--> the kept books' (file, locator)
    files --ReadKept: read again, only those--> books --TokenizeAndChunk--> CHUNK_SCHEMA tables  [pass 2]

Only keys (id, content hash, file, locator) go through the dedupe grouping, never texts, and pass 2
streams: a few books at a time are tokenized and cut (one thread per core) while the next are read
and finished ones are written, `batch_chars` characters of whole books per table. So a job holds
about `2 x cores` books and one table, whatever the corpus size; the price is reading the files twice.

Counts: `in` = input records (pass 1), `out` = books written; filtered: duplicate, too_short,
too_long; dead-lettered: bad records (see lwm_data.text.books) and conflicting ids. Stats: chunks, tokens.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa

from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection
from lwm_data.outputs import DeadLetterPolicy
from lwm_data.pipelines.common import (
    ERRORS,
    Counters,
    FilePaths,
    StageOutput,
    TokenizerStep,
    merge_errors,
    route,
    run_stage,
)
from lwm_data.reading import DEFAULT_MAX_RECORD_BYTES
from lwm_data.schemas import CHUNK_SCHEMA
from lwm_data.text.books import Book, read_books
from lwm_data.text.chunking import Chunk as ChunkSpan
from lwm_data.text.chunking import cut_chunks, utf8_offsets
from lwm_data.tokenizers import TokenizedText, load_tokenizer

STAGE = "chunk"


@dataclass(frozen=True)
class ChunkConfig:
    input: str = setting(help="Glob of JSONL (.gz/.zst), Parquet or .txt books, any Beam filesystem.")
    output: str = setting(help="Output directory.")
    tokenizer: str | None = setting(None, "SentencePiece .model or Hugging Face tokenizer dir (default: embedded).")
    chunk_tokens: int = setting(1000, "Target tokens per chunk.")
    tolerance: float = setting(0.1, "Chunk length may vary by this fraction to meet a natural boundary.")
    min_book_tokens: int = setting(0, "Drop (count) books with fewer tokens.")
    max_book_tokens: int | None = setting(None, "Drop (count) books with more tokens.")
    max_record_bytes: int = setting(DEFAULT_MAX_RECORD_BYTES, "Dead-letter input records larger than this.")
    batch_chars: int = setting(4_000_000, "Characters of whole books per output table (Parquet row group).")
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)

    def __post_init__(self):
        if self.chunk_tokens < 1 or not 0 <= self.tolerance < 1:
            raise ConfigError("chunk_tokens must be positive and tolerance in [0, 1)")


@dataclass(frozen=True)
class BookKey:
    """What deduplication needs of a book: where it is and what it is, not its text."""

    book_id: str
    text_sha256: str
    source: str
    locator: str


class BookIndexer:
    """Step (pass 1): one input file -> its books' keys and its rejections, each counted as an input record."""

    def __init__(self, stage: str, max_record_bytes: int):
        self.count = Counters(stage)
        self.max_record_bytes = max_record_bytes

    def __call__(self, path: str) -> Iterable[BookKey | Rejection]:
        for item in read_books(path, self.max_record_bytes):
            self.count("in")
            yield item if isinstance(item, Rejection) else BookKey(item.book_id, item.text_sha256, path, item.locator)


def read_kept_books(path: str, kept: Iterable[str], max_record_bytes: int) -> Iterator[Book]:
    """Pass 2: the books of one file at the `kept` locators (its rejections were counted in pass 1)."""
    locators = set(kept)
    if not locators:
        return
    for item in read_books(path, max_record_bytes):
        if isinstance(item, Book) and item.locator in locators:
            yield item


def _first_by_position(books: Iterable[BookKey]) -> list[BookKey]:
    """Books in input order: by file, then by line/row. A file's locators share their prefix
    ("line 9", "line 10"), so shorter first, then as text, is numeric order."""
    return sorted(books, key=lambda b: (b.source, len(b.locator), b.locator))


class KeepFirstCopy:
    """Step: of books with identical text, keep the first by (source, locator); count the rest."""

    def __init__(self, stage: str):
        self.count = Counters(stage)

    def __call__(self, keyed: tuple[str, Iterable[BookKey]]) -> Iterable[BookKey]:
        first, *copies = _first_by_position(keyed[1])
        self.count("filtered.duplicate", len(copies))
        yield first


def reject_conflicting_ids(keyed: tuple[str, Iterable[BookKey]]) -> Iterable[BookKey | Rejection]:
    """Step: books that share an id but differ in text: keep the first, reject the others."""
    first, *others = _first_by_position(keyed[1])
    yield first
    for book in others:
        detail = f"id {book.book_id!r} already used by {first.source} {first.locator} for a different text"
        yield Rejection("conflicting_id", detail, "", book.source, book.locator)


class TokenizeAndChunk(TokenizerStep):
    """Step: books -> CHUNK_SCHEMA tables of whole books, `batch_chars` characters or more each (the
    rest at `finish`).

    Each book is tokenized and cut on a pool thread, one per core (the tokenizers release the GIL),
    up to `2 x cores` books ahead of the one being collected, while this thread reads the next books
    and builds tables. Books are collected in input order, so the output does not depend on timing.
    """

    def __init__(self, stage: str, config: ChunkConfig, tokenizer: dict):
        super().__init__(tokenizer)
        self.count = Counters(stage)
        self.config = config

    def setup(self) -> None:
        super().setup()
        self.threads = os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tokenize")
        self.in_flight: deque[tuple[Book, Future]] = deque()
        self.columns = _ChunkColumns()

    def teardown(self) -> None:
        self.pool.shutdown()

    def __call__(self, book: Book) -> Iterable[pa.Table]:
        self.in_flight.append((book, self.pool.submit(self._cut, book.text)))
        if len(self.in_flight) > 2 * self.threads:
            yield from self._collect()

    def finish(self) -> Iterable[pa.Table]:
        while self.in_flight:
            yield from self._collect()
        if self.columns.num_rows:
            yield self._table()

    def _cut(self, text: str) -> tuple[TokenizedText, list[ChunkSpan]]:
        (tokens,) = self.tokenizer.encode_with_offsets([text], num_threads=1)
        if self._filter_reason(len(tokens.ids)):
            return tokens, []
        return tokens, cut_chunks(text, tokens, self.config.chunk_tokens, self.config.tolerance)

    def _collect(self) -> Iterable[pa.Table]:
        book, future = self.in_flight.popleft()
        tokens, chunks = future.result()
        reason = self._filter_reason(len(tokens.ids))
        if reason:
            self.count(f"filtered.{reason}")
            return
        self.columns.add(book, tokens.ids, chunks)
        self.count("out")
        self.count("chunks", len(chunks))
        self.count("tokens", len(tokens.ids))
        if self.columns.num_chars >= self.config.batch_chars:
            yield self._table()

    def _table(self) -> pa.Table:
        table, self.columns = self.columns.to_table(), _ChunkColumns()
        return table

    def _filter_reason(self, num_tokens: int) -> str | None:
        if num_tokens < self.config.min_book_tokens:
            return "too_short"
        if self.config.max_book_tokens is not None and num_tokens > self.config.max_book_tokens:
            return "too_long"
        return None


class _ChunkColumns:
    """Column buffers for CHUNK_SCHEMA. Token lists and texts are built from offsets into each book's
    ids and UTF-8 bytes, not from a Python object per token or per chunk text."""

    def __init__(self):
        self.rows: dict[str, list] = {name: [] for name in CHUNK_SCHEMA.names if name not in ("tokens", "text")}
        self.token_arrays: list[np.ndarray] = []
        self.token_offsets: list[np.ndarray] = [np.zeros(1, np.int64)]
        self.text_bytes: list[bytes] = []
        self.text_offsets: list[np.ndarray] = [np.zeros(1, np.int64)]
        self.num_rows = 0
        self.num_chars = 0
        self._total_tokens = 0
        self._total_bytes = 0

    def add(self, book: Book, ids: np.ndarray, chunks: list[ChunkSpan]) -> None:
        """A book's chunks, which cover its text in order (as `cut_chunks` makes them)."""
        rows = self.rows
        for c in chunks:
            rows["book_id"].append(book.book_id)
            rows["title"].append(book.title)
            rows["chunk_index"].append(c.index)
            rows["num_chunks"].append(len(chunks))
            rows["char_start"].append(c.char_start)
            rows["char_end"].append(c.char_end)
            rows["num_tokens"].append(c.token_end - c.token_start)
        token_ends = np.fromiter((c.token_end for c in chunks), np.int64, len(chunks))
        self.token_offsets.append(token_ends + self._total_tokens)
        self.token_arrays.append(ids)
        data = book.text.encode()
        char_ends = np.fromiter((c.char_end for c in chunks), np.int64, len(chunks))
        self.text_offsets.append(utf8_offsets(data, char_ends) + self._total_bytes)
        self.text_bytes.append(data)
        self._total_tokens += len(ids)
        self._total_bytes += len(data)
        self.num_rows += len(chunks)
        self.num_chars += len(book.text)

    def to_table(self) -> pa.Table:
        offsets = np.concatenate(self.token_offsets).astype(np.int32)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(self.token_arrays)))
        data, text_offsets = pa.py_buffer(b"".join(self.text_bytes)), pa.py_buffer(np.concatenate(self.text_offsets))
        text = pa.LargeStringArray.from_buffers(self.num_rows, text_offsets, data).cast(pa.string())
        built = {"tokens": tokens, "text": text}
        arrays = [built[f.name] if f.name in built else pa.array(self.rows[f.name], f.type) for f in CHUNK_SCHEMA]
        return pa.Table.from_arrays(arrays, schema=CHUNK_SCHEMA)


class Chunk(beam.PTransform):
    """Book files (`config.input`) -> CHUNK_SCHEMA tables, deduplicated, tokenized with `tokenizer`
    (a manifest entry), and every dead letter of the stage, reading included."""

    def __init__(self, config: ChunkConfig, tokenizer: dict, stage: str = STAGE):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.stage = stage

    def expand(self, pbegin: beam.pvalue.PBegin) -> StageOutput:
        max_bytes = self.config.max_record_bytes
        paths = pbegin | "Files" >> FilePaths(self.config.input, "books (JSONL, Parquet or .txt)")
        keys = paths | "Index" >> route(self.stage, BookIndexer(self.stage, max_bytes))
        unique = (
            keys.out
            | "ByText" >> beam.Map(lambda b: (b.text_sha256, b))
            | "GroupByText" >> beam.GroupByKey()
            | "KeepFirstCopy" >> beam.FlatMap(KeepFirstCopy(self.stage))
            | "ById" >> beam.Map(lambda b: (b.book_id, b))
            | "GroupById" >> beam.GroupByKey()
            | "RejectConflictingIds" >> route(self.stage, reject_conflicting_ids)
        )
        kept = beam.pvalue.AsMultiMap(unique.out | "KeptByFile" >> beam.Map(lambda b: (b.source, b.locator)))
        tables = (
            paths
            | "ReadKept" >> beam.FlatMap(lambda path, kept: read_kept_books(path, kept[path], max_bytes), kept)
            | "TokenizeAndChunk" >> route(self.stage, TokenizeAndChunk(self.stage, self.config, self.tokenizer))
        )
        errors = merge_errors(keys[ERRORS], unique[ERRORS], tables[ERRORS], label="ChunkErrors")
        return StageOutput(tables.out, errors)


def run(config: ChunkConfig, beam_args: list[str] | None = None) -> dict:
    """The stand-alone chunk job: Chunk | write; returns its manifest."""
    tokenizer = load_tokenizer(config.tokenizer).entry
    return run_stage(
        STAGE,
        config,
        lambda pipeline: pipeline | "Chunk" >> Chunk(config, tokenizer),
        CHUNK_SCHEMA,
        beam_args,
        tokenizer,
    )
