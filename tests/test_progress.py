"""Live progress: the stage counters reach this process's tally while a local job runs, and the
display shows them per stage."""

from __future__ import annotations

import io

from rich.console import Console

from lwm_data.cli import progress
from lwm_data.pipelines import chunk


def test_a_local_job_fills_the_tally_as_it_runs(books_jsonl, tmp_path):
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with progress.live(console, enabled=True) as tally:
        manifest = chunk.run(chunk.ChunkConfig(input=str(books_jsonl), output=str(tmp_path / "chunks")))
        seen = tally.snapshot()["chunk"]
    assert seen["in"] == manifest["counts"]["in"] and seen["out"] == manifest["counts"]["out"]
    assert seen["tokens"] == manifest["stats"]["tokens"]


def test_the_display_has_a_row_per_stage_with_rates():
    view = progress.table({"chunk": {"in": 8, "out": 8, "tokens": 64000, "dead_lettered.invalid_json": 1}}, 2.0)
    console = Console(file=io.StringIO(), width=200)
    console.print(view)
    text = console.file.getvalue()
    assert "chunk" in text and "tokens 64,000 (32,000/s)" in text and " 1 " in text
    console.print(progress.table({}, 1.0))
    assert "counts at the end" in console.file.getvalue()
