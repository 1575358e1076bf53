"""Books -> ~1K-token chunks (the first step of LWM's long-context recipe).

    files --MatchFiles--> paths --ReadBooks--> normalised books (+ dead letters)
          --DropDuplicateBooks (by content, then by id)--> unique books
          --BatchElements (by characters)--> TokenizeAndChunk --> Parquet shards of CHUNK_SCHEMA

Counts: `in` = input records, `out` = books written; filtered: duplicate, too_short, too_long;
dead-lettered: bad records (see lwm_data.books) and conflicting ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io import fileio

from lwm_data.books import DEFAULT_MAX_RECORD_BYTES, Book, Rejection, read_books
from lwm_data.pipelines.common import ERRORS, StageOutputs, count, dead_letter, run_stage
from lwm_data.schemas import CHUNK_SCHEMA
from lwm_data.text import chunk_tokens
from lwm_data.tokenizers import load_tokenizer

STAGE = "chunk"


@dataclass(frozen=True)
class ChunkConfig:
    input: str
    output: str
    tokenizer: str | None = None
    chunk_tokens: int = 1000
    tolerance: float = 0.1
    min_book_tokens: int = 0
    max_book_tokens: int | None = None
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    batch_chars: int = 32_000_000  # characters tokenized per sentencepiece batch call


class ReadBooks(beam.DoFn):
    def __init__(self, max_record_bytes: int):
        self.max_record_bytes = max_record_bytes

    def process(self, path: str) -> Iterable:
        for item in read_books(path, self.max_record_bytes):
            count("in")
            if isinstance(item, Rejection):
                yield dead_letter(STAGE, item.reason, item.source, item.locator, item.detail, item.record)
            else:
                yield item


def _first_by_position(books: Iterable[Book]) -> list[Book]:
    """Books in input order: by file, then by line/row. A file's locators share their prefix
    ("line 9", "line 10"), so shorter first, then as text, is numeric order."""
    return sorted(books, key=lambda b: (b.source, len(b.locator), b.locator))


class KeepFirstCopy(beam.DoFn):
    """Of books with identical text, keep the first by (source, locator); count the rest."""

    def process(self, keyed: tuple[str, Iterable[Book]]) -> Iterable[Book]:
        first, *copies = _first_by_position(keyed[1])
        if copies:
            count("filtered.duplicate", len(copies))
        yield first


class RejectConflictingIds(beam.DoFn):
    """Books that share an id but differ in text: keep the first, dead-letter the others."""

    def process(self, keyed: tuple[str, Iterable[Book]]) -> Iterable:
        first, *others = _first_by_position(keyed[1])
        yield first
        for book in others:
            yield dead_letter(
                STAGE, "conflicting_id", book.source, book.locator,
                f"id {book.book_id!r} already used by {first.source} {first.locator} for a different text",
            )


class TokenizeAndChunk(beam.DoFn):
    """Tokenize a batch of books in one multi-threaded call, cut them, emit one table per batch."""

    def __init__(self, config: ChunkConfig):
        self.config = config

    def setup(self) -> None:
        self.tokenizer = load_tokenizer(self.config.tokenizer)

    def process(self, books: list[Book]) -> Iterable[pa.Table]:
        tokenized = self.tokenizer.encode_with_offsets([b.text for b in books])
        columns = _ChunkColumns()
        for book, tokens in zip(books, tokenized):
            if self._filtered(len(tokens.ids)):
                continue
            chunks = chunk_tokens(book.text, tokens, self.config.chunk_tokens, self.config.tolerance)
            columns.add(book, tokens.ids, chunks)
            count("out")
            count("chunks", len(chunks))
            count("tokens", len(tokens.ids))
        if columns.num_rows:
            yield columns.to_table()

    def _filtered(self, num_tokens: int) -> bool:
        if num_tokens < self.config.min_book_tokens:
            count("filtered.too_short")
            return True
        if self.config.max_book_tokens is not None and num_tokens > self.config.max_book_tokens:
            count("filtered.too_long")
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

    def add(self, book: Book, ids: np.ndarray, chunks) -> None:
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


def build(pipeline: beam.Pipeline, config: ChunkConfig) -> StageOutputs:
    read = (
        pipeline
        | "Match" >> fileio.MatchFiles(config.input)
        | "Paths" >> beam.Map(lambda m: m.path)
        | "SpreadFiles" >> beam.Reshuffle()
        | "ReadBooks" >> beam.ParDo(ReadBooks(config.max_record_bytes)).with_outputs(ERRORS, main="books")
    )
    unique = (
        read.books
        | "ByText" >> beam.Map(lambda b: (b.text_sha256, b))
        | "GroupByText" >> beam.GroupByKey()
        | "KeepFirstCopy" >> beam.ParDo(KeepFirstCopy())
        | "ById" >> beam.Map(lambda b: (b.book_id, b))
        | "GroupById" >> beam.GroupByKey()
        | "RejectConflictingIds" >> beam.ParDo(RejectConflictingIds()).with_outputs(ERRORS, main="books")
    )
    tables = (
        unique.books
        | "Batch" >> beam.BatchElements(
            # a fixed size (in characters): small batches would leave the tokenizer's threads idle
            min_batch_size=config.batch_chars, max_batch_size=config.batch_chars, element_size_fn=lambda b: len(b.text)
        )
        | "TokenizeAndChunk" >> beam.ParDo(TokenizeAndChunk(config))
    )
    return StageOutputs(tables, [read[ERRORS], unique[ERRORS]])


def run(config: ChunkConfig, beam_args: list[str] | None = None) -> dict:
    """Run the chunk job; returns its manifest."""
    tokenizer = load_tokenizer(config.tokenizer)
    return run_stage(
        STAGE, config.output, CHUNK_SCHEMA, lambda p: build(p, config), config.__dict__, beam_args, tokenizer
    )
