"""`lwm-data validate DIR`: check a stage's output against its schema, its contracts and its manifest.

The checks of each stage are named in the registry (lwm_data.pipelines.registry) and written in lwm_data.checks.
Violations are grouped in classes ("tokens length != num_tokens", ...), each counted over the whole
output, so one message says what is wrong and how often.
"""

from __future__ import annotations

from collections import Counter

from lwm_data import files, outputs
from lwm_data.checks import check_token_ids
from lwm_data.pipelines.registry import UnknownStage, stage_of
from lwm_data.schemas import ERRORS_SUFFIX


def validate(output_dir: str) -> Counter:
    """Violation class -> count over the whole output; empty when the output is valid."""
    violations: Counter = Counter()
    try:
        manifest = outputs.read_manifest(output_dir)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the violation
        violations[f"manifest.json unreadable ({type(e).__name__})"] += 1
        return violations
    try:
        stage = stage_of(manifest)
    except UnknownStage:
        violations[f"unknown stage {manifest.get('stage')!r}"] += 1
        return violations
    _check_manifest(output_dir, manifest, violations)
    text_vocab = text_vocabulary(manifest)
    for path in outputs.list_shards(output_dir, manifest):
        if not files.exists(path):  # counted as a file missing from the manifest's list
            continue
        table = outputs.read_shard(path)
        if not table.schema.equals(stage.schema):
            violations["shard schema differs from the stage schema"] += 1
            continue
        for check in stage.row_checks:
            check(table, violations)
        if "tokens" in table.column_names:
            check_token_ids(table, violations, text_vocab, path.rsplit("/", 1)[-1])
    if not violations.total():
        for check in stage.global_checks:
            check.check(outputs.read_table(output_dir, list(check.columns)), violations)
    return +violations


def text_vocabulary(manifest: dict) -> int | None:
    """The text vocabulary size the manifest records: its tokenizer entry's, or pack's `vocabulary`
    (None for manifests written before either was recorded)."""
    entry = manifest.get("tokenizer") or {}
    packed = (manifest.get("packing") or {}).get("vocabulary") or {}
    return entry.get("vocab_size", packed.get("text"))


def _check_manifest(output_dir: str, manifest: dict, violations: Counter) -> None:
    counts = manifest.get("counts", {})
    total = counts.get("out", 0) + counts.get("filtered_total", 0) + counts.get("dead_lettered", 0)
    if counts.get("in") != total:
        violations["counts do not balance (in != out + filtered + dead_lettered)"] += 1
    listed = {f["path"]: f["rows"] for f in manifest.get("files", [])}
    actual = {f["path"]: f["rows"] for f in outputs.describe_files(output_dir, manifest.get("run"))}
    violations["files differ from the manifest's list"] += len(set(listed.items()) ^ set(actual.items()))
    errors = sum(rows for path, rows in listed.items() if path.endswith(ERRORS_SUFFIX))
    if errors != counts.get("dead_lettered", 0) + _upstream_dead_letters(manifest):
        violations["dead letters in errors/ != counts.dead_lettered"] += 1
    for letter in outputs.read_dead_letters(output_dir):
        if not {"stage", "reason", "source", "locator"} <= letter.keys():
            violations["dead letter without stage/reason/source/locator"] += 1


def _upstream_dead_letters(manifest: dict) -> int:
    """Dead letters of a whole-pipeline job's stages whose outputs were not kept: they are written
    to the final output's errors/ (each names its stage)."""
    pipeline = manifest.get("pipeline") or {}
    return sum(
        counts.get("dead_lettered", 0)
        for stage, counts in pipeline.get("stages", {}).items()
        if stage not in pipeline.get("kept", {}) and stage != manifest.get("stage")
    )
