"""What every lwm-data Beam job shares: counting, dead letters, writing shards, the manifest.

A stage is a function `build(pipeline) -> StageOutputs` plus `run_stage`, which runs it and then
writes `manifest.json` from the job's counters (Beam metrics in the `lwm_data` namespace):

    in                  input records read
    out                 records written (a stage's unit: books, chunks, examples, ...)
    filtered.<reason>   records dropped on purpose (duplicates, length filters, ...)
    dead_lettered.<reason>  bad records, each also written to errors/ with its reason
    anything else       stage statistics, listed under `stats` (e.g. tokens, chunks)

Local runs use Beam's FnApiRunner (what DirectRunner picks for batch jobs) directly: DirectRunner
first tries the Prism runner, which downloads a binary, and lwm-data must work offline.
`--direct_num_workers` / `--direct_running_mode` work as usual; other runners (Dataflow, Flink, ...)
are passed through untouched.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any, Callable

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

import lwm_data
from lwm_data import io
from lwm_data.io import Counts, DeadLetter

NAMESPACE = "lwm_data"
ERRORS = "errors"  # tag of dead-letter outputs
LOCAL_RUNNERS = {None, "DirectRunner", "SwitchingDirectRunner", "FnApiRunner"}

_counters: dict[str, Any] = {}


def count(name: str, n: int = 1) -> None:
    """Add n to the job counter `name` (see the module docstring for the reserved names)."""
    counter = _counters.get(name)
    if counter is None:
        counter = _counters[name] = Metrics.counter(NAMESPACE, name)
    counter.inc(n)


def dead_letter(stage: str, reason: str, source: str, locator: Any = "", detail: str = "", record: Any = "") -> beam.pvalue.TaggedOutput:
    """Count a bad record and route it to the stage's errors/ output."""
    count(f"dead_lettered.{reason}")
    letter = DeadLetter(stage, reason, str(source), str(locator), detail, record if isinstance(record, str) else repr(record))
    return beam.pvalue.TaggedOutput(ERRORS, letter.to_json())


@dataclass
class StageOutputs:
    """What a stage's build function hands back to be written."""

    tables: beam.PCollection  # of pyarrow Tables in the stage's schema
    errors: beam.PCollection | list[beam.PCollection]  # of dead-letter JSON lines


def write_stage_outputs(outputs: StageOutputs, output_dir: str, schema: pa.Schema, num_shards: int = 0) -> None:
    """Parquet shards `part-SSSSS-of-NNNNN.parquet` and `errors/part-*.jsonl` under output_dir."""
    errors = outputs.errors if isinstance(outputs.errors, list) else [outputs.errors]
    (
        errors
        | "FlattenErrors" >> beam.Flatten()
        | "WriteErrors" >> beam.io.WriteToText(io.join(output_dir, io.ERRORS_DIR, "part"), file_name_suffix=".jsonl")
    )
    outputs.tables | "WriteShards" >> beam.io.WriteToParquetBatched(
        io.join(output_dir, io.SHARD_PREFIX),
        schema=schema,
        codec="zstd",
        file_name_suffix=io.SHARD_SUFFIX,
        num_shards=num_shards,
    )


def make_pipeline(beam_args: list[str] | None) -> beam.Pipeline:
    options = PipelineOptions(beam_args or [])
    runner_name = options.view_as(StandardOptions).runner
    if runner_name in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


def clear_output(output_dir: str) -> None:
    """Remove a previous run's shards, errors and manifest, so outputs never mix across runs."""
    stale = io.list_shards(output_dir) + io.list_error_files(output_dir)
    manifest = io.join(output_dir, io.MANIFEST)
    if FileSystems.exists(manifest):
        stale.append(manifest)
    if stale:
        FileSystems.delete(stale)


def job_counters(result) -> dict[str, int]:
    counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    totals: dict[str, int] = {}
    for c in counters:
        value = c.committed if c.committed is not None else c.attempted
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + int(value or 0)
    return totals


def counts_from(counters: dict[str, int]) -> Counts:
    counts = Counts(input=counters.get("in", 0), output=counters.get("out", 0))
    for name, value in counters.items():
        kind, _, reason = name.partition(".")
        if kind == "filtered":
            counts.filtered[reason] = value
        elif kind == "dead_lettered":
            counts.dead_lettered[reason] = value
    return counts


def tokenizer_record(tokenizer: Any) -> dict[str, str] | None:
    """A manifest's `tokenizer` entry from a loaded tokenizer, or an entry copied from upstream."""
    if tokenizer is None or isinstance(tokenizer, dict):
        return tokenizer
    return {"path": tokenizer.path, "sha256": tokenizer.sha256}


def upstream_tokenizer(input_dirs: list[str]) -> dict[str, str] | None:
    """The tokenizer entry that the inputs' manifests share; inputs tokenized differently are refused."""
    entries = {}
    for directory in input_dirs:
        manifest = io.join(directory, io.MANIFEST)
        entry = io.read_json(manifest).get("tokenizer") if FileSystems.exists(manifest) else None
        if entry:
            entries[entry["sha256"]] = entry
    if len(entries) > 1:
        raise ValueError(f"inputs were tokenized by different tokenizers: {sorted(e['path'] for e in entries.values())}")
    return next(iter(entries.values()), None)


def run_stage(
    stage: str,
    output_dir: str,
    schema: pa.Schema,
    build: Callable[[beam.Pipeline], StageOutputs],
    config: dict[str, Any],
    beam_args: list[str] | None = None,
    tokenizer: Any = None,
    num_shards: int = 0,
) -> dict[str, Any]:
    """Run a stage's pipeline to completion and write its manifest; returns the manifest.

    `tokenizer`: the loaded tokenizer the stage used, or the upstream manifest entry of the one that
    made the tokens it carries (see `upstream_tokenizer`)."""
    started = datetime.datetime.now(datetime.timezone.utc)
    clear_output(output_dir)
    pipeline = make_pipeline(beam_args)
    write_stage_outputs(build(pipeline), output_dir, schema, num_shards)
    result = pipeline.run()
    result.wait_until_finish()
    counters = job_counters(result)
    counts = counts_from(counters)
    manifest = {
        "stage": stage,
        "lwm_data_version": lwm_data.__version__,
        "created": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 3),
        "config": config,
        "tokenizer": tokenizer_record(tokenizer),
        "counts": counts.to_dict(),
        "stats": {k: v for k, v in sorted(counters.items()) if k not in ("in", "out") and "." not in k},
        "files": io.describe_files(output_dir),
    }
    io.write_json(io.join(output_dir, io.MANIFEST), manifest)
    if not counts.balanced:
        logging.error("%s: counts do not balance: %s", stage, counts.to_dict())
    return manifest
