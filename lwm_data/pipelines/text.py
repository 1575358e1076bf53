"""Chunks -> one plain-text example per book (EXAMPLE_SCHEMA, kind "text"): BOS, then the book's
chunk tokens in order, loss on every token after the BOS. Long books stay whole here; packing
splits them (`--overflow split`), the only kind it may split.

    chunk tables --SplitByBook--> (book_id, rows) --GroupByKey--> BookText --> EXAMPLE tables

Counts: `in` = books, `out` = examples; dead-lettered: incomplete_book (chunk rows that do not tile
the book). Stats: tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa

from lwm_data.config import nested, setting
from lwm_data.examples import examples_to_table
from lwm_data.outputs import DeadLetterPolicy, read_manifest
from lwm_data.pipelines.common import ERRORS, Counters, ReadStage, StageOutput, TokenizerStep, route, run_stage
from lwm_data.schemas import EXAMPLE_SCHEMA
from lwm_data.text.chunking import book_chunks_from_table, split_by_book, text_example
from lwm_data.tokenizers import bos_prefix, resolve_tokenizer

STAGE = "text"
CHUNK_COLUMNS = ["book_id", "title", "chunk_index", "num_chunks", "num_tokens", "text", "tokens"]


@dataclass(frozen=True)
class TextConfig:
    input: str = setting(help="Chunk stage output directory.")
    output: str = setting(help="Output directory.")
    tokenizer: str | None = setting(
        None, "A copy of the chunk stage's tokenizer, where its recorded path is not reachable."
    )
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)


class BookText(TokenizerStep):
    """Step: one book's chunk tables -> a one-row table with its text example."""

    def __init__(self, stage: str, tokenizer: dict):
        super().__init__(tokenizer)
        self.count = Counters(stage)

    def __call__(self, grouped: tuple[str, Iterable[pa.Table]]) -> Iterable[pa.Table]:
        book_id, tables = grouped
        self.count("in")
        table = pa.concat_tables(list(tables))
        book = book_chunks_from_table(book_id, table)
        example = text_example(book, bos_prefix(self.tokenizer), table["title"][0].as_py())
        self.count("out")
        self.count("tokens", example.num_tokens)
        yield examples_to_table([example])


class Text(beam.PTransform):
    """Chunk tables -> EXAMPLE_SCHEMA tables, one `text` example per book.

    `tokenizer`: the manifest entry of the tokenizer that made the chunks (for its BOS id).
    """

    def __init__(self, tokenizer: dict, stage: str = STAGE):
        super().__init__()
        self.tokenizer = tokenizer
        self.stage = stage

    def expand(self, chunks: beam.PCollection) -> StageOutput:
        books = (
            chunks
            | "SplitByBook" >> beam.FlatMap(split_by_book)
            | "GroupByBook" >> beam.GroupByKey()
            | "BookText" >> route(self.stage, BookText(self.stage, self.tokenizer))
        )
        return StageOutput(books.out, books[ERRORS])


def run(config: TextConfig, beam_args: list[str] | None = None) -> dict:
    """The stand-alone text job: read chunks | Text | write; returns its manifest."""
    recorded = read_manifest(config.input, ("chunk",), "text").get("tokenizer")
    tokenizer = resolve_tokenizer(recorded, config.tokenizer)

    def build(pipeline: beam.Pipeline) -> StageOutput:
        chunks = pipeline | "ReadChunks" >> ReadStage(config.input, CHUNK_COLUMNS)
        return chunks | "Text" >> Text(tokenizer.entry)

    return run_stage(STAGE, config, build, EXAMPLE_SCHEMA, beam_args, tokenizer.entry)
