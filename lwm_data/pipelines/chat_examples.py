"""Chunks + QA pairs -> long-context chat examples (EXAMPLE_SCHEMA, kind "chat"), one or more lengths.

    chunk shards --SplitByBook--> (book_id, rows) --+
                                                    +--CoGroupByKey--> AssembleChats --> Parquet shards
    QA shards    --SplitByBook--> (book_id, rows) --+

The layout of an example, the windows and the QA sampling are in lwm_data.chat.

Counts are per (book, context length): `in` = books x lengths; `out` = those that gave at least one
example; filtered: `shorter_than_<L>` (the book does not fill one window of L), `no_qa_<L>` (no window
had a usable QA pair); dead-lettered: `bad_chunks` (chunk rows that do not tile the book) and
`qa_without_chunks` (QA for a book with no chunks). Stats: examples, examples_<L>, tokens,
qa_turns, windows_without_qa, qa_pairs_blank, qa_pairs_too_long, qa_rows_unmatched. A chunk whose
QA is missing or was dead-lettered upstream still serves as context.

Memory per book of T tokens, whatever the number of windows or lengths: its chunk rows as read
(Arrow: 4 bytes/token + text), one int32 copy of its tokens and its chunk texts (about 8 bytes/token;
the tokens are never a Python list), its QA turns, and examples awaiting write, flushed every
`flush_tokens` tokens: about 13 bytes/token each (tokens, weights, mask, text), twice that while
converted to Arrow, plus the transient copies of building one example. benchmarks/bench_chat.py
measures a 1.1M-token book: Python/numpy peak about 15x its token array (4T bytes) at 1M context and
11x at 32K; resident memory, Arrow included, about 21x and 17x.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lwm_data import io
from lwm_data.chat import (
    BadChunks,
    BookChunks,
    ChatConfig,
    ChatTemplate,
    QATurn,
    WindowResult,
    book_chunks_from_table,
    book_examples,
    encode_turns,
    qa_pairs_from_table,
)
from lwm_data.lwm_format import Example, examples_to_table
from lwm_data.pipelines.common import (
    ERRORS,
    StageOutputs,
    count,
    dead_letter,
    run_stage,
)
from lwm_data.schemas import EXAMPLE_SCHEMA
from lwm_data.tokenizers import load_tokenizer

STAGE = "chat"
CHUNK_COLUMNS = ["book_id", "chunk_index", "num_chunks", "text", "tokens"]
QA_COLUMNS = ["book_id", "chunk_index", "pairs"]


@dataclass(frozen=True)
class ChatJobConfig:
    chunks: str
    qa: str
    output: str
    context_lengths: tuple[int, ...] = (32768,)
    pairs_per_example: int = 8
    stride: float = 1.0
    seed: int = 0
    tokenizer: str | None = None  # default: the one the chunk stage used (its manifest)
    system: str = ChatTemplate.system
    first_question: str = ChatTemplate.first_question
    next_question: str = ChatTemplate.next_question
    max_turn_tokens: int = 256  # longer QA turns are not used (each example reserves room for k of the longest)
    flush_tokens: int = 1_000_000

    @property
    def chat(self) -> ChatConfig:
        template = ChatTemplate(self.system, self.first_question, self.next_question)
        return ChatConfig(self.pairs_per_example, self.stride, self.seed, template)


def split_by_book(batch: pa.Table | pa.RecordBatch) -> Iterable[tuple[str, pa.Table]]:
    """(book_id, that book's rows) for each book in a batch of rows (zero-copy slices)."""
    table = (pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch).sort_by("book_id")
    ids = table["book_id"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, np.int64)
    for start, end in zip(starts, np.r_[starts[1:], len(ids)]):
        yield str(ids[start]), table.slice(int(start), int(end - start))


class AssembleChats(beam.DoFn):
    def __init__(self, config: ChatJobConfig, tokenizer_path: str | None):
        self.config = config
        self.tokenizer_path = tokenizer_path

    def setup(self) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_path)

    def process(self, grouped: tuple[str, dict[str, list[pa.Table]]]) -> Iterable:
        book_id, parts = grouped
        lengths = self.config.context_lengths
        count("in", len(lengths))
        chunk_tables, qa_tables = list(parts["chunks"]), list(parts["qa"])
        if not chunk_tables:
            for _ in lengths:
                yield dead_letter(STAGE, "qa_without_chunks", book_id, "", "QA rows for a book with no chunks")
            return
        try:
            book = book_chunks_from_table(book_id, pa.concat_tables(chunk_tables))
        except BadChunks as e:
            for _ in lengths:
                yield dead_letter(STAGE, "bad_chunks", book_id, "", str(e))
            return
        turns = encode_turns(self._pairs(qa_tables, book.num_chunks), self.tokenizer, self.config.chat.template)
        usable = [t for t in turns if t.max_tokens <= self.config.max_turn_tokens]
        count("qa_pairs_too_long", len(turns) - len(usable))
        for context_length in lengths:
            yield from self._one_length(book, usable, context_length)

    def _pairs(self, qa_tables: list[pa.Table], num_chunks: int) -> list[tuple[int, str, str]]:
        if not qa_tables:
            return []
        qa = pa.concat_tables(qa_tables)
        index = qa["chunk_index"]
        inside = pc.and_(pc.greater_equal(index, 0), pc.less(index, num_chunks))
        count("qa_rows_unmatched", qa.num_rows - int(pc.sum(inside).as_py() or 0))
        qa = qa.filter(inside)
        pairs = qa_pairs_from_table(qa)
        count("qa_pairs_blank", int(pc.sum(pc.list_value_length(qa["pairs"])).as_py() or 0) - len(pairs))
        return pairs

    def _one_length(self, book: BookChunks, turns: list[QATurn], context_length: int) -> Iterable[pa.Table]:
        result = WindowResult()
        pending: list[Example] = []
        pending_tokens = 0
        for example in book_examples(book, turns, context_length, self.config.chat, self.tokenizer, result):
            pending.append(example)
            pending_tokens += example.num_tokens
            count("tokens", example.num_tokens)
            count("qa_turns", len(example.meta["qa_chunks"]))
            if pending_tokens >= self.config.flush_tokens:
                yield examples_to_table(pending)
                pending, pending_tokens = [], 0
        if pending:
            yield examples_to_table(pending)
        count("windows_without_qa", result.windows_without_qa)
        if result.examples:
            count("out")
            count("examples", result.examples)
            count(f"examples_{context_length}", result.examples)
        elif result.windows == 0:
            count(f"filtered.shorter_than_{context_length}")
        else:
            count(f"filtered.no_qa_{context_length}")


def read_by_book(pipeline: beam.Pipeline, directory: str, columns: list[str], label: str) -> beam.PCollection:
    if not io.list_shards(directory):
        return pipeline | f"No{label}" >> beam.Create([])
    return (
        pipeline
        | f"Read{label}" >> beam.io.ReadFromParquetBatched(io.shard_pattern(directory), columns=columns)
        | f"Split{label}ByBook" >> beam.FlatMap(split_by_book)
    )


def build(pipeline: beam.Pipeline, config: ChatJobConfig, tokenizer_path: str | None) -> StageOutputs:
    chunks = read_by_book(pipeline, config.chunks, CHUNK_COLUMNS, "Chunks")
    qa = read_by_book(pipeline, config.qa, QA_COLUMNS, "QA")
    assembled = (
        {"chunks": chunks, "qa": qa}
        | "GroupByBook" >> beam.CoGroupByKey()
        | "AssembleChats" >> beam.ParDo(AssembleChats(config, tokenizer_path)).with_outputs(ERRORS, main="tables")
    )
    return StageOutputs(assembled.tables, assembled[ERRORS])


def chunk_tokenizer_path(chunks_dir: str, requested: str | None) -> str | None:
    """The tokenizer to use: the requested one, which must be the chunk stage's (same sha256), or the
    chunk stage's own, as recorded in its manifest."""
    recorded = io.read_manifest(chunks_dir).get("tokenizer") or {}
    if requested is None:
        return recorded.get("path")
    if recorded.get("sha256") and load_tokenizer(requested).sha256 != recorded["sha256"]:
        raise ValueError(
            f"tokenizer {requested} is not the one that made the chunks in {chunks_dir} ({recorded.get('path')})"
        )
    return requested


def run(config: ChatJobConfig, beam_args: list[str] | None = None) -> dict:
    """Run the chat job; returns its manifest."""
    if (
        any(length <= 0 for length in config.context_lengths)
        or config.pairs_per_example < 1
        or not 0 < config.stride <= 1
    ):
        raise ValueError("context lengths must be positive, pairs per example >= 1, stride in (0, 1]")
    tokenizer_path = chunk_tokenizer_path(config.chunks, config.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path)
    manifest_config = {**asdict(config), "context_lengths": list(config.context_lengths), "tokenizer": tokenizer_path}
    return run_stage(
        STAGE,
        config.output,
        EXAMPLE_SCHEMA,
        lambda p: build(p, config, tokenizer_path),
        manifest_config,
        beam_args,
        tokenizer,
    )
