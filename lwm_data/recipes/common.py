"""What every whole pipeline ends with: the upstream stages' outputs (kept, or only what pack reads,
in scratch), then pack, whose manifest records every stage's counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa

from lwm_data import files
from lwm_data.pipelines import pack
from lwm_data.pipelines.common import Job, StageOutput, merge_errors
from lwm_data.schemas import PACKED_SCHEMA

SCRATCH = "_scratch"  # inside pack's output in a whole-pipeline job: what pack reads but nobody keeps


class Upstream(NamedTuple):
    """A stage of a whole-pipeline job that runs before pack."""

    stage: str
    config: Any
    output: StageOutput
    schema: pa.Schema
    summary: Callable[[dict], dict] | None = None  # extra manifest sections, when its output is kept


def finish_with_pack(
    job: Job,
    name: str,
    upstream: list[Upstream],
    pack_inputs: set[str],
    pack_config: pack.PackConfig,
    tokenizer: dict | None,
    keep_intermediate: bool,
) -> Job:
    """Finish a whole-pipeline job: the upstream stages' outputs (each kept, or only what pack reads,
    in a scratch directory deleted when the job ends, their dead letters in pack's `errors/`), then
    pack, whose manifest records every stage's counts under `pipeline`."""
    shards, errors = [], []
    for up in upstream:
        if keep_intermediate:
            written = job.write(up.stage, up.config, up.output, up.schema, tokenizer, summary=up.summary)
        else:
            job.judge(up.stage, up.config)
            errors.append(up.output.errors)
            scratch = files.join(pack_config.output, SCRATCH, up.stage)
            written = (
                job.write_scratch(up.stage, scratch, up.output.rows, up.schema) if up.stage in pack_inputs else None
            )
        if up.stage in pack_inputs:
            shards.append(written)
    packed = tuple(shards) | "ExampleShards" >> beam.Flatten() | "Pack" >> pack.Pack(pack_config)
    final = StageOutput(packed.rows, merge_errors(packed.errors, *errors, label="AllErrors"))
    kept = {up.stage: up.config.output for up in upstream} if keep_intermediate else {}
    packing = pack.packing_section(pack_config, tokenizer)

    def summary(manifest: dict) -> dict:
        stages = {up.stage: job.counts(up.stage) for up in upstream}
        return {**packing(manifest), "pipeline": {"name": name, "stages": stages, "kept": kept}}

    job.write(pack.STAGE, pack_config, final, PACKED_SCHEMA, tokenizer, summary=summary)
    return job
