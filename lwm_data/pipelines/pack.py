"""Unpacked examples -> fixed-length packed rows (masked sequence packing; see lwm_data.packing).

Packing is decided on lengths alone, so the token data moves once, straight to its row:

    input shards --ReadRefs--> ExampleRef per example (+ dead letters)      [parallel, per shard]
        chunk-stage shards: chunk refs --GroupByKey(book)--> one `text` ExampleRef per book
    all refs --ToList--> Plan (seeded shuffle, overflow, mix, best-fit-decreasing)   [one worker]
        --> Segment per packed piece, keyed by row batch
        --> FragmentRequest per (piece, source row), keyed by shard
    requests --GroupByKey(shard)--> ReadFragments: each shard read once, slices cut
    segments + fragments --GroupByKey(row batch)--> AssembleRows --> PACKED_SCHEMA tables

Inputs are directories in EXAMPLE_SCHEMA (chat, vision, text, ...) or the chunk stage's CHUNK_SCHEMA
output. A book's chunks become one `text` example: BOS, then every chunk's tokens in order, loss
weight 1 on every token (packing zeroes each segment's first token, here the BOS), so plain book
text is packed through the chunk stage; over-long books need `--overflow split`.

Counts (unit: examples; a book from chunk input is one example): `in` = examples read, `out` =
examples packed (split pieces count once); filtered: too_long, not_in_mix, mix_excess;
dead-lettered: malformed examples and incomplete books. Stats: rows, tokens, pad_tokens, segments,
tokens_<kind>, truncated, truncated_tokens, split, split_pieces; the manifest's `packing` section
adds fill efficiency and segments per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lwm_data import io
from lwm_data.packing import PackOptions, build_rows, packed_table, plan_packing, split_over_parts, tokens_by_kind
from lwm_data.pipelines.common import StageOutputs, count, dead_letter, run_stage, upstream_tokenizer
from lwm_data.schemas import EXAMPLE_SCHEMA, PACKED_SCHEMA, STAGE_SCHEMAS
from lwm_data.tokenizers import load_tokenizer

STAGE = "pack"
EXAMPLES = "examples"
CHUNKS = "chunks"
TOKENS_PER_BATCH = 1 << 22  # rows are assembled and written in batches of about this many tokens


@dataclass(frozen=True)
class PackConfig:
    input: str  # comma-separated directories
    output: str
    seq_len: int
    mix: dict[str, float] | None = None
    loss_weighting: str = "token"
    overflow: str = "drop"
    buffer: int = 10_000
    max_open_rows: int = 64
    seed: int = 0
    bos_id: int | None = None  # for chunk inputs; default: the chunk stage's tokenizer's BOS

    def __post_init__(self):
        self.options  # noqa: B018 - building PackOptions validates the settings before any work

    @property
    def options(self) -> PackOptions:
        return PackOptions(
            seq_len=self.seq_len, overflow=self.overflow, loss_weighting=self.loss_weighting, mix=self.mix,
            buffer_size=self.buffer, max_open_rows=self.max_open_rows, seed=self.seed,
        )

    @property
    def input_dirs(self) -> list[str]:
        return [d.strip() for d in self.input.split(",") if d.strip()]


class InputShard(NamedTuple):
    input_index: int
    format: str  # EXAMPLES or CHUNKS
    path: str
    bos_id: int  # prepended to a book's first chunk (CHUNKS only)


class Part(NamedTuple):
    """Tokens of an example held by one source row (a chunk row holds part of a book)."""

    path: str
    row: int
    num_tokens: int  # including the BOS added before a book's first chunk
    with_bos: bool


class ExampleRef(NamedTuple):
    input_index: int
    example_id: str
    kind: str
    splittable: bool
    parts: tuple[Part, ...]

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)


class ChunkRef(NamedTuple):
    chunk_index: int
    num_chunks: int
    part: Part
    problem: str  # "" when the chunk row is well formed


class Segment(NamedTuple):
    row: int
    segment: int
    example_id: str
    kind: str
    piece_start: int
    length: int


class FragmentRequest(NamedTuple):
    source_row: int
    source_start: int
    source_end: int
    row: int
    segment: int
    offset: int  # where the fragment starts in its segment
    with_bos: bool


class Fragment(NamedTuple):
    row: int
    segment: int
    offset: int
    tokens: np.ndarray
    loss_weights: np.ndarray
    vision_mask: np.ndarray


def discover_inputs(config: PackConfig) -> list[InputShard]:
    """Every input shard with its format, from each directory's manifest."""
    shards = []
    for index, directory in enumerate(config.input_dirs):
        manifest = io.read_manifest(directory)
        stage = manifest.get("stage")
        if stage == "chunk":
            bos_id = config.bos_id if config.bos_id is not None else _tokenizer_bos(manifest)
            shards.extend(InputShard(index, CHUNKS, p, bos_id) for p in io.list_shards(directory))
        elif STAGE_SCHEMAS.get(stage) is EXAMPLE_SCHEMA:
            shards.extend(InputShard(index, EXAMPLES, p, -1) for p in io.list_shards(directory))
        else:
            raise ValueError(f"{directory}: stage {stage!r} holds neither examples nor chunks")
    return shards


def _tokenizer_bos(manifest: dict) -> int:
    tokenizer = manifest.get("tokenizer") or {}
    bos_id = load_tokenizer(tokenizer.get("path")).bos_id
    if bos_id < 0:
        raise ValueError("the chunk stage's tokenizer has no BOS token; pass --bos-id")
    return bos_id


def _list_lengths(table: pa.Table, column: str) -> np.ndarray:
    return pc.list_value_length(table[column]).fill_null(-1).to_numpy(zero_copy_only=False)


def _flagged_per_row(lists: pa.ChunkedArray, flags: np.ndarray) -> np.ndarray:
    """How many values of each row's list are flagged (`flags`: one per value, rows concatenated)."""
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    flagged_before = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return np.diff(flagged_before[np.concatenate([[0], np.cumsum(lengths)])])


def example_problems(table: pa.Table) -> list[str]:
    """Why each EXAMPLE_SCHEMA row cannot be packed ("" when it can), vectorised per column."""
    num_tokens = table["num_tokens"].to_numpy(zero_copy_only=False)
    weights = pc.list_flatten(table["loss_weights"]).to_numpy(zero_copy_only=False)
    checks = [  # later checks win: the most basic problem is reported
        (_flagged_per_row(table["loss_weights"], ~np.isfinite(weights) | (weights < 0)) > 0, "bad_loss_weights"),
        (_list_lengths(table, "vision_mask") != num_tokens, "length_mismatch"),
        (_list_lengths(table, "loss_weights") != num_tokens, "length_mismatch"),
        (_list_lengths(table, "tokens") != num_tokens, "length_mismatch"),
        (num_tokens < 1, "empty_example"),
    ]
    problems = np.full(table.num_rows, "", dtype=object)
    for mask, reason in checks:
        problems[mask] = reason
    return problems.tolist()


class ReadRefs(beam.DoFn):
    """One input shard -> an ExampleRef per example, or (book key, ChunkRef) per chunk row."""

    CHUNK_REFS = "chunks"

    def process(self, shard: InputShard) -> Iterable:
        table = io.read_shard(shard.path)
        if shard.format == CHUNKS:
            yield from self._chunk_refs(shard, table)
        else:
            yield from self._example_refs(shard, table)

    def _example_refs(self, shard: InputShard, table: pa.Table) -> Iterable:
        ids, kinds = table["example_id"].to_pylist(), table["kind"].to_pylist()
        num_tokens = table["num_tokens"].to_pylist()
        vision = pc.list_flatten(table["vision_mask"]).to_numpy(zero_copy_only=False).astype(bool)
        vision_counts = _flagged_per_row(table["vision_mask"], vision)
        for row, problem in enumerate(example_problems(table)):
            count("in")
            if problem:
                yield dead_letter(STAGE, problem, shard.path, f"row {row}", f"example {ids[row]!r}", ids[row] or "")
                continue
            part = Part(shard.path, row, num_tokens[row], False)
            splittable = kinds[row] == "text" and vision_counts[row] == 0
            yield ExampleRef(shard.input_index, ids[row], kinds[row], splittable, (part,))

    def _chunk_refs(self, shard: InputShard, table: pa.Table) -> Iterable:
        lengths = _list_lengths(table, "tokens")
        columns = {c: table[c].to_pylist() for c in ("book_id", "chunk_index", "num_chunks", "num_tokens")}
        for row in range(table.num_rows):
            first = columns["chunk_index"][row] == 0
            length = int(lengths[row])
            problem = "" if length == columns["num_tokens"][row] else "tokens length != num_tokens"
            part = Part(shard.path, row, length + first, first)
            chunk = ChunkRef(columns["chunk_index"][row], columns["num_chunks"][row], part, problem)
            yield beam.pvalue.TaggedOutput(self.CHUNK_REFS, ((shard.input_index, columns["book_id"][row]), chunk))


def book_problem(chunks: list[ChunkRef]) -> str:
    """Why a book's chunks do not make one example ("" when they do): each of 0..n-1 exactly once."""
    bad = [c.problem for c in chunks if c.problem]
    if bad:
        return bad[0]
    indices = sorted(c.chunk_index for c in chunks)
    if indices != list(range(len(chunks))) or any(c.num_chunks != len(chunks) for c in chunks):
        shown = f"{indices[:8]}{'...' if len(indices) > 8 else ''}"
        return f"chunk indices {shown} are not 0..{chunks[0].num_chunks - 1} once each"
    return ""


class BookRefs(beam.DoFn):
    """A book's chunk refs -> one `text` ExampleRef (BOS + chunks in order), or a dead letter."""

    def process(self, keyed: tuple[tuple[int, str], Iterable[ChunkRef]]) -> Iterable:
        (input_index, book_id), chunks = keyed
        chunks = sorted(chunks, key=lambda c: (c.chunk_index, c.part.path, c.part.row))
        count("in")
        problem = book_problem(chunks)
        if problem:
            yield dead_letter(STAGE, "incomplete_book", chunks[0].part.path, f"book {book_id}", problem, book_id)
            return
        yield ExampleRef(input_index, book_id, "text", True, tuple(c.part for c in chunks))


class Plan(beam.DoFn):
    """All refs -> Segments (main output) and FragmentRequests keyed by shard ("requests")."""

    REQUESTS = "requests"

    def __init__(self, options: PackOptions, formats: dict[str, tuple[str, int]]):
        self.options = options
        self.formats = formats  # shard path -> (format, bos_id)

    def process(self, refs: list[ExampleRef]) -> Iterable:
        refs = sorted(refs, key=lambda r: (r.input_index, r.example_id, r.parts[0].path, r.parts[0].row))
        lengths = np.fromiter((r.num_tokens for r in refs), np.int64, len(refs))
        kinds = np.array([r.kind for r in refs], dtype=object)
        splittable = np.fromiter((r.splittable for r in refs), bool, len(refs))
        plan = plan_packing(lengths, kinds, splittable, self.options)
        for name, value in plan.counts.items():
            count(name, value)
        count("out", plan.num_examples)
        count("rows", plan.num_rows)
        rows_per_batch = max(1, TOKENS_PER_BATCH // self.options.seq_len)
        for example, start, length, row, segment in zip(
            plan.example.tolist(), plan.start.tolist(), plan.length.tolist(), plan.row.tolist(), plan.segment.tolist()
        ):
            ref = refs[example]
            yield row // rows_per_batch, Segment(row, segment, ref.example_id, ref.kind, start, length)
            part_lengths = [p.num_tokens for p in ref.parts]
            for part_index, lo, hi, offset in split_over_parts(part_lengths, start, length):
                part = ref.parts[part_index]
                request = FragmentRequest(part.row, lo, hi, row, segment, offset, part.with_bos)
                yield beam.pvalue.TaggedOutput(self.REQUESTS, ((part.path, *self.formats[part.path]), request))


class ReadFragments(beam.DoFn):
    """One shard's requests -> Fragments keyed by row batch; the shard is read once."""

    def __init__(self, seq_len: int):
        self.rows_per_batch = max(1, TOKENS_PER_BATCH // seq_len)

    def process(self, keyed: tuple[tuple[str, str, int], Iterable[FragmentRequest]]) -> Iterable:
        (path, fmt, bos_id), requests = keyed
        columns = ["tokens"] if fmt == CHUNKS else ["tokens", "loss_weights", "vision_mask"]
        source = _SourceRows(io.read_shard(path, columns))
        for r in requests:
            tokens, weights, vision = source.part(r.source_row, r.with_bos, bos_id)
            lo, hi = r.source_start, r.source_end
            fragment = Fragment(r.row, r.segment, r.offset, tokens[lo:hi], weights[lo:hi], vision[lo:hi])
            yield r.row // self.rows_per_batch, fragment


class _SourceRows:
    """Row slices of a shard's token columns; chunk shards get weight 1, no vision, optional BOS."""

    def __init__(self, table: pa.Table):
        tokens = table["tokens"].combine_chunks()
        self.offsets = np.asarray(tokens.offsets, np.int64)
        self.tokens = pc.list_flatten(tokens).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        self.weights = self.vision = None
        if "loss_weights" in table.column_names:
            self.weights = pc.list_flatten(table["loss_weights"]).to_numpy(zero_copy_only=False).astype(np.float32)
            self.vision = pc.list_flatten(table["vision_mask"]).to_numpy(zero_copy_only=False).astype(bool)

    def part(self, row: int, with_bos: bool, bos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.offsets[row] - self.offsets[0], self.offsets[row + 1] - self.offsets[0]
        tokens = self.tokens[lo:hi]
        if self.weights is not None:
            return tokens, self.weights[lo:hi], self.vision[lo:hi]
        if with_bos:
            tokens = np.concatenate([np.array([bos_id], np.int32), tokens])
        return tokens, np.ones(len(tokens), np.float32), np.zeros(len(tokens), bool)


class AssembleRows(beam.DoFn):
    """A batch of rows' segments and fragments -> one PACKED_SCHEMA table."""

    def __init__(self, seq_len: int, loss_weighting: str):
        self.seq_len = seq_len
        self.loss_weighting = loss_weighting

    def process(self, keyed: tuple[int, Iterable]) -> Iterable[pa.Table]:
        _, items = keyed
        segments = sorted(i for i in items if isinstance(i, Segment))
        fragments = [i for i in items if isinstance(i, Fragment)]
        rows = np.array([s.row for s in segments], np.int64)
        row_ids, local_rows = np.unique(rows, return_inverse=True)
        lengths = np.array([s.length for s in segments], np.int64)
        first_token = np.cumsum(lengths) - lengths
        where = {(s.row, s.segment): int(first) for s, first in zip(segments, first_token)}
        total = int(lengths.sum())
        tokens, weights, vision = np.zeros(total, np.int32), np.zeros(total, np.float32), np.zeros(total, bool)
        for f in fragments:
            at = where[(f.row, f.segment)] + f.offset
            tokens[at : at + len(f.tokens)] = f.tokens
            weights[at : at + len(f.tokens)] = f.loss_weights
            vision[at : at + len(f.tokens)] = f.vision_mask
        columns = build_rows(
            tokens, weights, vision, lengths, local_rows, len(row_ids), self.seq_len, self.loss_weighting
        )
        kinds = [s.kind for s in segments]
        piece_starts = np.array([s.piece_start for s in segments], np.int64)
        table = packed_table(columns, [s.example_id for s in segments], kinds, piece_starts)
        pad = int(pc.sum(table["num_pad_tokens"]).as_py())
        count("segments", len(segments))
        count("tokens", total)
        count("pad_tokens", pad)
        for kind, kind_tokens in tokens_by_kind(kinds, lengths).items():
            count(f"tokens_{kind}", kind_tokens)
        yield table


def build(pipeline: beam.Pipeline, config: PackConfig, shards: list[InputShard]) -> StageOutputs:
    read = (
        pipeline
        | "Shards" >> beam.Create(shards)
        | "SpreadShards" >> beam.Reshuffle()
        | "ReadRefs" >> beam.ParDo(ReadRefs()).with_outputs(ReadRefs.CHUNK_REFS, "errors", main="refs")
    )
    books = (
        read[ReadRefs.CHUNK_REFS]
        | "GroupChunksByBook" >> beam.GroupByKey()
        | "BookRefs" >> beam.ParDo(BookRefs()).with_outputs("errors", main="refs")
    )
    formats = {s.path: (s.format, s.bos_id) for s in shards}
    plan = (
        (read.refs, books.refs)
        | "AllRefs" >> beam.Flatten()
        | "ToList" >> beam.combiners.ToList()
        | "Plan" >> beam.ParDo(Plan(config.options, formats)).with_outputs(Plan.REQUESTS, main="segments")
    )
    fragments = (
        plan[Plan.REQUESTS]
        | "GroupByShard" >> beam.GroupByKey()
        | "ReadFragments" >> beam.ParDo(ReadFragments(config.seq_len))
    )
    tables = (
        (plan.segments, fragments)
        | "SegmentsAndFragments" >> beam.Flatten()
        | "GroupByRowBatch" >> beam.GroupByKey()
        | "AssembleRows" >> beam.ParDo(AssembleRows(config.seq_len, config.loss_weighting))
    )
    return StageOutputs(tables, [read.errors, books.errors])


def packing_summary(manifest: dict, seq_len: int) -> dict:
    """The manifest's `packing` section: fill efficiency, segments per row, tokens by kind, overflow."""
    stats, counts = manifest["stats"], manifest["counts"]
    rows = stats.get("rows", 0)
    return {
        "seq_len": seq_len,
        "rows": rows,
        "fill_efficiency": round(stats.get("tokens", 0) / (rows * seq_len), 6) if rows else 0.0,
        "segments_per_row": round(stats.get("segments", 0) / rows, 4) if rows else 0.0,
        "tokens_by_kind": {k.removeprefix("tokens_"): v for k, v in stats.items() if k.startswith("tokens_")},
        "dropped_too_long": counts["filtered"].get("too_long", 0),
        "truncated": stats.get("truncated", 0),
        "truncated_tokens": stats.get("truncated_tokens", 0),
        "split": stats.get("split", 0),
        "split_pieces": stats.get("split_pieces", 0),
    }


def run(config: PackConfig, beam_args: list[str] | None = None) -> dict:
    """Run the pack job; returns its manifest (with a `packing` section)."""
    tokenizer = upstream_tokenizer(list(config.input_dirs))  # first: refuses mixed tokenizers
    shards = discover_inputs(config)
    manifest = run_stage(
        STAGE, config.output, PACKED_SCHEMA, lambda p: build(p, config, shards), config.__dict__, beam_args, tokenizer
    )
    manifest["packing"] = packing_summary(manifest, config.seq_len)
    io.write_json(io.join(config.output, io.MANIFEST), manifest)
    return manifest
