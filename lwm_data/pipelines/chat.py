"""Chunks + QA pairs -> long-context chat examples (EXAMPLE_SCHEMA, kind "chat"), one or more lengths.

    chunk tables --SplitByBook--> (book_id, rows) --+
                                                    +--CoGroupByKey--> AssembleChats --> EXAMPLE tables
    QA tables    --SplitByBook--> (book_id, rows) --+

The layout of an example, the windows and the QA sampling are in lwm_data.text.chat.

Counts are per (book, context length): `in` = books x lengths; `out` = those that gave at least one
example; filtered: `shorter_than_<L>` (the book does not fill one window of L), `no_qa_<L>` (no window
had a usable QA pair); dead-lettered: `incomplete_book` (chunk rows that do not tile the book) and
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

from collections.abc import Iterable
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

from lwm_data.config import nested, setting
from lwm_data.errors import Rejection
from lwm_data.examples import Example, examples_to_table
from lwm_data.outputs import DeadLetterPolicy, read_manifest
from lwm_data.pipelines.common import ERRORS, Counters, ReadStage, StageOutput, TokenizerStep, route, run_stage
from lwm_data.schemas import EXAMPLE_SCHEMA
from lwm_data.text.chat import BookTally, ChatConfig, QATurn, book_examples, encode_turns, qa_pairs_from_table
from lwm_data.text.chunking import BookChunks, book_chunks_from_table, split_by_book
from lwm_data.tokenizers import require_eos, resolve_tokenizer

STAGE = "chat"
CHUNK_COLUMNS = ["book_id", "chunk_index", "num_chunks", "num_tokens", "text", "tokens"]
QA_COLUMNS = ["book_id", "chunk_index", "pairs"]


@dataclass(frozen=True)
class ChatStageConfig:
    chunks: str = setting(help="Chunk stage output directory.")
    qa: str = setting(help="QA stage output directory.")
    output: str = setting(help="Output directory.")
    tokenizer: str | None = setting(
        None, "A copy of the chunk stage's tokenizer, where its recorded path is not reachable."
    )
    flush_tokens: int = setting(1_000_000, "Examples are written in tables of about this many tokens.")
    chat: ChatConfig = nested(ChatConfig)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)


class AssembleChats(TokenizerStep):
    """Step: one book's chunk and QA tables -> tables of its chat examples at every length."""

    def __init__(self, stage: str, config: ChatStageConfig, tokenizer: dict):
        super().__init__(tokenizer)
        self.count = Counters(stage)
        self.config = config
        self.chat = config.chat

    def __call__(self, grouped: tuple[str, dict[str, list[pa.Table]]]) -> Iterable[pa.Table | Rejection]:
        book_id, parts = grouped
        lengths = self.chat.context_lengths
        self.count("in", len(lengths))
        chunk_tables, qa_tables = list(parts["chunks"]), list(parts["qa"])
        try:
            if not chunk_tables:
                raise Rejection("qa_without_chunks", "QA rows for a book with no chunks", book_id, book_id)
            book = book_chunks_from_table(book_id, pa.concat_tables(chunk_tables))
        except Rejection as rejection:  # one letter per length, so counts stay per (book, length)
            yield from [rejection] * len(lengths)
            return
        turns = encode_turns(self._pairs(qa_tables, book.num_chunks), self.tokenizer, self.chat.template)
        usable = [t for t in turns if t.max_tokens <= self.chat.max_turn_tokens]
        self.count("qa_pairs_too_long", len(turns) - len(usable))
        for context_length in lengths:
            yield from self._one_length(book, usable, context_length)

    def _pairs(self, qa_tables: list[pa.Table], num_chunks: int) -> list[tuple[int, str, str]]:
        if not qa_tables:
            return []
        qa = pa.concat_tables(qa_tables)
        index = qa["chunk_index"]
        inside = pc.and_(pc.greater_equal(index, 0), pc.less(index, num_chunks))
        self.count("qa_rows_unmatched", qa.num_rows - int(pc.sum(inside).as_py() or 0))
        qa = qa.filter(inside)
        pairs = qa_pairs_from_table(qa)
        self.count("qa_pairs_blank", int(pc.sum(pc.list_value_length(qa["pairs"])).as_py() or 0) - len(pairs))
        return pairs

    def _one_length(self, book: BookChunks, turns: list[QATurn], context_length: int) -> Iterable[pa.Table]:
        tally = BookTally()
        pending: list[Example] = []
        pending_tokens = 0
        for example in book_examples(book, turns, context_length, self.chat, self.tokenizer, tally):
            pending.append(example)
            pending_tokens += example.num_tokens
            self.count("tokens", example.num_tokens)
            self.count("qa_turns", len(example.meta["qa_chunks"]))
            if pending_tokens >= self.config.flush_tokens:
                yield examples_to_table(pending)
                pending, pending_tokens = [], 0
        if pending:
            yield examples_to_table(pending)
        self.count("windows_without_qa", tally.windows_without_qa)
        if tally.examples:
            self.count("out")
            self.count("examples", tally.examples)
            self.count(f"examples_{context_length}", tally.examples)
        elif tally.windows == 0:
            self.count(f"filtered.shorter_than_{context_length}")
        else:
            self.count(f"filtered.no_qa_{context_length}")


class Chat(beam.PTransform):
    """{"chunks": chunk tables, "qa": QA tables} -> EXAMPLE_SCHEMA tables of kind chat.

    `tokenizer`: the manifest entry of the tokenizer that made the chunks.
    """

    def __init__(self, config: ChatStageConfig, tokenizer: dict, stage: str = STAGE):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.stage = stage
        require_eos(resolve_tokenizer(tokenizer), "the chat stage")  # here, not on every worker

    def expand(self, inputs: dict[str, beam.PCollection]) -> StageOutput:
        by_book = {
            name: inputs[name] | f"Split{name.title()}ByBook" >> beam.FlatMap(split_by_book)
            for name in ("chunks", "qa")
        }
        assembled = (
            by_book
            | "GroupByBook" >> beam.CoGroupByKey()
            | "AssembleChats" >> route(self.stage, AssembleChats(self.stage, self.config, self.tokenizer))
        )
        return StageOutput(assembled.out, assembled[ERRORS])


def run(config: ChatStageConfig, beam_args: list[str] | None = None) -> dict:
    """The stand-alone chat job: read chunks and QA | Chat | write; returns its manifest."""
    recorded = read_manifest(config.chunks, ("chunk",), "--chunks").get("tokenizer")
    read_manifest(config.qa, ("qa",), "--qa")
    tokenizer = resolve_tokenizer(recorded, config.tokenizer).entry  # fails now, not on a worker

    def build(pipeline: beam.Pipeline) -> StageOutput:
        inputs = {
            "chunks": pipeline | "ReadChunks" >> ReadStage(config.chunks, CHUNK_COLUMNS),
            "qa": pipeline | "ReadQA" >> ReadStage(config.qa, QA_COLUMNS),
        }
        return inputs | "Chat" >> Chat(config, tokenizer)

    return run_stage(STAGE, config, build, EXAMPLE_SCHEMA, beam_args, tokenizer)
