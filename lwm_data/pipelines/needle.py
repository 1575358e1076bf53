"""`lwm-data needle`: LWM's needle-in-a-haystack eval set (lwm_data.text.needle) as a stage output.

Plain Python: the set is small. Counts are over haystack records: `out` = books used, dead-lettered =
rejected records; stat `prompts`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa

from lwm_data import files, outputs
from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection
from lwm_data.outputs import DeadLetterPolicy, OutputRun
from lwm_data.schemas import NEEDLE_SCHEMA
from lwm_data.text.books import read_books
from lwm_data.text.needle import NeedleConfig, needle_rows
from lwm_data.tokenizers import load_tokenizer

STAGE = "needle"


@dataclass(frozen=True)
class NeedleStageConfig:
    haystack: str = setting(help="Glob of book files (JSONL, Parquet, .txt) for the haystack.")
    output: str = setting(help="Output directory.")
    tokenizer: str | None = setting(None, "Tokenizer that measures context lengths (default: embedded).")
    needle: NeedleConfig = nested(NeedleConfig)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)


def run(config: NeedleStageConfig, beam_args: list[str] | None = None) -> dict:
    """Read the haystack books (a glob), write the needle rows as one NEEDLE_SCHEMA shard, the
    rejected haystack records to errors/, and commit; returns the manifest. (`beam_args` is accepted
    for the stage interface and unused.)"""
    started = outputs.now()
    tokenizer = load_tokenizer(config.tokenizer)
    texts, rejected = [], []
    for path in files.list_files(config.haystack):
        for item in read_books(path):
            if isinstance(item, Rejection):
                rejected.append(item)
            else:
                texts.append(item.text)
    if not texts:
        raise ConfigError(f"no usable books in {config.haystack} ({len(rejected)} records rejected)")
    rows = list(needle_rows(texts, tokenizer, config.needle))
    counters = {"in": len(texts) + len(rejected), "out": len(texts), "prompts": len(rows)}
    for rejection in rejected:
        key = f"dead_lettered.{rejection.reason}"
        counters[key] = counters.get(key, 0) + 1
    run = OutputRun(config.output)
    try:
        run.begin()
        run.write_table(pa.Table.from_pylist(rows, schema=NEEDLE_SCHEMA))
        run.write_dead_letters(STAGE, rejected)
        counts = outputs.Counts.from_counters(counters)
        outputs.enforce(STAGE, counts, config.policy, lambda: (asdict(r.dead_letter(STAGE)) for r in rejected))
        return run.commit(outputs.stage_manifest(STAGE, config, tokenizer.entry, counters, started))
    except BaseException:
        run.abort()
        raise
