"""The QA Beam job end to end: cloze offline, then against a real vLLM server (tests.fixtures_vllm).

The server's model has random weights, so its pairs are gibberish: runs that should produce rows
use LENIENT limits (any schema-valid pair passes), and strict limits show re-ask -> dead-letter.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lwm_data import config as settings
from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.validate import validate
from lwm_data.errors import WrongInput
from lwm_data.pipelines import chunk
from lwm_data.pipelines import qa as qa_stage
from lwm_data.testing.books import generate_books, write_books_jsonl
from lwm_data.text.qa import PairLimits, QAPair, pair_problem
from tests.fault_proxy import FAULTS, FaultProxy
from tests.fixtures_vllm import VLLM_PYTHON, VLLM_TEST_ARGS

LENIENT_SETTINGS = dict(min_question_chars=1, max_question_chars=60, max_answer_chars=30, require_question_mark=False)
LENIENT = PairLimits(**LENIENT_SETTINGS)
STRICT_SETTINGS = dict(min_question_chars=10, max_question_chars=300, max_answer_chars=300, require_question_mark=True)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_chunks(tmp_path_factory) -> Path:
    """About 17 chunks of ~250 tokens: cheap prompts for the CPU server."""
    root = tmp_path_factory.mktemp("small")
    books = write_books_jsonl(root / "books.jsonl", generate_books(3, 700, seed=11))
    chunk.run(chunk.ChunkConfig(input=str(books), output=str(root / "chunks"), chunk_tokens=250))
    return root / "chunks"


def chunk_keys(chunks_dir: Path) -> set[tuple[str, int]]:
    table = outputs.read_table(str(chunks_dir), ["book_id", "chunk_index"])
    return set(zip(table["book_id"].to_pylist(), table["chunk_index"].to_pylist()))


def assert_each_chunk_once(chunks_dir: Path, output: Path) -> tuple[list[dict], list[dict]]:
    """Every chunk in is answered (one row), dead-lettered (one letter) or filtered (counted), never
    two of these, never twice."""
    rows = outputs.read_table(str(output)).to_pylist()
    letters = outputs.read_dead_letters(str(output))
    answered = [(r["book_id"], r["chunk_index"]) for r in rows]
    dead = [(d["source"], int(d["locator"])) for d in letters]
    assert len(set(answered)) == len(answered) and len(set(dead)) == len(dead)
    assert set(answered).isdisjoint(dead)
    manifest = outputs.read_manifest(str(output))
    counts, chunks = manifest["counts"], chunk_keys(chunks_dir)
    assert set(answered) | set(dead) <= chunks
    assert len(answered) + len(dead) + counts["filtered_total"] == len(chunks)
    assert counts["balanced"] and counts["in"] == len(chunks)
    assert not validate(str(output))
    return rows, letters


def llm_config(chunks: Path, output: Path, **overrides) -> qa_stage.QAConfig:
    values = dict(
        input=str(chunks),
        output=str(output),
        pairs_per_chunk=1,
        max_tokens=64,
        concurrency=4,
        max_asks=2,
        timeout=30,
        max_retries=2,
        **LENIENT_SETTINGS,
    )
    return settings.build(qa_stage.QAConfig, {**values, **overrides})


def vllm_backend(server) -> dict:
    return dict(
        backend="vllm",
        model=server.model,
        vllm_args=VLLM_TEST_ARGS,
        vllm_python=str(VLLM_PYTHON),
        vllm_state_dir=str(Path(server.state_dir).parent),
    )


def test_cloze_job_from_the_cli_answers_every_chunk_offline(chunks_dir, tmp_path):
    result = CliRunner().invoke(app, ["qa", "--input", str(chunks_dir), "--output", str(tmp_path / "qa")])
    assert result.exit_code == 0, result.output
    rows, _ = assert_each_chunk_once(chunks_dir, tmp_path / "qa")
    assert rows and {(r["backend"], r["model"], r["prompt_version"]) for r in rows} == {
        ("cloze", "lwm-data-cloze", "cloze-v1")
    }
    assert all(len(r["pairs"]) == 3 for r in rows)
    again = qa_stage.run(qa_stage.QAConfig(input=str(chunks_dir), output=str(tmp_path / "again")))
    assert again["counts"]["out"] == len(rows)
    key = lambda r: (r["book_id"], r["chunk_index"])  # noqa: E731
    assert sorted(outputs.read_table(str(tmp_path / "again")).to_pylist(), key=key) == sorted(rows, key=key)


def test_a_glob_input_reads_only_committed_shards(small_chunks, tmp_path):
    chunks = tmp_path / "chunks"
    shutil.copytree(small_chunks, chunks)
    committed = outputs.read_manifest(str(chunks))
    (shard,) = outputs.list_shards(str(chunks))
    uncommitted = chunks / "run-99991231T000000000000Z-abcdef"  # a later run that never committed
    uncommitted.mkdir()
    shutil.copy(shard, uncommitted / "part-00000-of-00001.parquet")
    manifest = qa_stage.run(qa_stage.QAConfig(input=f"{chunks}/*/*.parquet", output=str(tmp_path / "qa")))
    assert manifest["counts"]["in"] == outputs.shard_rows(shard)  # each chunk once
    assert manifest["tokenizer"] == committed["tokenizer"]
    with pytest.raises(WrongInput, match="matches no shard of a committed chunk output"):
        qa_stage.run(qa_stage.QAConfig(input=f"{uncommitted}/*.parquet", output=str(tmp_path / "none")))


@pytest.mark.vllm
def test_openai_backend_against_real_vllm(vllm_server, small_chunks, tmp_path):
    cache = tmp_path / "cache"
    config = llm_config(
        small_chunks,
        tmp_path / "qa",
        backend="openai",
        model=vllm_server.model,
        endpoint=vllm_server.ensure_ready(),
        cache=str(cache),
    )
    manifest = qa_stage.run(config)
    rows, letters = assert_each_chunk_once(small_chunks, tmp_path / "qa")
    stats, counts = manifest["stats"], manifest["counts"]
    assert stats["requests"] == counts["in"] + stats.get("reasks", 0) + stats.get("retries", 0)
    assert stats["completion_tokens"] > 0 and stats["prompt_tokens"] > 0
    assert len(list(cache.rglob("*.json"))) == counts["in"] + stats.get("reasks", 0)
    assert rows, "schema-valid replies pass lenient validation"
    assert all(pair_problem(QAPair(**p), LENIENT) == "" for r in rows for p in r["pairs"])
    assert {r["backend"] for r in rows} == {"openai"}
    assert {d["reason"] for d in letters} <= {"truncated", "unparsable", "no_valid_pairs", "empty_reply"}


@pytest.mark.vllm
def test_a_model_the_server_does_not_serve_fails_the_job(vllm_server, small_chunks, tmp_path):
    config = llm_config(
        small_chunks, tmp_path / "qa", backend="openai", model="no-such-model", endpoint=vllm_server.ensure_ready()
    )
    with pytest.raises(Exception, match="no-such-model.*HTTP 404"):
        qa_stage.run(config)
    assert not (tmp_path / "qa" / "manifest.json").exists()


@pytest.mark.vllm
def test_vllm_backend_shares_the_running_server_and_strict_validation_reasks(vllm_server, small_chunks, tmp_path):
    pid = vllm_server.pid()
    # lengths: under full constraints the grammar itself would make gibberish pass the strict rules
    config = llm_config(
        small_chunks,
        tmp_path / "qa",
        constraints="lengths",
        max_dead_fraction=1.0,  # a random-weight model: most chunks end dead-lettered, on purpose
        **STRICT_SETTINGS,
        **vllm_backend(vllm_server),
    )
    manifest = qa_stage.run(config)
    rows, letters = assert_each_chunk_once(small_chunks, tmp_path / "qa")
    stats, counts = manifest["stats"], manifest["counts"]
    assert vllm_server.pid() == pid, "the job used the machine's server instead of starting one"
    assert stats["requests"] == counts["in"] + stats["reasks"] + stats.get("retries", 0)
    assert stats["reasks"] >= counts["dead_lettered"] > 0  # each dead letter was asked max_asks = 2 times
    assert all(pair_problem(QAPair(**p), PairLimits()) == "" for r in rows for p in r["pairs"])
    assert all("2 asks" in d["detail"] for d in letters)


@pytest.mark.vllm
def test_fault_proxy_every_chunk_answered_or_dead_lettered_once(vllm_server, small_chunks, tmp_path):
    plan = ["http_500", "ok", "http_429", "ok", "delay", "ok", "truncate", "ok", "drop", "ok"]
    upstream = vllm_server.ensure_ready().removesuffix("/v1")
    with FaultProxy(upstream, plan, delay_s=7, max_requests=500, lifetime_s=240) as proxy:
        config = llm_config(
            small_chunks,
            tmp_path / "qa",
            backend="openai",
            model=vllm_server.model,
            endpoint=f"{proxy.url}/v1",
            timeout=6,
        )
        manifest = qa_stage.run(config)
    assert_each_chunk_once(small_chunks, tmp_path / "qa")
    assert all(proxy.served[fault] == 1 for fault in FAULTS)
    stats, counts = manifest["stats"], manifest["counts"]
    assert stats["requests"] == len(proxy.bodies)
    # every request is a first ask, a re-ask, a client retry, or a call after recovery
    assert stats["requests"] == counts["in"] + stats.get("reasks", 0) + stats["retries"] + stats.get("recoveries", 0)
    assert stats["retries"] + stats.get("recoveries", 0) >= len(FAULTS)


@pytest.mark.vllm
def test_killed_job_rerun_sends_no_request_for_cached_answers(vllm_server, small_chunks, tmp_path):
    cache, output = tmp_path / "cache", tmp_path / "qa"
    args = [
        sys.executable,
        "-m",
        "lwm_data.cli",
        "qa",
        "--input",
        str(small_chunks),
        "--output",
        str(output),
        "--backend",
        "openai",
        "--endpoint",
        vllm_server.ensure_ready(),
        "--model",
        vllm_server.model,
        "--cache",
        str(cache),
        "--pairs-per-chunk",
        "1",
        "--max-tokens",
        "64",
        "--max-asks",
        "2",
        "--concurrency",
        "1",
        "--min-question-chars",
        "1",
        "--max-question-chars",
        "60",
        "--max-answer-chars",
        "30",
        "--no-require-question-mark",
    ]
    job = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(cache.rglob("*.json"))) < 4 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL, "the job was killed mid-run"
    cached_before = set(cache.rglob("*.json"))
    assert len(cached_before) >= 4
    with FaultProxy(vllm_server.ensure_ready().removesuffix("/v1"), lifetime_s=240) as proxy:
        config = llm_config(
            small_chunks,
            output,
            backend="openai",
            model=vllm_server.model,
            endpoint=f"{proxy.url}/v1",
            cache=str(cache),
            concurrency=4,
        )
        manifest = qa_stage.run(config)
    assert_each_chunk_once(small_chunks, output)
    stats = manifest["stats"]
    new_entries = set(cache.rglob("*.json")) - cached_before
    assert stats["cache_hits"] == len(cached_before)
    assert stats["requests"] == len(proxy.bodies) == len(new_entries) > 0


@pytest.mark.vllm
def test_vllm_backend_restarts_a_server_that_dies_mid_run(vllm_server, small_chunks, tmp_path):
    old_pid, cache = vllm_server.pid(), tmp_path / "cache"

    def kill_after_first_answers() -> None:
        deadline = time.monotonic() + 120
        while len(list(cache.rglob("*.json"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(old_pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_answers, daemon=True)
    killer.start()
    config = llm_config(small_chunks, tmp_path / "qa", cache=str(cache), concurrency=2, **vllm_backend(vllm_server))
    manifest = qa_stage.run(config)
    killer.join()
    assert_each_chunk_once(small_chunks, tmp_path / "qa")
    assert vllm_server.pid() not in (None, old_pid)
    assert manifest["stats"]["recoveries"] >= 1
    assert {d["reason"] for d in outputs.read_dead_letters(str(tmp_path / "qa"))}.isdisjoint(
        {"unreachable", "http_500"}
    )
