"""Atomic outputs: a run writes into its own directory and the manifest commits it, so a rerun that
fails or is killed leaves the last good output intact, on local disks and on object stores."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tests.memfs as memfs
from lwm_data import files, outputs
from lwm_data.cli.validate import validate
from lwm_data.pipelines import chunk
from lwm_data.testing.books import generate_books, write_books_jsonl
from lwm_data.tokenizers import default_tokenizer_path

REPO = Path(__file__).resolve().parents[1]


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_rerun_that_fails_leaves_the_last_output_as_it_was(tmp_path, books_jsonl, monkeypatch):
    output = tmp_path / "chunks"
    config = chunk.ChunkConfig(input=str(books_jsonl), output=str(output))
    first = chunk.run(config)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chunk, "cut_chunks", full_disk)
    with pytest.raises(Exception, match="No space left"):
        chunk.run(config)
    assert outputs.read_manifest(str(output)) == first
    assert entries(output) == ["manifest.json", first["run"]]  # the failed run cleaned up after itself
    assert not validate(str(output))


def test_a_rerun_killed_midway_leaves_the_last_output_and_the_next_run_clears_it(tmp_path):
    books = write_books_jsonl(tmp_path / "books.jsonl", generate_books(60, 40_000, seed=3))
    output = tmp_path / "chunks"
    config = chunk.ChunkConfig(input=str(books), output=str(output))
    first = chunk.run(config)
    command = [sys.executable, "-m", "lwm_data.cli", "chunk", "--input", str(books), "--output", str(output)]
    job = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:
        killed_run = [p for p in output.iterdir() if p.name.startswith("run-") and p.name != first["run"]]
        if killed_run and any(killed_run[0].rglob("*")):  # it has started writing
            break
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL, "the job was killed before it finished"
    assert outputs.read_manifest(str(output)) == first and not validate(str(output))
    assert len(entries(output)) == 3  # the manifest, the committed run, the killed one
    second = chunk.run(config)
    assert entries(output) == ["manifest.json", second["run"]] and second["counts"] == first["counts"]


def test_outputs_on_an_object_store_without_rename(books_jsonl):
    """memfs:// behaves like gs://: no directories, rename is copy + delete. The tokenizer is read
    from the store too."""
    memfs.clear()
    tokenizer = "memfs://bucket/models/tokenizer.model"
    with open(default_tokenizer_path(), "rb") as source, files.create(tokenizer) as target:
        shutil.copyfileobj(source, target)
    output = "memfs://bucket/chunks"
    config = chunk.ChunkConfig(input=str(books_jsonl), output=output, tokenizer=tokenizer)
    first = chunk.run(config)
    assert first["tokenizer"]["path"] == tokenizer and not validate(output)
    second = chunk.run(config)
    assert not validate(output) and second["counts"] == first["counts"]
    left = {name.removeprefix(output + "/").split("/")[0] for name in memfs.names(output + "/")}
    assert left == {"manifest.json", second["run"]}  # no staged manifest, no old run, no temp files
    rows = outputs.read_table(output, ["book_id"]).num_rows
    assert rows == second["stats"]["chunks"] > 0
