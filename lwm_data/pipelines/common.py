"""What every lwm-data Beam stage is made of, and how one runs.

A stage is a composite `PTransform` from a PCollection of its input records to a `StageOutput`: its
rows (pyarrow Tables in the stage's schema) and its dead letters (JSON lines). Reading a stage's
directory (`ReadStage`) and writing one (`WriteStage`) are transforms of their own, so a stand-alone
command is

    pipeline | Read... | Stage(config) | WriteStage(run)      then run_stage counts and commits

and a fused pipeline (`Job`) chains the stage transforms in one Beam pipeline and writes each
stage's output: books | Chunk | QA | Chat | ... (see `lwm_data.recipes.books`).

Per-record work is a *step*: a plain object, called with one element, that yields outputs and
`Rejection`s or raises one, with an optional `setup()` run once per worker (to load a model; the
steps that need the text tokenizer derive from `TokenizerStep`), an optional `finish()` that yields
what it still holds at the end of a bundle (work in flight), and an optional `teardown()`.
`route(stage, step)` is the one DoFn that runs steps: outputs go to its main output `out`, each
Rejection becomes a dead letter on `errors`, counted as `dead_lettered.<reason>`.

Counters are Beam metrics in the stage's own namespace, `lwm_data.<stage>`, so stages fused into
one pipeline keep their counts apart and each gets a balanced manifest:

    in                      input records read
    out                     records written (a stage's unit: books, chunks, examples, ...)
    filtered.<reason>       records dropped on purpose (duplicates, length filters, ...)
    dead_lettered.<reason>  bad records, each also written to errors/ with its reason
    anything else           stage statistics, listed under `stats` (e.g. tokens, chunks)

Local runs use Beam's FnApiRunner (what DirectRunner picks for batch jobs) directly: DirectRunner
first tries the Prism runner, which downloads a binary, and lwm-data must work offline.
`--direct_num_workers` / `--direct_running_mode` work as usual; other runners (Dataflow, Flink,
Spark, PortableRunner, ...) are passed through untouched, except Beam's Dask runner, which is
refused before the job starts: it implements no metrics, and every manifest's counts come from them.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.parquetio import ReadAllFromParquetBatched
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from lwm_data import files, outputs
from lwm_data.errors import ConfigError, Rejection
from lwm_data.outputs import OutputRun, now, stage_manifest
from lwm_data.pipelines.tally import TALLY
from lwm_data.schemas import ERRORS_DIR, ERRORS_SUFFIX, SHARD_SUFFIX
from lwm_data.tokenizers import resolve_tokenizer

NAMESPACE_PREFIX = "lwm_data."
ERRORS = "errors"  # tag of dead-letter outputs
LOCAL_RUNNERS = {None, "directrunner", "switchingdirectrunner", "fnapirunner"}  # as `runner_key` names them
UNSUPPORTED_RUNNERS = {
    "daskrunner": "Beam's Dask runner implements no metrics, which every manifest's counts come from: run on the"
    " direct runner, Dataflow, or a portable runner (Flink, Spark)",
}

log = logging.getLogger(__name__)
_counters: dict[tuple[str, str], Any] = {}


def namespace(stage: str) -> str:
    return NAMESPACE_PREFIX + stage


Stages = str | tuple[str, ...]


class Counters:
    """A stage's job counters: `count("tokens", n)` adds n to `tokens` in `lwm_data.<stage>`.

    Work shared by two outputs of one job (frames decoded for both a video stage's examples and its
    kept codes) counts in both namespaces: `Counters(("video", "vision-codes"))`."""

    def __init__(self, stage: Stages):
        self.stages = (stage,) if isinstance(stage, str) else tuple(stage)
        self.stage = self.stages[0]  # the one named in dead letters

    def __call__(self, name: str, n: int = 1) -> None:
        for stage in self.stages:
            key = (stage, name)
            counter = _counters.get(key)
            if counter is None:
                counter = _counters[key] = Metrics.counter(namespace(stage), name)
            counter.inc(n)
            TALLY.add(stage, name, n)


class StageOutput(NamedTuple):
    """What a stage transform hands on: rows to write (or to the next stage), and dead letters."""

    rows: beam.PCollection  # pyarrow Tables in the stage's schema
    errors: beam.PCollection  # dead letters as JSON lines


class ReadOutput(NamedTuple):
    """What a reader of input files hands on: the records it could read, and dead letters."""

    records: beam.PCollection
    errors: beam.PCollection


def merge_errors(*errors: beam.PCollection, label: str = "MergeErrors") -> beam.PCollection:
    return tuple(errors) | label >> beam.Flatten()


class _Route(beam.DoFn):
    """Runs a step on each element: outputs (tagged ones included) pass, Rejections become dead letters."""

    def __init__(self, stage: Stages, step: Callable[[Any], Iterable]):
        self.step = step
        self.count = Counters(stage)
        self.stage = self.count.stage

    def setup(self) -> None:
        if hasattr(self.step, "setup"):
            self.step.setup()

    def teardown(self) -> None:
        if hasattr(self.step, "teardown"):
            self.step.teardown()

    def process(self, element: Any) -> Iterable:
        try:
            for item in self.step(element):
                yield self._letter(item) if isinstance(item, Rejection) else item
        except Rejection as rejection:
            yield self._letter(rejection)

    def finish_bundle(self) -> Iterable:
        """What a step held back across elements (work still in flight): its `finish()`."""
        if hasattr(self.step, "finish"):
            for item in self.step.finish():
                if isinstance(item, Rejection):
                    letter = self._letter(item)
                    yield beam.pvalue.TaggedOutput(letter.tag, _in_global_window(letter.value))
                else:
                    yield _in_global_window(item)

    def _letter(self, rejection: Rejection) -> beam.pvalue.TaggedOutput:
        self.count(f"dead_lettered.{rejection.reason}")
        return beam.pvalue.TaggedOutput(ERRORS, rejection.dead_letter(self.stage).to_json())


def _in_global_window(value: Any) -> WindowedValue:
    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


def route(stage: Stages, step: Callable[[Any], Iterable], *tags: str) -> beam.ParDo:
    """The count-and-route step as a ParDo with outputs `out`, `errors` and any extra `tags`."""
    return beam.ParDo(_Route(stage, step)).with_outputs(ERRORS, *tags, main="out")


class TokenizerStep:
    """Base of the steps that need the text tokenizer. It travels to workers as its manifest entry
    (small, and checked by sha256 where it is resolved) and is loaded once per worker, in `setup`;
    a subclass with more to set up calls `super().setup()` first."""

    def __init__(self, tokenizer: dict):
        self.tokenizer_entry = tokenizer

    def setup(self) -> None:
        self.tokenizer = resolve_tokenizer(self.tokenizer_entry)


class FilePaths(beam.PTransform):
    """The path of every file matching a glob, spread over workers. A glob that matches nothing, or
    a stage's output directory, is refused here, before the job starts (`reads` says what the stage
    reads)."""

    def __init__(self, pattern: str, reads: str):
        super().__init__()
        outputs.check_input_files(pattern, reads)
        self.pattern = pattern

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self.pattern)
            | "Paths" >> beam.Map(lambda m: m.path)
            | "SpreadFiles" >> beam.Reshuffle()
        )


class ReadFiles(beam.PTransform):
    """A stage's input files (`FilePaths`), read by `step(path)`, which yields records and
    Rejections (and counts each as an input record)."""

    def __init__(self, pattern: str, stage: str, step: Callable[[str], Iterable], reads: str):
        super().__init__()
        self.files = FilePaths(pattern, reads)
        self.stage = stage
        self.step = step

    def expand(self, pbegin: beam.pvalue.PBegin) -> ReadOutput:
        read = pbegin | "Files" >> self.files | "Read" >> route(self.stage, self.step)
        return ReadOutput(read.out, read[ERRORS])


class ReadStage(beam.PTransform):
    """A finished stage's rows, as pyarrow Tables (one per row group), from the files its manifest lists."""

    def __init__(self, directory: str, columns: list[str] | None = None):
        super().__init__()
        self.directory = directory
        self.columns = columns

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "Shards" >> beam.Create(outputs.list_shards(self.directory))
            | "Read" >> ReadAllFromParquetBatched(columns=self.columns)
        )


class WriteStage(beam.PTransform):
    """Shards `part-SSSSS-of-NNNNN.parquet` and `errors/part-*.jsonl` into a run's directory; the
    output is the PCollection of written shard paths (for a stage that reads them back)."""

    def __init__(self, run: OutputRun, schema: pa.Schema, num_shards: int = 0):
        super().__init__()
        self.run = run
        self.schema = schema
        self.num_shards = num_shards

    def expand(self, output: StageOutput) -> beam.PCollection:
        output.errors | "WriteErrors" >> beam.io.WriteToText(self.run.errors_prefix, file_name_suffix=ERRORS_SUFFIX)
        return output.rows | "WriteShards" >> beam.io.WriteToParquetBatched(
            self.run.shard_prefix,
            schema=self.schema,
            codec="zstd",
            file_name_suffix=SHARD_SUFFIX,
            num_shards=self.num_shards,
        )


def beam_flags() -> set[str]:
    """Every flag a Beam options class defines, as Beam's parser takes it: `--extra_package` (which
    fills `extra_packages`), `--direct_num_workers` (not `--direct-num-workers`, which Beam ignores)."""
    parsers: list[argparse.ArgumentParser] = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    return {flag for action in parsers[0]._actions for flag in action.option_strings}


def check_beam_args(args: list[str], own_options: list[str]) -> None:
    """Refuse what is neither a Beam option nor one of the command's own: a typo (`--chunk-tokenz`)
    would otherwise pass through to Beam and be ignored."""
    known = beam_flags()
    for arg in args:
        flag = arg.split("=", 1)[0]
        if arg.startswith("--") and flag not in known:
            close = difflib.get_close_matches(flag, own_options, n=1) or difflib.get_close_matches(flag, known, 1, 0.8)
            hint = f"; did you mean {close[0]}?" if close else " (and no Beam option by that name)"
            raise ConfigError(f"unknown option {flag}{hint}")


def runner_key(beam_args: list[str] | None) -> str | None:
    """`--runner` as Beam resolves it (any case, `Runner` suffix optional, or a dotted path), in lower
    case with the suffix: `direct`, `DirectRunner` and `apache_beam.runners.direct.direct_runner.DirectRunner`
    are all `directrunner`; None when no runner is named."""
    name = PipelineOptions(beam_args or []).view_as(StandardOptions).runner
    if name is None:
        return None
    key = name.rsplit(".", 1)[-1].lower()
    return key if key.endswith("runner") else key + "runner"


def make_pipeline(beam_args: list[str] | None) -> beam.Pipeline:
    runner = runner_key(beam_args)
    if runner in UNSUPPORTED_RUNNERS:
        raise ConfigError(UNSUPPORTED_RUNNERS[runner])
    options = PipelineOptions(beam_args or [])
    if runner in LOCAL_RUNNERS:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return beam.Pipeline(runner=FnApiRunner(), options=options)
    return beam.Pipeline(options=options)


def stage_counters(result, stage: str) -> dict[str, int]:
    """A finished job's counters in the stage's namespace."""
    counters = result.metrics().query(MetricsFilter().with_namespace(namespace(stage)))["counters"]
    totals: dict[str, int] = {}
    for c in counters:
        value = c.committed if c.committed is not None else c.attempted
        totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + int(value or 0)
    return totals


class Job:
    """One Beam pipeline that writes one or more stages' outputs, each into its own directory.

    Every output goes into a new run directory; only when the whole job has succeeded, and every
    stage's counts balance and pass its dead-letter policy (`outputs.enforce`), is each committed
    (its manifest written, from its stage's counters), so a failure leaves every previous output as
    it was (see lwm_data.outputs). Stages whose output is not kept are judged too (`judge`).
    """

    def __init__(self, beam_args: list[str] | None = None):
        self.pipeline = make_pipeline(beam_args)
        self.started = now()
        self.result = None  # the finished pipeline's result, once `run` has it
        self._writes: list[tuple[str, Any, OutputRun, dict | None, Callable[[dict], dict] | None]] = []
        self._judged: list[tuple[str, Any]] = []  # (stage, config): counts checked before any commit
        self._scratch: list[OutputRun] = []

    def judge(self, stage: str, config: Any) -> None:
        """Hold a stage whose output is not kept to its dead-letter policy all the same."""
        self._judged.append((stage, config))

    def write_scratch(self, stage: str, directory: str, rows: beam.PCollection, schema: pa.Schema) -> beam.PCollection:
        """Shards a later step of the job reads back by path (pack's input) but nobody keeps: written
        under `directory`, deleted when the job ends, never committed. Returns the shard paths."""
        run = OutputRun(directory)
        self._scratch.append(run)
        return rows | f"Scratch[{stage}]" >> beam.io.WriteToParquetBatched(
            run.shard_prefix,
            schema=schema,
            codec="zstd",
            file_name_suffix=SHARD_SUFFIX,
        )

    def counts(self, stage: str) -> dict[str, Any]:
        """A stage's balanced counts in the finished job (its output kept or not)."""
        return outputs.Counts.from_counters(stage_counters(self.result, stage)).to_dict()

    def write(
        self,
        stage: str,
        config: Any,
        output: StageOutput,
        schema: pa.Schema,
        tokenizer: dict | None = None,
        num_shards: int = 0,
        summary: Callable[[dict], dict] | None = None,
    ) -> beam.PCollection:
        """Write a stage's output into `config.output`; returns the written shard paths.

        `tokenizer`: the entry of the tokenizer that made the tokens the rows carry; `summary(manifest)`:
        extra manifest sections computed from its counts (pack's `packing`)."""
        run = OutputRun(config.output)
        self._writes.append((stage, config, run, tokenizer, summary))
        self.judge(stage, config)
        return output | f"Write[{stage}]" >> WriteStage(run, schema, num_shards)

    def run(self) -> list[dict[str, Any]]:
        """Run to completion, judge every stage, then commit every output; returns their manifests
        in write order."""
        try:
            for _, _, run, _, _ in self._writes:
                run.begin()
            self.result = self.pipeline.run()
            self.result.wait_until_finish()
            manifests = [self._manifest(*write) for write in self._writes]
            self._judge_all()
        except BaseException:
            for _, _, run, _, _ in self._writes:
                run.abort()
            raise
        finally:
            for run in self._scratch:
                run.abort()
        return [run.commit(manifest) for (_, _, run, _, _), manifest in zip(self._writes, manifests)]

    def _judge_all(self) -> None:
        """Enforce every stage's policy, then warn of what is empty or missing, the first empty
        stage only (the stages after it are empty because it is)."""
        warnings: list[str] = []
        first_empty = None
        for stage, config in self._judged:
            counters = stage_counters(self.result, stage)
            counts = outputs.Counts.from_counters(counters)
            outputs.enforce(stage, counts, config.policy, self._dead_letters)
            first_empty = first_empty or outputs.nothing_to_do(stage, counts)
            warnings += outputs.mix_warnings(stage, counters)
        warnings = ([first_empty] if first_empty else []) + warnings
        for warning in warnings:
            log.warning(warning)

    def _manifest(self, stage: str, config: Any, run: OutputRun, tokenizer: dict | None, summary) -> dict:
        manifest = stage_manifest(stage, config, tokenizer, stage_counters(self.result, stage), self.started)
        if summary is not None:
            manifest.update(summary(manifest))
        return manifest

    def _dead_letters(self) -> Iterator[dict]:
        """The dead letters this job wrote (every stage's, across its outputs), not yet committed."""
        for _, _, run, _, _ in self._writes:
            for path in files.list_files(files.join(run.path, ERRORS_DIR, f"*{ERRORS_SUFFIX}")):
                yield from (json.loads(line) for line in files.json_lines(path))


def run_stage(
    stage: str,
    config: Any,
    build: Callable[[beam.Pipeline], StageOutput],
    schema: pa.Schema,
    beam_args: list[str] | None = None,
    tokenizer: dict | None = None,
    summary: Callable[[dict], dict] | None = None,
) -> dict[str, Any]:
    """A stand-alone stage: `build(pipeline)` (Read | Stage) written into `config.output` and
    committed; returns the manifest. See `Job.write` for `tokenizer` and `summary`."""
    job = Job(beam_args)
    job.write(stage, config, build(job.pipeline), schema, tokenizer, summary=summary)
    (manifest,) = job.run()
    return manifest


def upstream_tokenizer(input_dirs: list[str]) -> dict[str, str] | None:
    """The tokenizer entry that the inputs' manifests share; inputs tokenized differently are refused."""
    entries = {}
    for directory in input_dirs:
        entry = outputs.read_manifest(directory).get("tokenizer")
        if entry:
            entries[entry["sha256"]] = entry
    if len(entries) > 1:
        raise ConfigError(f"inputs were tokenized by different tokenizers: {sorted(map(str, entries.values()))}")
    return next(iter(entries.values()), None)
