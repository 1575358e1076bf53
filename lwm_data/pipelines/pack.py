"""Unpacked examples -> fixed-length packed rows (masked sequence packing; see lwm_data.packing).

Pack needs files by design: packing is decided on lengths alone, then the token data moves once,
straight to its row, read back from the input shards by path. So the `Pack` transform takes a
PCollection of EXAMPLE_SCHEMA shard paths: a stand-alone run lists them from its input directories'
manifests, a fused pipeline takes the paths its upstream `WriteStage` wrote (that boundary is
materialised).

    shard paths --ReadRefs--> ExampleRef per example (+ dead letters)          [parallel, per shard]
        reads example_id, kind, num_tokens and the small weight/mask columns: no tokens, no text
    all refs --ToList--> Plan (seeded shuffle, overflow, mix, fill_rows)   [one worker]
        (or, with --partition-tokens, refs hashed into partitions --GroupByKey--> one Plan each)
        --> Segment per packed piece, keyed by row batch
        --> FragmentRequest per piece, keyed by shard
    requests --GroupByKey(shard)--> ReadFragments: each shard read once, slices cut
    segments + fragments --GroupByKey(row batch)--> AssembleRows --> PACKED_SCHEMA tables

Plain book text comes from the `text` stage (chunks -> one example per book); over-long books need
`--overflow split`.

Counts (unit: examples): `in` = examples read, `out` = examples packed (split pieces count once);
filtered: too_long, not_in_mix, mix_excess; dead-lettered: malformed examples (empty_example,
length_mismatch, bad_loss_weights). Stats: rows, tokens, pad_tokens, segments, tokens_<kind>,
truncated, truncated_tokens, split, split_pieces; the manifest's `packing` section adds fill
efficiency and segments per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lwm_data import files, outputs
from lwm_data.arrays import flagged_per_list, flat_values, list_lengths
from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection
from lwm_data.examples import example_problems, splittable, tokens_by_kind
from lwm_data.lwm_format.layout import VISION_VOCAB_SIZE
from lwm_data.outputs import DeadLetterPolicy
from lwm_data.packing import (
    PackOptions,
    build_rows,
    fill_efficiency,
    num_partitions,
    packed_table,
    partition_of,
    partition_options,
    plan_packing,
)
from lwm_data.pipelines.common import (
    ERRORS,
    Counters,
    StageOutput,
    route,
    run_stage,
    upstream_tokenizer,
)
from lwm_data.schemas import EXAMPLE_SCHEMA, PACKED_SCHEMA
from lwm_data.tokenizers import resolve_tokenizer

STAGE = "pack"
TOKENS_PER_BATCH = 1 << 22  # rows are assembled and written in batches of about this many tokens
ROW_BITS = 40  # a row's id is partition << ROW_BITS | its row in the partition's plan
REF_COLUMNS = ["example_id", "kind", "num_tokens", "loss_weights", "vision_mask"]
TOKEN_COLUMNS = ["tokens", "loss_weights", "vision_mask"]


@dataclass(frozen=True)
class PackConfig:
    input: tuple[str, ...] = setting(help="Directories of examples (chat, text, import-lwm, ...), comma-separated.")
    output: str = setting(help="Output directory.")
    packing: PackOptions = nested(PackOptions)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)

    @property
    def rows_per_batch(self) -> int:
        return max(1, TOKENS_PER_BATCH // self.packing.seq_len)


class ExampleRef(NamedTuple):
    example_id: str
    kind: str
    splittable: bool
    path: str
    row: int
    num_tokens: int


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


class Fragment(NamedTuple):
    row: int
    segment: int
    tokens: np.ndarray
    loss_weights: np.ndarray
    vision_mask: np.ndarray


class ReadRefs:
    """Step: one shard -> an ExampleRef per example it holds, or a Rejection, each an input record.

    Reads only what planning needs; token lists are not tested here against `num_tokens` (that
    would mean reading them twice): ReadFragments refuses a shard whose tokens disagree with it."""

    def __init__(self, stage: str):
        self.count = Counters(stage)

    def __call__(self, path: str) -> Iterable[ExampleRef | Rejection]:
        table = outputs.read_shard(path, REF_COLUMNS)
        ids, kinds = table["example_id"].to_pylist(), table["kind"].to_pylist()
        num_tokens = table["num_tokens"].to_pylist()
        offsets = np.concatenate([[0], np.cumsum(list_lengths(table["vision_mask"], 0))])
        can_split = splittable(kinds, flagged_per_list(flat_values(table["vision_mask"], bool), offsets)).tolist()
        for row, problem in enumerate(example_problems(table)):
            self.count("in")
            if problem:
                yield Rejection(problem, f"example {ids[row]!r}", ids[row] or "", path, f"row {row}")
                continue
            yield ExampleRef(ids[row], kinds[row], can_split[row], path, row, num_tokens[row])


class Plan(beam.DoFn):
    """All refs -> Segments (main output) and FragmentRequests keyed by shard ("requests")."""

    REQUESTS = "requests"

    def __init__(self, stage: str, config: PackConfig):
        self.count = Counters(stage)
        self.options = config.packing
        self.rows_per_batch = config.rows_per_batch

    def process(self, partition_refs: tuple[int, Iterable[ExampleRef]]) -> Iterable:
        partition, refs = partition_refs
        # grouping order depends on the runner; the plan must not: sort by example id (then place)
        refs = sorted(refs, key=lambda r: (r.example_id, r.path, r.row))
        lengths = np.fromiter((r.num_tokens for r in refs), np.int64, len(refs))
        kinds = np.array([r.kind for r in refs], dtype=object)
        can_split = np.fromiter((r.splittable for r in refs), bool, len(refs))
        plan = plan_packing(lengths, kinds, can_split, partition_options(self.options, partition))
        first_row = partition << ROW_BITS  # rows of different partitions never meet
        self.count("partitions")
        for name, value in plan.counts.items():
            self.count(name, value)
        self.count("out", plan.num_examples)
        self.count("rows", plan.num_rows)
        for example, start, length, row, segment in zip(
            plan.example.tolist(), plan.start.tolist(), plan.length.tolist(), plan.row.tolist(), plan.segment.tolist()
        ):
            ref = refs[example]
            row += first_row
            yield row // self.rows_per_batch, Segment(row, segment, ref.example_id, ref.kind, start, length)
            request = FragmentRequest(ref.row, start, start + length, row, segment)
            yield beam.pvalue.TaggedOutput(self.REQUESTS, (ref.path, request))


class ReadFragments(beam.DoFn):
    """One shard's requests -> Fragments keyed by row batch; the shard is read once."""

    def __init__(self, rows_per_batch: int):
        self.rows_per_batch = rows_per_batch

    def process(self, keyed: tuple[str, Iterable[FragmentRequest]]) -> Iterable:
        path, requests = keyed
        source = _SourceRows(path)
        for r in requests:
            tokens, weights, vision = source.row(r.source_row)
            lo, hi = r.source_start, r.source_end
            yield r.row // self.rows_per_batch, Fragment(r.row, r.segment, tokens[lo:hi], weights[lo:hi], vision[lo:hi])


class _SourceRows:
    """Row slices of a shard's token columns."""

    def __init__(self, path: str):
        table = outputs.read_shard(path, TOKEN_COLUMNS + ["num_tokens"])
        self.offsets = np.concatenate([[0], np.cumsum(list_lengths(table["tokens"], 0))])
        if not np.array_equal(np.diff(self.offsets), table["num_tokens"].to_numpy()):
            raise ValueError(f"{path}: token lists disagree with num_tokens; `lwm-data validate` the input")
        self.tokens = flat_values(table["tokens"], np.int32)
        self.weights = flat_values(table["loss_weights"], np.float32)
        self.vision = flat_values(table["vision_mask"], bool)

    def row(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.offsets[row], self.offsets[row + 1]
        return self.tokens[lo:hi], self.weights[lo:hi], self.vision[lo:hi]


class AssembleRows(beam.DoFn):
    """A batch of rows' segments and fragments -> one PACKED_SCHEMA table."""

    def __init__(self, stage: str, options: PackOptions):
        self.count = Counters(stage)
        self.seq_len = options.seq_len
        self.loss_weighting = options.loss_weighting

    def process(self, keyed: tuple[int, Iterable]) -> Iterable[pa.Table]:
        _, items = keyed
        segments = sorted(i for i in items if isinstance(i, Segment))
        fragments = {(f.row, f.segment): f for f in items if isinstance(f, Fragment)}
        rows = np.array([s.row for s in segments], np.int64)
        row_ids, local_rows = np.unique(rows, return_inverse=True)
        lengths = np.array([s.length for s in segments], np.int64)
        pieces = [fragments[(s.row, s.segment)] for s in segments]
        tokens, weights, vision = (np.concatenate([getattr(p, c) for p in pieces]) for c in TOKEN_COLUMNS)
        columns = build_rows(
            tokens, weights, vision, lengths, local_rows, len(row_ids), self.seq_len, self.loss_weighting
        )
        kinds = [s.kind for s in segments]
        piece_starts = np.array([s.piece_start for s in segments], np.int64)
        table = packed_table(columns, [s.example_id for s in segments], kinds, piece_starts)
        self.count("segments", len(segments))
        self.count("tokens", int(lengths.sum()))
        self.count("pad_tokens", int(pc.sum(table["num_pad_tokens"]).as_py()))
        for kind, kind_tokens in tokens_by_kind(kinds, lengths).items():
            self.count(f"tokens_{kind}", kind_tokens)
        yield table


class Pack(beam.PTransform):
    """EXAMPLE_SCHEMA shard paths -> PACKED_SCHEMA tables (reads the shards by path, twice)."""

    def __init__(self, config: PackConfig, stage: str = STAGE):
        super().__init__()
        self.config = config
        self.stage = stage

    def expand(self, shard_paths: beam.PCollection) -> StageOutput:
        stage, config = self.stage, self.config
        refs = shard_paths | "SpreadShards" >> beam.Reshuffle() | "ReadRefs" >> route(stage, ReadRefs(stage))
        plan = self._partitions(refs.out) | "Plan" >> beam.ParDo(Plan(stage, config)).with_outputs(
            Plan.REQUESTS, main="segments"
        )
        fragments = (
            plan[Plan.REQUESTS]
            | "GroupByShard" >> beam.GroupByKey()
            | "ReadFragments" >> beam.ParDo(ReadFragments(config.rows_per_batch))
        )
        tables = (
            (plan.segments, fragments)
            | "SegmentsAndFragments" >> beam.Flatten()
            | "GroupByRowBatch" >> beam.GroupByKey()
            | "AssembleRows" >> beam.ParDo(AssembleRows(stage, config.packing))
        )
        return StageOutput(tables, refs[ERRORS])

    def _partitions(self, refs: beam.PCollection) -> beam.PCollection:
        """(partition, its refs): one group, or groups of about `partition_tokens` tokens."""
        partition_tokens = self.config.packing.partition_tokens
        if not partition_tokens:
            return (
                refs | "ToList" >> beam.combiners.ToList() | "OnePartition" >> beam.Map(lambda all_refs: (0, all_refs))
            )
        total = refs | "Lengths" >> beam.Map(lambda r: r.num_tokens) | "TotalTokens" >> beam.CombineGlobally(sum)

        def keyed(ref: ExampleRef, total_tokens: int) -> tuple[int, ExampleRef]:
            return partition_of(ref.example_id, num_partitions(total_tokens, partition_tokens)), ref

        return (
            refs
            | "Partition" >> beam.Map(keyed, total_tokens=beam.pvalue.AsSingleton(total))
            | "GroupByPartition" >> beam.GroupByKey()
        )


def packing_summary(manifest: dict, seq_len: int, vocabulary: dict[str, int] | None = None) -> dict:
    """The manifest's `packing` section: fill efficiency, segments per row, tokens by kind, overflow, and
    the vocabularies the rows' ids belong to (the trainer checks them against its model's)."""
    stats, counts = manifest["stats"], manifest["counts"]
    rows = stats.get("rows", 0)
    return {
        "seq_len": seq_len,
        "rows": rows,
        "fill_efficiency": fill_efficiency(stats.get("tokens", 0), rows * seq_len),
        "segments_per_row": round(stats.get("segments", 0) / rows, 4) if rows else 0.0,
        "tokens_by_kind": {k.removeprefix("tokens_"): v for k, v in stats.items() if k.startswith("tokens_")},
        "dropped_too_long": counts["filtered"].get("too_long", 0),
        "truncated": stats.get("truncated", 0),
        "truncated_tokens": stats.get("truncated_tokens", 0),
        "split": stats.get("split", 0),
        "split_pieces": stats.get("split_pieces", 0),
        "vocabulary": vocabulary,
    }


def vocabulary(tokenizer: dict | None) -> dict[str, int] | None:
    """Text ids come from the examples' tokenizer, vision ids from LWM's layout."""
    if tokenizer is None:
        return None
    return {"text": resolve_tokenizer(tokenizer).vocab_size, "vision": VISION_VOCAB_SIZE}


def packing_section(config: PackConfig, tokenizer: dict | None) -> Callable[[dict], dict]:
    """The manifest's extra section, for `Job.write`'s summary."""
    sizes = vocabulary(tokenizer)
    return lambda manifest: {"packing": packing_summary(manifest, config.packing.seq_len, sizes)}


def holds_examples(schema: pa.Schema) -> bool:
    """Whether shards of `schema` hold examples: every EXAMPLE_SCHEMA field, as it is there (other
    columns, such as an eval set's task and answers, are never read by pack)."""
    return all(schema.get_field_index(f.name) >= 0 and schema.field(f.name).equals(f) for f in EXAMPLE_SCHEMA)


def example_shards(directories: Iterable[str]) -> list[str]:
    """Every shard of the input directories, which must hold examples (EXAMPLE_SCHEMA, or a schema with
    all its fields, such as EVALSET_SCHEMA)."""
    shards = []
    for directory in directories:
        manifest = outputs.read_manifest(directory)
        if manifest.get("stage") == "chunk":
            raise ConfigError(
                f"{directory} holds chunks, not examples: make one text example per book first, with\n"
                f"    lwm-data text --input {directory} --output {directory.rstrip('/')}-text\n"
                f"and pack that directory"
            )
        paths = outputs.list_shards(directory, manifest)
        if paths:
            with files.open(paths[0]) as f:
                schema = pq.read_schema(f)
            if not holds_examples(schema):
                raise ConfigError(
                    f"{directory} (stage {manifest.get('stage')!r}) does not hold examples (EXAMPLE_SCHEMA)"
                )
        shards += paths
    return shards


def run(config: PackConfig, beam_args: list[str] | None = None) -> dict:
    """The stand-alone pack job: input shards | Pack | write; returns its manifest (with `packing`)."""
    tokenizer = upstream_tokenizer(list(config.input))  # first: refuses inputs from different tokenizers
    shards = example_shards(config.input)

    def build(pipeline: beam.Pipeline) -> StageOutput:
        return pipeline | "Shards" >> beam.Create(shards) | "Pack" >> Pack(config)

    return run_stage(
        STAGE, config, build, PACKED_SCHEMA, beam_args, tokenizer, summary=packing_section(config, tokenizer)
    )
