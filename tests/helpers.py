"""Small helpers the tests share: a committed stage output made by hand."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from lwm_data.outputs import Counts, OutputRun


def write_output(directory: Path | str, stage: str, table: pa.Table, tokenizer: dict | None = None) -> str:
    """`table` as the committed output of `stage` in `directory` (one shard, counts all `out`)."""
    run = OutputRun(str(directory))
    run.write_table(table)
    counts = Counts(input=table.num_rows, output=table.num_rows).to_dict()
    run.commit({"stage": stage, "config": {}, "tokenizer": tokenizer, "counts": counts, "stats": {}})
    return str(directory)
