"""Books -> ~1K-token chunks (the first step of LWM's long-context recipe).

    files --ReadBooks--> normalised books (+ dead letters)                                  [read]
    books --DropDuplicateBooks (by content, then by id)--> unique books
          --BatchElements (by characters)--> TokenizeAndChunk --> CHUNK_SCHEMA tables       [Chunk]

Counts: `in` = input records, `out` = books written; filtered: duplicate, too_short, too_long;
dead-lettered: bad records (see lwm_data.text.books) and conflicting ids. Stats: chunks, tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    ReadFiles,
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
from lwm_data.text.chunking import cut_chunks
from lwm_data.tokenizers import load_tokenizer

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
    batch_chars: int = setting(32_000_000, "Characters tokenized per SentencePiece batch call.")
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)

    def __post_init__(self):
        if self.chunk_tokens < 1 or not 0 <= self.tolerance < 1:
            raise ConfigError("chunk_tokens must be positive and tolerance in [0, 1)")


class BookReader:
    """Step: one input file -> its books and rejections, each counted as an input record."""

    def __init__(self, stage: str, max_record_bytes: int):
        self.count = Counters(stage)
        self.max_record_bytes = max_record_bytes

    def __call__(self, path: str) -> Iterable[Book | Rejection]:
        for item in read_books(path, self.max_record_bytes):
            self.count("in")
            yield item


def read_book_files(pattern: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, stage: str = STAGE) -> ReadFiles:
    """The chunk stage's input: books from the files matching a glob, and the rejected records."""
    return ReadFiles(pattern, stage, BookReader(stage, max_record_bytes), "books (JSONL, Parquet or .txt)")


def _first_by_position(books: Iterable[Book]) -> list[Book]:
    """Books in input order: by file, then by line/row. A file's locators share their prefix
    ("line 9", "line 10"), so shorter first, then as text, is numeric order."""
    return sorted(books, key=lambda b: (b.source, len(b.locator), b.locator))


class KeepFirstCopy:
    """Step: of books with identical text, keep the first by (source, locator); count the rest."""

    def __init__(self, stage: str):
        self.count = Counters(stage)

    def __call__(self, keyed: tuple[str, Iterable[Book]]) -> Iterable[Book]:
        first, *copies = _first_by_position(keyed[1])
        self.count("filtered.duplicate", len(copies))
        yield first


def reject_conflicting_ids(keyed: tuple[str, Iterable[Book]]) -> Iterable[Book | Rejection]:
    """Step: books that share an id but differ in text: keep the first, reject the others."""
    first, *others = _first_by_position(keyed[1])
    yield first
    for book in others:
        detail = f"id {book.book_id!r} already used by {first.source} {first.locator} for a different text"
        yield Rejection("conflicting_id", detail, "", book.source, book.locator)


class TokenizeAndChunk(TokenizerStep):
    """Step: tokenize a batch of books in one multi-threaded call, cut them, one table per batch."""

    def __init__(self, stage: str, config: ChunkConfig, tokenizer: dict):
        super().__init__(tokenizer)
        self.count = Counters(stage)
        self.config = config

    def __call__(self, books: list[Book]) -> Iterable[pa.Table]:
        tokenized = self.tokenizer.encode_with_offsets([b.text for b in books])
        columns = _ChunkColumns()
        for book, tokens in zip(books, tokenized):
            if self._filtered(len(tokens.ids)):
                continue
            chunks = cut_chunks(book.text, tokens, self.config.chunk_tokens, self.config.tolerance)
            columns.add(book, tokens.ids, chunks)
            self.count("out")
            self.count("chunks", len(chunks))
            self.count("tokens", len(tokens.ids))
        if columns.num_rows:
            yield columns.to_table()

    def _filtered(self, num_tokens: int) -> bool:
        if num_tokens < self.config.min_book_tokens:
            self.count("filtered.too_short")
            return True
        if self.config.max_book_tokens is not None and num_tokens > self.config.max_book_tokens:
            self.count("filtered.too_long")
            return True
        return False


class _ChunkColumns:
    """Column buffers for CHUNK_SCHEMA; token lists are built from offsets, not per-token Python."""

    def __init__(self):
        self.rows: dict[str, list] = {name: [] for name in CHUNK_SCHEMA.names if name != "tokens"}
        self.token_arrays: list[np.ndarray] = []
        self.token_offsets: list[np.ndarray] = [np.zeros(1, np.int32)]
        self.num_rows = 0
        self._total_tokens = 0

    def add(self, book: Book, ids: np.ndarray, chunks: list[ChunkSpan]) -> None:
        rows = self.rows
        for c in chunks:
            rows["book_id"].append(book.book_id)
            rows["title"].append(book.title)
            rows["chunk_index"].append(c.index)
            rows["num_chunks"].append(len(chunks))
            rows["char_start"].append(c.char_start)
            rows["char_end"].append(c.char_end)
            rows["num_tokens"].append(c.token_end - c.token_start)
            rows["text"].append(book.text[c.char_start : c.char_end])
        ends = np.fromiter((c.token_end for c in chunks), np.int64, len(chunks))
        self.token_offsets.append((ends + self._total_tokens).astype(np.int32))
        self.token_arrays.append(ids)
        self._total_tokens += len(ids)
        self.num_rows += len(chunks)

    def to_table(self) -> pa.Table:
        tokens = pa.ListArray.from_arrays(
            pa.array(np.concatenate(self.token_offsets)), pa.array(np.concatenate(self.token_arrays))
        )
        arrays = [tokens if f.name == "tokens" else pa.array(self.rows[f.name], f.type) for f in CHUNK_SCHEMA]
        return pa.Table.from_arrays(arrays, schema=CHUNK_SCHEMA)


class Chunk(beam.PTransform):
    """Books -> CHUNK_SCHEMA tables, deduplicated, tokenized with `tokenizer` (a manifest entry)."""

    def __init__(self, config: ChunkConfig, tokenizer: dict, stage: str = STAGE):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.stage = stage

    def expand(self, books: beam.PCollection) -> StageOutput:
        unique = (
            books
            | "ByText" >> beam.Map(lambda b: (b.text_sha256, b))
            | "GroupByText" >> beam.GroupByKey()
            | "KeepFirstCopy" >> beam.FlatMap(KeepFirstCopy(self.stage))
            | "ById" >> beam.Map(lambda b: (b.book_id, b))
            | "GroupById" >> beam.GroupByKey()
            | "RejectConflictingIds" >> route(self.stage, reject_conflicting_ids)
        )
        batch_chars = self.config.batch_chars
        tables = (
            unique.out
            | "Batch"
            >> beam.BatchElements(
                # a fixed size (in characters): small batches would leave the tokenizer's threads idle
                min_batch_size=batch_chars,
                max_batch_size=batch_chars,
                element_size_fn=lambda b: len(b.text),
            )
            | "TokenizeAndChunk" >> route(self.stage, TokenizeAndChunk(self.stage, self.config, self.tokenizer))
        )
        return StageOutput(tables.out, merge_errors(unique[ERRORS], tables[ERRORS], label="ChunkErrors"))


def run(config: ChunkConfig, beam_args: list[str] | None = None) -> dict:
    """The stand-alone chunk job: ReadBooks | Chunk | write; returns its manifest."""
    tokenizer = load_tokenizer(config.tokenizer).entry

    def build(pipeline: beam.Pipeline) -> StageOutput:
        books = pipeline | "ReadBooks" >> read_book_files(config.input, config.max_record_bytes)
        chunks = books.records | "Chunk" >> Chunk(config, tokenizer)
        return StageOutput(chunks.rows, merge_errors(books.errors, chunks.errors))

    return run_stage(STAGE, config, build, CHUNK_SCHEMA, beam_args, tokenizer)
