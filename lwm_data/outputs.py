"""A stage's output directory, on any Beam filesystem (local, gs://, ...), and what goes into it.

    DIR/manifest.json                              the commit marker: stage, config, tokenizer,
                                                   counts, stats, the run it names and its files
    DIR/run-<id>/part-00000-of-00004.parquet ...   rows in the stage's schema (lwm_data.schemas)
    DIR/run-<id>/errors/part-*.jsonl               dead letters: one JSON object per bad record
    DIR/run-<id>/_started.json                     written when the run starts

Atomic outputs. Every run writes into a directory of its own, `DIR/run-<id>` (ids sort by start
time), and the output changes only when `manifest.json` is replaced, in one step, after the job has
succeeded: a rename over the old manifest on filesystems that have one, a single object write on
object stores (gs://, s3://), where an object is never seen half-written. Readers find shards
through the manifest, never by listing, so a rerun that fails or is killed midway leaves the
previous output exactly as it was; its own run directory is removed on failure, or by the next
successful run. After a commit, older runs (and shards of the pre-run layout, `DIR/part-*`) are
deleted. So: no manifest, no output; a manifest, exactly the files it lists.

Counts in a manifest balance: counts.in == counts.out + sum(counts.filtered) + counts.dead_lettered
(`counts.balanced`; `lwm-data validate` checks it). Bad records are `Rejection`s on their way to
errors/, where they become `DeadLetter` lines.

Before a run commits, `enforce` judges its counts: counts that do not balance are a bug
(`UnbalancedCounts`), and a dead-lettered share of the input above the stage's
`--max-dead-fraction` (`DeadLetterPolicy`, default 0.5) fails the job (`TooManyDeadLetters`, naming
the top reasons, a locator of each and the likely fix); either way the previous output stays.
"""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import lwm_data
from lwm_data import config as settings
from lwm_data import files
from lwm_data.config import setting
from lwm_data.errors import NotAStageOutput, Rejection, TooManyDeadLetters, UnbalancedCounts, WrongInput
from lwm_data.packing import ABSENT_FROM_MIX
from lwm_data.schemas import ERRORS_DIR, ERRORS_SUFFIX, MANIFEST, RUN_PREFIX, SHARD_PREFIX, SHARD_SUFFIX, STARTED


@dataclass
class Counts:
    """Input records and what became of them."""

    input: int = 0
    output: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    dead_lettered: dict[str, int] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.input == self.output + sum(self.filtered.values()) + sum(self.dead_lettered.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "in": self.input,
            "out": self.output,
            "filtered": dict(sorted(self.filtered.items())),
            "filtered_total": sum(self.filtered.values()),
            "dead_lettered": sum(self.dead_lettered.values()),
            "dead_lettered_by_reason": dict(sorted(self.dead_lettered.items())),
            "balanced": self.balanced,
        }

    @classmethod
    def from_counters(cls, counters: dict[str, int]) -> Counts:
        """From job counters named `in`, `out`, `filtered.<reason>`, `dead_lettered.<reason>`."""
        counts = cls(input=counters.get("in", 0), output=counters.get("out", 0))
        for name, value in counters.items():
            kind, _, reason = name.partition(".")
            if kind == "filtered":
                counts.filtered[reason] = value
            elif kind == "dead_lettered":
                counts.dead_lettered[reason] = value
        return counts


@dataclass(frozen=True)
class DeadLetterPolicy:
    """How much bad input a stage tolerates before it fails instead of committing (every stage has it)."""

    max_dead_fraction: float = setting(
        0.5, "Fail before committing when more than this share of the input is dead-lettered (1: never)."
    )


# What a reason's dead letters usually mean, for the message of a failed policy.
LIKELY_FIXES = {
    "missing_text": "is the text under another key? lwm-data reads each record's `text`",
    "text_not_string": "is `text` a list of paragraphs or pages? join them into one string",
    "invalid_json": "is the input JSON Lines (one object per line)?",
    "unreadable_file": "is each file compressed as its suffix says, and complete?",
    "record_too_large": "raise --max-record-bytes",
    "missing_field": "do --fields (or each line's `fields`) name keys the records have?",
    "too_large": "raise --max-media-bytes",
    "too_many_pixels": "raise --max-pixels",
}
TOP_REASONS = 3


def enforce(stage: str, counts: Counts, policy: DeadLetterPolicy, letters: Callable[[], Iterable[dict]]) -> None:
    """Refuse to commit a stage's output whose counts do not balance, or whose dead-lettered share
    of the input is above `policy`; `letters()` yields the job's dead letters (for one locator each)."""
    if not counts.balanced:
        raise UnbalancedCounts(
            f"{stage}: counts do not balance: {counts.to_dict()} (a bug in lwm-data; nothing was committed)"
        )
    dead = sum(counts.dead_lettered.values())
    if not dead or dead <= policy.max_dead_fraction * counts.input:
        return
    top = sorted(counts.dead_lettered.items(), key=lambda item: (-item[1], item[0]))[:TOP_REASONS]
    where = _first_locators(stage, {reason for reason, _ in top}, letters())
    reasons = "; ".join(
        f"{reason}: {n}" + (f" (e.g. {where[reason]})" if reason in where else "")
        + (f" - {LIKELY_FIXES[reason]}" if reason in LIKELY_FIXES else "")
        for reason, n in top
    )  # fmt: skip
    raise TooManyDeadLetters(
        f"{stage}: {dead} of {counts.input} input records dead-lettered ({dead / counts.input:.0%}), more than "
        f"--max-dead-fraction {policy.max_dead_fraction:g}; nothing was committed, the previous output is "
        f"unchanged. {reasons}"
    )


def nothing_to_do(stage: str, counts: Counts) -> str | None:
    """Why a stage's output is empty when it is: not an error, committed, and said once."""
    if counts.input == 0:
        return f"{stage}: nothing to do: its input holds no records; an empty output was committed"
    if counts.output > 0:
        return None
    why = [f"filtered {reason}: {n}" for reason, n in sorted(counts.filtered.items()) if n]
    why += [f"dead-lettered {reason}: {n}" for reason, n in sorted(counts.dead_lettered.items()) if n]
    return (
        f"{stage}: nothing to do: none of its {counts.input} input records was kept ({', '.join(why)}); "
        "an empty output was committed"
    )


def mix_warnings(stage: str, stats: dict[str, int]) -> list[str]:
    """Kinds `--mix` names that some packing plans lacked (they were mixed without them)."""
    plans = stats.get("partitions", 1)
    return [
        f"{stage}: --mix kind {name.removeprefix(ABSENT_FROM_MIX)!r} is absent from {n} of {plans} packing "
        "plans, which were mixed from the kinds they hold"
        for name, n in sorted(stats.items())
        if name.startswith(ABSENT_FROM_MIX)
    ]


def _first_locators(stage: str, reasons: set[str], letters: Iterable[dict]) -> dict[str, str]:
    found: dict[str, str] = {}
    for letter in letters:
        reason = letter.get("reason")
        if letter.get("stage") == stage and reason in reasons and reason not in found:
            source, locator = letter.get("source", ""), letter.get("locator", "")
            found[reason] = " ".join(str(part) for part in dict.fromkeys((source, locator)) if part)
            if len(found) == len(reasons):
                break
    return found


# ---- shards and error files ----


def shard_rows(path: str) -> int:
    with files.open(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def read_shard(path: str, columns: list[str] | None = None) -> pa.Table:
    with files.open(path) as f:
        return pq.read_table(f, columns=columns)


# ---- committed outputs: read through the manifest ----


def read_manifest(directory: str, stages: tuple[str, ...] = (), reader: str = "") -> dict[str, Any]:
    """A committed output's manifest; with `stages`, it must be one of theirs (`reader` reads it)."""
    path = files.join(directory, MANIFEST)
    if not files.exists(path):
        raise NotAStageOutput(f"{directory} has no {MANIFEST}: it is not the output of a finished lwm-data stage")
    manifest = files.read_json(path)
    if stages and manifest.get("stage") not in stages:
        wanted = " or ".join(f"`lwm-data {stage}`" for stage in stages)
        raise WrongInput(
            f"{directory} holds the output of `lwm-data {manifest.get('stage')}`; {reader} reads the output of {wanted}"
        )
    return manifest


def check_input_files(pattern: str, reads: str) -> None:
    """Refuse, before a job starts, an input glob that matches no file or names a stage's output
    (a directory with a manifest), saying what the stage reads instead."""
    for directory in {pattern.rstrip("/"), pattern.removesuffix("/*")}:
        if files.exists(files.join(directory, MANIFEST)):
            stage = files.read_json(files.join(directory, MANIFEST)).get("stage")
            raise WrongInput(f"{directory} holds the output of `lwm-data {stage}`, not {reads}")
    if not files.matches_any(pattern):
        raise WrongInput(f"no file matches {pattern} ({reads} expected)")


def committed_shards(pattern: str) -> tuple[list[str], list[str]]:
    """(shards, their output directories): the Parquet shards a glob matches that a committed
    manifest lists. A shard of a run that never committed, or of no output, is never read."""
    by_directory: dict[str, list[str]] = {}
    for path in files.list_files(pattern):
        parent = path.rsplit("/", 1)[0]
        directory = parent.rsplit("/", 1)[0] if parent.rsplit("/", 1)[-1].startswith(RUN_PREFIX) else parent
        by_directory.setdefault(directory, []).append(path)
    shards, directories = [], []
    for directory, paths in sorted(by_directory.items()):
        if files.exists(files.join(directory, MANIFEST)):
            listed = set(list_shards(directory))
            committed = [path for path in paths if path in listed]
            shards += committed
            directories += [directory] if committed else []
    return shards, directories


def _listed(directory: str, manifest: dict[str, Any] | None, suffix: str) -> list[str]:
    manifest = manifest if manifest is not None else read_manifest(directory)
    return [files.join(directory, f["path"]) for f in manifest.get("files", []) if f["path"].endswith(suffix)]


def list_shards(directory: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """The committed output's Parquet shards, in name order."""
    return _listed(directory, manifest, SHARD_SUFFIX)


def list_error_files(directory: str, manifest: dict[str, Any] | None = None) -> list[str]:
    return _listed(directory, manifest, ERRORS_SUFFIX)


def read_table(directory: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of a committed output, shards in name order."""
    tables = [read_shard(path, columns) for path in list_shards(directory)]
    return pa.concat_tables(tables) if tables else pa.table({})


def iter_batches(directory: str, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    for path in list_shards(directory):
        with files.open(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def read_dead_letters(directory: str) -> list[dict[str, Any]]:
    return [json.loads(line) for path in list_error_files(directory) for line in files.json_lines(path)]


def describe_files(directory: str, run: str | None) -> list[dict[str, Any]]:
    """The shards and error files a run wrote (None: the pre-run layout, files at the top level),
    with their row counts, paths relative to the directory."""
    base = directory.rstrip("/") + "/"
    root = files.join(directory, run) if run else directory
    shards = files.list_files(files.join(root, f"{SHARD_PREFIX}-*{SHARD_SUFFIX}"))
    errors = files.list_files(files.join(root, ERRORS_DIR, f"*{ERRORS_SUFFIX}"))
    return [{"path": p.removeprefix(base), "rows": shard_rows(p)} for p in shards] + [
        {"path": p.removeprefix(base), "rows": len(files.json_lines(p))} for p in errors
    ]


# ---- writing: one run, committed by its manifest ----


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def stage_manifest(
    stage: str, config: Any, tokenizer: dict | None, counters: dict[str, int], started: datetime.datetime
) -> dict[str, Any]:
    """A stage's manifest from its counters (`in`, `out`, `filtered.<r>`, `dead_lettered.<r>`, and
    statistics); `OutputRun.commit` adds the run and its files."""
    counts = Counts.from_counters(counters)
    stats = {k: v for k, v in sorted(counters.items()) if k not in ("in", "out") and "." not in k}
    return {
        "stage": stage,
        "lwm_data_version": lwm_data.__version__,
        "created": started.isoformat(timespec="seconds"),
        "seconds": round((now() - started).total_seconds(), 3),
        "config": settings.flat(config),
        "tokenizer": tokenizer,
        "counts": counts.to_dict(),
        "stats": stats,
        "warnings": [w for w in (nothing_to_do(stage, counts), *mix_warnings(stage, stats)) if w],
    }


def commit_table(
    stage: str,
    config: Any,
    table: pa.Table,
    rejected: list[Rejection],
    counters: dict[str, int],
    tokenizer: dict | None,
    started: datetime.datetime,
) -> dict[str, Any]:
    """A plain-Python stage's output (no Beam: needle, evalset): its rows as one shard and its
    rejections as dead letters (counted here), judged by its policy and committed; nothing on failure.
    `counters` holds `in`, `out` and statistics."""
    counters = dict(counters)
    for rejection in rejected:
        key = f"dead_lettered.{rejection.reason}"
        counters[key] = counters.get(key, 0) + 1
    run = OutputRun(config.output)
    try:
        run.begin()
        run.write_table(table)
        run.write_dead_letters(stage, rejected)
        letters = lambda: (asdict(r.dead_letter(stage)) for r in rejected)  # noqa: E731
        enforce(stage, Counts.from_counters(counters), config.policy, letters)
        return run.commit(stage_manifest(stage, config, tokenizer, counters, started))
    except BaseException:
        run.abort()
        raise


def new_run_id() -> str:
    """`run-<UTC start time to the microsecond>-<random>`: ids sort by start time."""
    return f"{RUN_PREFIX}{now():%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}"


class OutputRun:
    """One attempt at a stage's output directory; nothing of it is visible until `commit`."""

    def __init__(self, directory: str, run_id: str | None = None):
        self.directory = directory.rstrip("/") or directory
        self.id = run_id or new_run_id()
        self.path = files.join(self.directory, self.id)

    def begin(self) -> None:
        """Mark the run as started, so a killed run is found and removed by the next commit even
        if it wrote nothing else (listing finds files, not empty directories)."""
        files.write_json(
            files.join(self.path, STARTED), {"run": self.id, "started": now().isoformat(timespec="seconds")}
        )

    @property
    def shard_prefix(self) -> str:
        """Prefix of the shards, `run-<id>/part`, for Beam's sinks (they add `-SSSSS-of-NNNNN.parquet`)."""
        return files.join(self.path, SHARD_PREFIX)

    @property
    def errors_prefix(self) -> str:
        return files.join(self.path, ERRORS_DIR, SHARD_PREFIX)

    def describe_files(self) -> list[dict[str, Any]]:
        return describe_files(self.directory, self.id)

    def write_table(self, table: pa.Table) -> None:
        """Write rows without Beam (small stages): one shard, `part-00000-of-00001.parquet`."""
        with files.create(files.join(self.path, f"{SHARD_PREFIX}-00000-of-00001{SHARD_SUFFIX}")) as f:
            pq.write_table(table, f, compression="zstd")

    def write_dead_letters(self, stage: str, rejections: Iterable[Rejection]) -> None:
        lines = "".join(r.dead_letter(stage).to_json() + "\n" for r in rejections)
        if lines:
            with files.create(files.join(self.path, ERRORS_DIR, f"{SHARD_PREFIX}-00000-of-00001{ERRORS_SUFFIX}")) as f:
                f.write(lines.encode())

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Make this run the directory's output: the manifest (with `run` and `files`) replaces the
        old one in one step; then older runs and pre-run-layout shards are deleted."""
        manifest = {**manifest, "run": self.id, "files": self.describe_files()}
        previous = self._previous_run()
        staged = files.join(self.path, MANIFEST)
        files.write_json(staged, manifest)
        if files.has_dirs(self.directory):
            files.rename(staged, files.join(self.directory, MANIFEST))  # atomic replace
        else:  # object stores: one object write is atomic
            files.write_json(files.join(self.directory, MANIFEST), manifest)
            files.delete([staged])
        self._delete_older_runs(previous)
        return manifest

    def abort(self) -> None:
        """Remove what this run wrote (after a failure); the committed output is untouched."""
        files.delete_tree(self.path)

    def _previous_run(self) -> str | None:
        manifest = files.join(self.directory, MANIFEST)
        return files.read_json(manifest).get("run") if files.exists(manifest) else None

    def _delete_older_runs(self, previous: str | None) -> None:
        """The run the old manifest named, runs started before this one (failed or killed ones), and
        shards of the layout before runs existed. Later runs may still be writing: they are left."""
        base = self.directory + "/"
        under_runs = files.list_files(files.join(self.directory, f"{RUN_PREFIX}*", "**"))
        runs = {p.removeprefix(base).split("/", 1)[0] for p in under_runs} | ({previous} if previous else set())
        for run in sorted(r for r in runs if r < self.id):
            files.delete_tree(files.join(self.directory, run))
        legacy = files.list_files(files.join(self.directory, f"{SHARD_PREFIX}-*{SHARD_SUFFIX}"))
        legacy += files.list_files(files.join(self.directory, ERRORS_DIR, f"*{ERRORS_SUFFIX}"))
        if legacy:
            files.delete(legacy)
