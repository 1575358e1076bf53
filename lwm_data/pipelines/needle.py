"""`lwm-data needle`: LWM's needle-in-a-haystack eval set (lwm_data.text.needle) as a stage output.

Plain Python: the set is small. Counts are over haystack records: `out` = books used, dead-lettered =
rejected records; stat `prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from lwm_data import outputs
from lwm_data.config import nested, setting
from lwm_data.outputs import DeadLetterPolicy
from lwm_data.schemas import NEEDLE_SCHEMA
from lwm_data.text.books import read_haystack
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
    books, rejected = read_haystack(config.haystack)
    rows = list(needle_rows([book.text for book in books], tokenizer, config.needle))
    counters = {"in": len(books) + len(rejected), "out": len(books), "prompts": len(rows)}
    table = pa.Table.from_pylist(rows, schema=NEEDLE_SCHEMA)
    return outputs.commit_table(STAGE, config, table, rejected, counters, tokenizer.entry, started)
