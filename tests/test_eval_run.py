"""`lwm-data eval-run`: an eval set's prompts through an OpenAI-compatible server into RESPONSES_SCHEMA.

The eval sets are `lwm-data evalset`'s over synthetic books. Cheap tests talk to a stand-in server
(`FakeOpenAI`); the real-model test asks SmolLM2-135M-Instruct on vLLM's CPU build, then scores the
responses with `lwm-data eval-score`.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from lwm_data import config as settings
from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.validate import validate
from lwm_data.pipelines import evalset
from lwm_data.schemas import CHUNK_SCHEMA, EVALSET_SCHEMA
from lwm_data.testing.books import generate_books, write_books_jsonl
from lwm_data.text.llm import free_port
from tests.fixtures_vllm import SMOLLM2_KEY, SMOLLM2_KEY_VARIABLE
from tests.helpers import LocalServer, write_output


def needle_evalset(directory: Path, lengths: list[int], depths: list[float], seed: int = 0, tasks: str = "") -> str:
    """A committed `evalset` output of niah_single rows (one per length x depth; `tasks`: others
    too) over synthetic books, 32 answer tokens left free."""
    books = write_books_jsonl(directory.parent / f"{directory.name}-books.jsonl", generate_books(3, 3000, seed=seed))
    values = {
        "haystack": str(books),
        "output": str(directory),
        "context_lengths": lengths,
        "depths": depths,
        "tasks": tasks or "niah_single",
        "seed": seed,
        "answer_tokens": 32,
    }
    evalset.run(settings.build(evalset.EvalsetStageConfig, values))
    return str(directory)


class FakeOpenAI(LocalServer):
    """An OpenAI-compatible stand-in on 127.0.0.1: GET /v1/models lists model `m` (vLLM's way), POST
    /v1/chat/completions answers `reply(body) -> (status, content, finish_reason)`; with `key`, a
    request without that bearer key gets 401. It keeps every chat request's body."""

    def __init__(self, reply, key: str | None = None):
        self.bodies: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _refused(self) -> bool:
                if key and self.headers.get("authorization") != f"Bearer {key}":
                    self._send(401, {"error": {"message": "Unauthorized"}})
                    return True
                return False

            def do_GET(self):
                if self.path.rstrip("/") != "/v1/models":
                    self._send(404, {"detail": "Not Found"})
                    return
                if self._refused():
                    return
                self._send(200, {"object": "list", "data": [{"id": "m", "root": "/models/m", "max_model_len": 4096}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if self._refused():
                    return
                fake.bodies.append(body)
                status, content, finish = reply(body)
                if status != 200:
                    self._send(status, {"error": {"message": content, "type": "BadRequestError"}})
                    return
                choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                 "choices": [choice], "usage": usage})  # fmt: skip

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def eval_run(*args: str):
    return CliRunner().invoke(app, ["eval-run", *args])


def one_line_error(result) -> str:
    """The message of a user error: exit 2, `error: ...`, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = "".join(result.output.strip().splitlines())  # one message, wrapped at the terminal's width
    assert message.startswith("error:") and message.count("error:") == 1, result.output
    return message


@pytest.fixture(scope="module")
def small_evalset(tmp_path_factory) -> Path:
    """Four ~300-token needle prompts (2 depths x 2 lengths): cheap for the stand-in server."""
    return Path(needle_evalset(tmp_path_factory.mktemp("evalset") / "evalset", [250, 300], [0.25, 0.75], seed=3))


def test_the_evalset_is_what_the_tests_expect(small_evalset):
    table = outputs.read_table(str(small_evalset))
    rows = table.to_pylist()
    assert len(rows) == 4 and table.schema.equals(EVALSET_SCHEMA)
    for row in rows:
        assert row["prompt"].count(row["answers"][0]) == 1
        assert row["prompt_tokens"] <= row["context_length"]


def test_responses_rows_counts_request_and_manifest(small_evalset, tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_KEY", "k3y")

    long_prompts = set(
        outputs.read_table(str(small_evalset)).filter(pc.field("context_length") == 300)["prompt"].to_pylist()
    )

    def reply(body):  # a long-winded answer to the 300-token rows: cut by max_tokens
        prompt = body["messages"][0]["content"]
        value = next(v for v in prompt.split() if v.rstrip(".").isdigit() and len(v.rstrip(".")) == 7).rstrip(".")
        return (200, f"{value} and more", "length") if prompt in long_prompts else (200, value, "stop")

    output = tmp_path / "responses"
    with FakeOpenAI(reply, key="k3y") as fake:
        args = ["--input", str(small_evalset), "--output", str(output), "--endpoint", fake.url, "--model", "m"]
        result = eval_run(*args, "--max-tokens", "16", "--api-key-env", "EVAL_KEY")
        assert result.exit_code == 0, result.output
    rows = outputs.read_table(str(output)).to_pylist()
    evalset = {r["example_id"]: r for r in outputs.read_table(str(small_evalset)).to_pylist()}
    assert sorted(r["example_id"] for r in rows) == sorted(evalset)
    for row in rows:
        source = evalset[row["example_id"]]
        assert {k: row[k] for k in ("task", "context_length", "depth", "answers")} == {
            k: source[k] for k in ("task", "context_length", "depth", "answers")
        }
        assert row["model"] == "m" and row["response"].startswith(source["answers"][0])
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}  # cut responses are kept, not dead-lettered
    # one user message per prompt, greedy, max_tokens as asked, the served name
    assert len(fake.bodies) == 4
    for body in fake.bodies:
        assert body["model"] == "m" and body["temperature"] == 0.0 and body["max_tokens"] == 16
        assert [m["role"] for m in body["messages"]] == ["user"]
    manifest = outputs.read_manifest(str(output))
    assert manifest["stage"] == "eval-run" and manifest["counts"]["balanced"]
    assert manifest["counts"]["in"] == manifest["counts"]["out"] == 4
    assert manifest["stats"]["truncated"] == sum(r["finish_reason"] == "length" for r in rows)
    assert manifest["stats"]["requests"] == 4 and manifest["stats"]["completion_tokens"] == 12
    assert manifest["config"]["model"] == "m" and manifest["config"]["endpoint"] == fake.url
    assert manifest["server"] == {
        "endpoint": fake.url,
        "model": "m",
        "served_model": "/models/m",
        "max_model_len": 4096,
    }
    assert "k3y" not in (output / "manifest.json").read_text()
    assert not validate(str(output))


def test_failed_requests_are_dead_lettered_with_their_reason_and_the_cache_asks_once(
    small_evalset, tmp_path, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    table = outputs.read_table(str(small_evalset), ["prompt", "context_length"])
    too_long = set(table.filter(pc.field("context_length") == 300)["prompt"].to_pylist())

    def reply(body):
        if body["messages"][0]["content"] in too_long:
            return 400, "This model's maximum context length is 256 tokens", None
        return 200, "1234567", "stop"

    failing = len(too_long)
    assert 0 < failing < table.num_rows
    output, cache = tmp_path / "responses", tmp_path / "cache"
    common = ["--input", str(small_evalset), "--endpoint", "", "--model", "m", "--cache", str(cache)]
    common += ["--max-retries", "0", "--max-recoveries", "0", "--max-dead-fraction", "1"]
    with FakeOpenAI(reply) as fake:
        common[3] = fake.url
        result = eval_run(*common, "--output", str(output))
        assert result.exit_code == 0, result.output
        manifest = outputs.read_manifest(str(output))
        counts = manifest["counts"]
        assert counts["balanced"] and counts["in"] == 4
        assert counts["out"] == 4 - failing and counts["dead_lettered_by_reason"] == {"http_400": failing}
        letters = outputs.read_dead_letters(str(output))
        assert len(letters) == failing
        assert all(d["stage"] == "eval-run" and "maximum context length" in d["detail"] for d in letters)
        answered = {r["example_id"] for r in outputs.read_table(str(output)).to_pylist()}
        assert answered.isdisjoint(d["source"] for d in letters)
        ids = set(outputs.read_table(str(small_evalset))["example_id"].to_pylist())
        assert answered | {d["source"] for d in letters} == ids
        asked = len(fake.bodies)
        # a rerun asks again only what failed (failures are not cached)
        result = eval_run(*common, "--output", str(tmp_path / "again"))
        assert result.exit_code == 0, result.output
        assert len(fake.bodies) == asked + failing
        assert outputs.read_manifest(str(tmp_path / "again"))["stats"]["cache_hits"] == 4 - failing
        # under the default policy, a run that loses most rows fails and commits nothing
        with_default = [a for a in common if a not in ("--max-dead-fraction", "1")]
        everything_fails = FakeOpenAI(lambda body: (500, "engine died", None))
        with everything_fails:
            with_default[3] = everything_fails.url
            result = eval_run(*with_default, "--cache", str(tmp_path / "cache2"), "--output", str(tmp_path / "none"))
    assert result.exit_code == 2 and "http_500" in result.output, result.output
    assert not (tmp_path / "none" / "manifest.json").exists()


def test_an_empty_prompt_is_dead_lettered_without_a_request(small_evalset, tmp_path):
    table = outputs.read_table(str(small_evalset))
    prompts = table["prompt"].to_pylist()
    prompts[0] = "  "
    column = table.schema.get_field_index("prompt")
    table = table.set_column(column, table.schema.field(column), pa.array(prompts))
    evalset = write_output(tmp_path / "evalset", "evalset", table)
    with FakeOpenAI(lambda body: (200, "1234567", "stop")) as fake:
        args = ["--input", evalset, "--output", str(tmp_path / "out"), "--endpoint", fake.url, "--model", "m"]
        result = eval_run(*args)
    assert result.exit_code == 0, result.output
    counts = outputs.read_manifest(str(tmp_path / "out"))["counts"]
    assert counts["in"] == 4 and counts["out"] == 3 and counts["dead_lettered_by_reason"] == {"empty_prompt": 1}
    assert len(fake.bodies) == 3
    (letter,) = outputs.read_dead_letters(str(tmp_path / "out"))
    assert letter["source"] == table["example_id"][0].as_py()


def test_another_stages_output_is_refused_in_one_line(tmp_path):
    chunks = write_output(tmp_path / "chunks", "chunk", CHUNK_SCHEMA.empty_table())
    line = one_line_error(
        eval_run("--input", chunks, "--output", str(tmp_path / "out"), "--endpoint", "http://x/v1", "--model", "m")
    )
    assert "holds the output of `lwm-data chunk`" in line and "`lwm-data evalset`" in line
    line = one_line_error(eval_run("--input", str(tmp_path), "--output", str(tmp_path / "out"), "--endpoint",
                                   "http://x/v1", "--model", "m"))  # fmt: skip
    assert "not the output of a finished lwm-data stage" in line


def test_endpoint_errors_are_one_line_user_errors(small_evalset, tmp_path, monkeypatch):
    base = ["--input", str(small_evalset), "--output", str(tmp_path / "out")]
    assert "needs --endpoint" in one_line_error(eval_run(*base, "--model", "m"))
    assert "needs --model" in one_line_error(eval_run(*base, "--endpoint", "http://127.0.0.1:9/v1"))
    assert "http(s) URL" in one_line_error(eval_run(*base, "--endpoint", "localhost:8000", "--model", "m"))
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    line = one_line_error(eval_run(*base, "--endpoint", nobody, "--model", "m", "--server-wait", "0.5"))
    assert f"no server answers at --endpoint {nobody}" in line
    with FakeOpenAI(lambda body: (200, "x", "stop"), key="right") as fake:
        monkeypatch.setenv("EVAL_KEY", "wrong")
        line = one_line_error(eval_run(*base, "--endpoint", fake.url, "--model", "m", "--api-key-env", "EVAL_KEY"))
        assert "HTTP 401" in line and "$EVAL_KEY (set;" in line and "wrong" not in line
        monkeypatch.setenv("EVAL_KEY", "right")
        line = one_line_error(eval_run(*base, "--endpoint", fake.url, "--model", "gpt-x", "--api-key-env", "EVAL_KEY"))
        assert "does not serve --model 'gpt-x'; it serves ['m']" in line
        root = fake.url.removesuffix("/v1")
        line = one_line_error(eval_run(*base, "--endpoint", root, "--model", "m", "--api-key-env", "EVAL_KEY"))
        assert f"its OpenAI API is at {fake.url}" in line
        assert not fake.bodies
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- a real model -----------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_smollm2_answers_single_needle_prompts_at_1k_and_2k_and_eval_score_scores_them(
    smollm2_server, tmp_path, monkeypatch
):
    monkeypatch.setenv(SMOLLM2_KEY_VARIABLE, SMOLLM2_KEY)
    evalset = needle_evalset(tmp_path / "evalset", [1024, 2048], [0.1, 0.5, 0.9], seed=1)
    output = tmp_path / "responses"
    endpoint = smollm2_server.ensure_ready()
    args = ["--input", evalset, "--output", str(output), "--endpoint", endpoint, "--model", smollm2_server.model]
    result = eval_run(*args, "--max-tokens", "24", "--api-key-env", SMOLLM2_KEY_VARIABLE, "--timeout", "300")
    assert result.exit_code == 0, result.output
    rows = outputs.read_table(str(output)).to_pylist()
    manifest = outputs.read_manifest(str(output))
    counts = manifest["counts"]
    assert counts["balanced"] and counts["in"] == counts["out"] == len(rows) == 6, counts
    assert all(r["response"].strip() and r["finish_reason"] in ("stop", "length") for r in rows)
    assert manifest["server"]["served_model"] == smollm2_server.model
    assert manifest["server"]["max_model_len"] == 4096
    assert manifest["stats"]["prompt_tokens"] >= 3 * (900 + 1800)  # the model's own tokenizer counts about as many
    for row in sorted(rows, key=lambda r: r["example_id"]):  # shown with -s, or on failure
        print(row["example_id"], row["answers"], repr(row["response"]), row["finish_reason"])
    assert SMOLLM2_KEY not in (output / "manifest.json").read_text()
    scored = CliRunner().invoke(app, ["eval-score", "--input", str(output), "--output", str(tmp_path / "scores")])
    assert scored.exit_code == 0, scored.output
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert set(summary["tasks"]) == {"niah_single"} and set(summary["average"]) == {"1024", "2048"}
    assert summary["tasks"]["niah_single"]["1024"] > 0, [(r["answers"], r["response"]) for r in rows]
    assert (tmp_path / "scores" / "niah_single.png").exists() and "niah_single" in scored.output
