"""QA generation, the pure parts: prompts, reply schema, validation, cloze QA, cache keys, the cache."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_data.errors import Rejection
from lwm_data.testing.books import generate_book
from lwm_data.text.llm import (
    ChatClient,
    ClientConfig,
    Completion,
    Endpoint,
    ResponseCache,
    SamplingParams,
    ServerUnavailable,
    VLLMServer,
    _alive,
    backoff_s,
    free_port,
    http_ok,
)
from lwm_data.text.qa import (
    BLANK,
    CHARS_PER_TOKEN,
    JSON_PAIR_CHARS,
    JSON_REPLY_CHARS,
    MAX_PATTERN_REPEAT,
    PROMPTS,
    PairLimits,
    QAPair,
    cache_key,
    cloze_pairs,
    content_words,
    fitted_limits,
    folded_question_pattern,
    grounding_score,
    judge_reply,
    pair_problem,
    prompt_from_json,
    refuses_constraints,
    reply_schema,
    response_format,
    scored,
    validate_pairs,
)
from tests.helpers import LocalServer

STRICT = PairLimits()


def reply(*pairs: tuple[str, str]) -> str:
    return json.dumps({"pairs": [{"question": q, "answer": a} for q, a in pairs]})


def test_default_prompt_puts_the_chunk_and_count_in_the_user_message():
    messages = PROMPTS["qa-v1"].messages("Mara kept {7} maps.", 4)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "Write 4 question-answer pairs" in messages[1]["content"]
    assert messages[1]["content"].endswith("Passage:\nMara kept {7} maps.")


def test_prompt_from_json_keeps_the_version_and_rejects_unknown_fields():
    template = prompt_from_json(json.dumps({"version": "mine-2", "system": "S", "user": "{n} about {chunk}"}))
    assert template.version == "mine-2"
    assert template.messages("text", 2)[1]["content"] == "2 about text"
    with pytest.raises(KeyError):
        prompt_from_json(json.dumps({"version": "x", "system": "S", "user": "{passage}"}))


def test_full_constraints_carry_the_count_the_question_mark_and_the_lengths():
    limits = PairLimits(min_question_chars=5, max_question_chars=80, max_answer_chars=40)
    schema = reply_schema(3, limits)
    pairs = schema["properties"]["pairs"]
    assert (pairs["minItems"], pairs["maxItems"]) == (3, 3)
    question = {"type": "string", "minLength": 5, "maxLength": 80, "pattern": r"^[^?]*\?$"}
    assert pairs["items"]["properties"]["question"] == question
    assert pairs["items"]["properties"]["answer"] == {"type": "string", "minLength": 1, "maxLength": 40}
    assert schema["required"] == ["pairs"] and pairs["items"]["additionalProperties"] is False
    assert response_format(schema)["json_schema"]["schema"] == schema
    no_mark = reply_schema(2, PairLimits(require_question_mark=False))["properties"]["pairs"]["items"]
    assert no_mark["properties"]["question"] == {"type": "string", "minLength": 10, "maxLength": 300}
    # xgrammar takes no pattern beside length bounds: folded, the bounds are in the pattern
    folded = reply_schema(3, limits, "folded")
    assert folded["properties"]["pairs"]["items"]["properties"]["question"] == {
        "type": "string",
        "pattern": r"^[^?]{4,79}\?$",
    }
    assert folded["properties"]["pairs"]["minItems"] == 3


def test_full_constraints_fit_the_longest_reply_into_max_tokens():
    roomy = reply_schema(3, STRICT, "full", max_tokens=4096)
    assert roomy == reply_schema(3, STRICT, "full")
    tight = reply_schema(3, STRICT, "full", max_tokens=512)["properties"]["pairs"]["items"]["properties"]
    longest = 3 * (tight["question"]["maxLength"] + tight["answer"]["maxLength"] + JSON_PAIR_CHARS) + JSON_REPLY_CHARS
    assert tight["question"]["maxLength"] < 300 and longest <= 512 * CHARS_PER_TOKEN
    assert tight["question"]["maxLength"] == tight["answer"]["maxLength"]  # scaled alike
    floor = fitted_limits(3, PairLimits(min_question_chars=20, min_answer_chars=5), max_tokens=10)
    assert (floor.max_question_chars, floor.max_answer_chars) == (20, 5)  # never below the lower bounds
    lengths = reply_schema(3, STRICT, "lengths", max_tokens=512)  # what the stage sent before: unfitted
    assert lengths["properties"]["pairs"]["items"]["properties"]["question"]["maxLength"] == 300


def test_weaker_constraints():
    lengths = reply_schema(3, PairLimits(min_question_chars=5, max_question_chars=80), "lengths")
    pairs = lengths["properties"]["pairs"]
    assert (pairs["minItems"], pairs["maxItems"]) == (1, 3)
    assert pairs["items"]["properties"]["question"] == {"type": "string", "minLength": 5, "maxLength": 80}
    assert reply_schema(3, STRICT, "json") is None and response_format(None, "json") == {"type": "json_object"}
    assert reply_schema(3, STRICT, "none") is None and response_format(None, "none") is None
    with pytest.raises(ValueError):
        reply_schema(3, STRICT, "strict")


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.integers(0, 300), st.text(alphabet="ab ?.\n\u00e9", max_size=620), st.booleans())
def test_the_folded_question_pattern_takes_exactly_the_valid_questions_with_one_question_mark(
    low, extra, question, one_mark
):
    high = low + extra
    question = question.replace("?", "") + "?" if one_mark else question
    pattern = folded_question_pattern(low, high)
    matches = re.fullmatch(pattern, question, re.DOTALL) is not None
    one_mark_at_end = question.endswith("?") and "?" not in question[:-1]
    assert matches == (one_mark_at_end and low <= len(question) <= high)
    # every repetition within what xgrammar compiles, however long the bounds
    assert all(int(n) <= MAX_PATTERN_REPEAT for n in re.findall(r"\d+", pattern))


def test_only_a_refusal_of_the_reply_format_steps_constraints_down():
    assert refuses_constraints(
        Rejection("http_400", "The provided JSON schema contains features not supported by xgrammar.")
    )
    assert refuses_constraints(Rejection("http_400", "Invalid schema for response_format 'qa_pairs': ..."))
    assert refuses_constraints(Rejection("http_422", "Grammar compilation failed"))
    assert not refuses_constraints(Rejection("http_400", "This model's maximum context length is 2048 tokens"))
    assert not refuses_constraints(Rejection("http_500", "grammar"))


def test_judge_reply_accepts_valid_pairs_stripped_and_deduplicated():
    text = reply(("  Where was Mara born? ", " Velmont "), ("where was MARA born?", "Cardell"), ("How many maps?", "7"))
    assert judge_reply(text, "stop", STRICT) == [
        QAPair("Where was Mara born?", "Velmont"),
        QAPair("How many maps?", "7"),
    ]


@pytest.mark.parametrize(
    "content, finish_reason, reason",
    [
        (reply(("Where was Mara born?", "Velmont")), "length", "truncated"),
        ('{"pairs": [{"question": "Where', "stop", "unparsable"),
        ("[" * 100_000, "stop", "unparsable"),
        ("", "stop", "empty_reply"),
        (None, None, "empty_reply"),
        ('["Where?", "Velmont"]', "stop", "bad_shape"),
        ('{"pairs": [{"question": "Where?"}]}', "stop", "bad_shape"),
        (reply(("Where was Mara born", "Velmont")), "stop", "no_valid_pairs"),
        (reply(("Where was Mara born?", "where was mara born")), "stop", "no_valid_pairs"),
    ],
)
def test_judge_reply_rejects(content, finish_reason, reason):
    verdict = judge_reply(content, finish_reason, STRICT)
    assert isinstance(verdict, Rejection) and verdict.reason == reason


def test_pair_problems_under_strict_limits():
    assert pair_problem(QAPair("Where was Mara born?", "Velmont"), STRICT) == ""
    assert pair_problem(QAPair("", "Velmont"), STRICT) == "empty"
    assert pair_problem(QAPair("Who?", "Mara"), STRICT) == "question_length"
    assert pair_problem(QAPair("Where was Mara born?", "x" * 301), STRICT) == "answer_length"
    assert pair_problem(QAPair("Tell me where Mara was born.", "Velmont"), STRICT) == "not_a_question"
    assert (
        pair_problem(QAPair("Where was Mara born?", "Where was Mara born? In Velmont"), STRICT)
        == "answer_copies_question"
    )


def test_min_pairs_makes_a_reply_with_too_few_valid_pairs_invalid():
    text = reply(("Where was Mara born?", "Velmont"), ("bad", ""))
    assert judge_reply(text, "stop", PairLimits(min_pairs=2)).reason == "no_valid_pairs"
    assert judge_reply(text, "stop", PairLimits(min_pairs=1)) == [QAPair("Where was Mara born?", "Velmont")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=40), st.text(max_size=40)), max_size=8))
def test_validated_pairs_are_valid_and_distinct(raw):
    limits = PairLimits(min_question_chars=1, max_question_chars=30, max_answer_chars=30, require_question_mark=False)
    kept, rejected = validate_pairs([QAPair(q, a) for q, a in raw], limits)
    assert len(kept) + sum(rejected.values()) == len(raw)
    assert all(pair_problem(p, limits) == "" for p in kept)
    normalized = [re.sub(r"[\W_]+", " ", p.question.casefold()).strip() for p in kept]
    assert len(set(normalized)) == len(normalized)


def test_cloze_blanks_one_entity_of_a_real_sentence():
    book = generate_book(3, 1500)
    chunk = book.text[:4000]
    pairs = cloze_pairs(chunk, 3)
    assert len(pairs) == 3
    flat = " ".join(chunk.split())
    for pair in pairs:
        sentence = re.fullmatch(r'What fills the blank in "(.*)"\?', pair.question).group(1)
        assert sentence.count(BLANK) == 1
        assert sentence.replace(BLANK, pair.answer) in flat
        assert pair_problem(pair, STRICT) == ""
    assert cloze_pairs(chunk, 3) == pairs  # deterministic


def test_cloze_prefers_numbers_and_keeps_text_order():
    text = "Mara Quill walked to the old harbour in Velmont. Later, Mara Quill kept 812 maps in the cellar."
    assert cloze_pairs(text, 1) == [
        QAPair('What fills the blank in "Later, Mara Quill kept _____ maps in the cellar."?', "812")
    ]
    assert [p.answer for p in cloze_pairs(text, 2)] == ["Velmont", "812"]
    assert cloze_pairs("nothing here to ask about at all.", 2) == []


def test_cache_key_depends_on_every_part():
    base = ("m", "qa-v1", "chunk text", {"temperature": 0.7, "ask": 0})
    key = cache_key(*base)
    assert key == cache_key("m", "qa-v1", "chunk text", {"ask": 0, "temperature": 0.7})
    for changed in (
        ("m2",) + base[1:],
        base[:1] + ("qa-v2",) + base[2:],
        base[:2] + ("other",) + base[3:],
        base[:3] + ({"temperature": 0.7, "ask": 1},),
    ):
        assert cache_key(*changed) != key


def test_sampling_params_reask_and_request_fields():
    assert SamplingParams().for_attempt(2) == SamplingParams()
    assert "seed" not in SamplingParams().to_dict()
    assert SamplingParams(seed=5).for_attempt(2).seed == 7


def test_response_cache_round_trip_and_torn_entries(tmp_path):
    cache = ResponseCache(str(tmp_path / "cache"))
    completion = Completion('{"pairs": []}', "stop", 12, 3)
    assert cache.get("ab" * 32) is None
    cache.put("ab" * 32, completion)
    assert cache.get("ab" * 32) == completion
    torn = cache.path("cd" * 32)
    (tmp_path / "cache" / "cd").mkdir()
    open(torn, "w").write('{"content": "x", "fin')
    assert cache.get("cd" * 32) is None
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_a_cache_read_error_is_a_miss_logged_once(tmp_path, caplog):
    cache = ResponseCache(str(tmp_path / "cache"))
    for key in ("ab" * 32, "cd" * 32):
        (tmp_path / "cache" / key[:2] / f"{key}.json").mkdir(parents=True)  # unreadable: a directory
    with caplog.at_level("WARNING", logger="lwm_data.text.llm"):
        assert cache.get("ab" * 32) is None and cache.get("cd" * 32) is None
    warnings = [r for r in caplog.records if "response cache" in r.getMessage()]
    assert len(warnings) == 1 and "IsADirectoryError" in warnings[0].getMessage()


def test_backoff_is_jittered_and_capped():
    delays = [backoff_s(attempt) for attempt in range(12) for _ in range(20)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 100


def test_endpoint_wait_gives_up_at_its_deadline():
    with pytest.raises(ServerUnavailable):
        Endpoint(f"http://127.0.0.1:{free_port()}/v1", wait_s=0.3, poll_s=0.1).ensure_ready()


def test_cloze_skips_repeated_sentences_and_pairs_outside_the_limits():
    long = "Mara Quill kept " + "extraordinarily " * 20 + "old maps in 812 drawers."  # 26 words, 360 chars
    repeated = "Later, Mara Quill kept 812 maps in the cellar."
    text = f"{repeated} {repeated} {long} Tomas sailed to Velmont at dawn."
    assert len(cloze_pairs(long, 1)[0].question) > STRICT.max_question_chars
    pairs = cloze_pairs(text, 3, STRICT)
    assert [p.answer for p in pairs] == ["812", "Velmont"]
    assert all(pair_problem(p, STRICT) == "" for p in pairs)
    assert [p.answer for p in cloze_pairs(text, 3, PairLimits(max_question_chars=70))] == ["Velmont"]


def test_http_ok_is_false_for_a_garbled_reply():
    import socket
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer_garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"garbage\r\n\r\n")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        assert http_ok(f"http://127.0.0.1:{listener.getsockname()[1]}/health", timeout_s=5) is False
        thread.join(5)


def test_a_200_reply_that_is_not_a_chat_completion_is_a_bad_response_not_a_crash():
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    replies = [
        b"null",
        b"[]",
        b'{"choices": [{"message": {"content": [1]}}]}',
        b'{"choices": [{}]}',
        b'{"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}], "usage": {}}',
    ]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            body = replies.pop(0)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = Endpoint(f"http://127.0.0.1:{server.server_address[1]}/v1", wait_s=5)
        client = ChatClient("m", ClientConfig(max_retries=0, max_recoveries=0), endpoint)

        async def ask():
            outcomes = []
            for _ in range(5):
                try:
                    outcomes.append(await client._request([{"role": "user", "content": "x"}], SamplingParams(), None))
                except Rejection as e:
                    outcomes.append(e.reason)
            return outcomes

        outcomes = asyncio.run(ask())
    finally:
        server.shutdown()
        server.server_close()
    assert outcomes[:3] == ["bad_response"] * 3
    assert outcomes[3] == Completion(None, None, 0, 0)  # judged an empty reply: re-asked
    assert outcomes[4] == Completion("{}", "stop", 0, 0)


# A stand-in for vLLM's server: a process-group member (like vLLM's engine process), then /health.
FAKE_VLLM = """#!/bin/bash
while [ $# -gt 0 ]; do [ "$1" = --port ] && port=$2; shift; done
sleep 600 &
echo $! >> "$ENGINE_PIDS"
exec %s -c "
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header('content-length', '0'); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
" $port
"""


def _wait_dead(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_restart_and_stop_end_the_whole_process_group_of_a_dead_server(tmp_path, monkeypatch):
    script = tmp_path / "fake-vllm"
    script.write_text(FAKE_VLLM % sys.executable)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    engine_pids = tmp_path / "engines"
    monkeypatch.setenv("ENGINE_PIDS", str(engine_pids))
    server = VLLMServer("m", python=str(script), state_root=str(tmp_path), ready_timeout_s=30)
    try:
        server.ensure_ready()
        leader = server.pid()
        os.kill(leader, signal.SIGKILL)  # the server dies, its engine process lives on
        server._children[leader].wait(10)
        first_engine = int(engine_pids.read_text().split()[0])
        assert _alive(first_engine)
        server.ensure_ready()
        assert server.pid() not in (None, leader)
        assert _wait_dead(first_engine), "restart left the dead server's engine process running"
        second_leader = server.pid()
        second_engine = int(engine_pids.read_text().split()[1])
        os.kill(second_leader, signal.SIGKILL)
        server._children[second_leader].wait(10)
        server.stop(grace_s=5)
        assert _wait_dead(second_engine), "stop left the dead server's engine process running"
    finally:
        server.stop(grace_s=5)
        for pid in map(int, engine_pids.read_text().split()) if engine_pids.exists() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- against a stand-in server: what the client sends, and what it makes of refusals -------------


class StubServer(LocalServer):
    """An HTTP server on 127.0.0.1 answering POSTs with `reply(headers, body) -> (status, json)`
    (header names in lower case); it keeps every request's headers and body."""

    def __init__(self, reply):
        from http.server import BaseHTTPRequestHandler

        self.requests: list[tuple[dict, dict]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                stub.requests.append((headers, body))
                status, payload = reply(headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def chat_reply(content: str) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def test_the_key_comes_from_the_named_variable_and_a_refusal_names_it(monkeypatch):
    import asyncio

    from lwm_data.text.llm import ServerRejected

    def reply(headers, body):
        if headers.get("authorization") != "Bearer s3cret-key":
            return 401, {"error": {"message": "Unauthorized", "type": "invalid_request_error"}}
        return 200, chat_reply("{}")

    ask = [{"role": "user", "content": "x"}]
    with StubServer(reply) as stub:
        config = ClientConfig(max_retries=0, max_recoveries=0, api_key_env="MY_QA_KEY")
        monkeypatch.setenv("MY_QA_KEY", "s3cret-key")
        client = ChatClient("m", config, Endpoint(stub.url, wait_s=5))
        assert asyncio.run(client._request(ask, SamplingParams(), None)).content == "{}"
        monkeypatch.setenv("MY_QA_KEY", "wrong")
        with pytest.raises(ServerRejected, match=r"HTTP 401.*\$MY_QA_KEY \(set;"):
            asyncio.run(ChatClient("m", config, Endpoint(stub.url, wait_s=5))._request(ask, SamplingParams(), None))
        monkeypatch.delenv("MY_QA_KEY")
        with pytest.raises(ServerRejected, match=r"\$MY_QA_KEY \(unset or empty, so no key was sent"):
            asyncio.run(ChatClient("m", config, Endpoint(stub.url, wait_s=5))._request(ask, SamplingParams(), None))
    assert [h["authorization"] for h, _ in stub.requests] == ["Bearer s3cret-key", "Bearer wrong", "Bearer EMPTY"]


def test_a_server_that_refuses_the_schema_is_asked_with_weaker_constraints(tmp_path):
    from lwm_data import config as settings
    from lwm_data.pipelines.qa import ChunkRequest, QAConfig, ServerBackend

    def reply(headers, body):
        fmt = body.get("response_format") or {}
        if "pattern" in json.dumps(fmt):  # as if the server did not take patterns at all
            return 400, {
                "error": {
                    "message": "The provided JSON schema contains features not supported by xgrammar.",
                    "type": "BadRequestError",
                    "code": 400,
                }
            }
        return 200, chat_reply(reply_text(("Where was Mara born?", "Velmont")))

    def reply_text(*pairs):
        return json.dumps({"pairs": [{"question": q, "answer": a} for q, a in pairs]})

    with StubServer(reply) as stub:
        config = settings.build(
            QAConfig,
            dict(
                input="-",
                output="-",
                backend="openai",
                model="m",
                endpoint=stub.url,
                pairs_per_chunk=1,
                max_retries=0,
                cache=str(tmp_path / "cache"),
            ),
        )
        backend = ServerBackend(config, Endpoint(stub.url, wait_s=5))
        chunks = [ChunkRequest("b", i, f"Mara was born in Velmont ({i}).", 10) for i in range(4)]
        answers, usage = backend.answer_batch(chunks)
    assert answers == [[QAPair("Where was Mara born?", "Velmont")]] * 4
    assert usage["constraint_fallbacks"] == 2 and backend.levels[0] == "lengths"  # full, folded refused
    formats = [body["response_format"]["json_schema"]["schema"] for _, body in stub.requests]
    refused = [f for f in formats if "pattern" in json.dumps(f)]
    assert 2 <= len(refused) <= 8 and len(formats) == len(refused) + 4  # each chunk answered once, under lengths
    assert usage["requests"] == len(formats) and usage.get("reasks", 0) == 0


def test_requests_in_flight_show_in_the_live_tally_and_drain_to_zero():
    from lwm_data import config as stage_config
    from lwm_data.pipelines.qa import ChunkRequest, QAConfig, ServerBackend
    from lwm_data.pipelines.tally import IN_FLIGHT, TALLY

    TALLY.clear()
    seen = []

    def reply(headers, body):
        seen.append(TALLY.snapshot().get("qa", {}).get(IN_FLIGHT, 0))
        return 200, chat_reply(json.dumps({"pairs": [{"question": "Where was Mara born?", "answer": "Velmont"}]}))

    with StubServer(reply) as stub:
        config = stage_config.build(
            QAConfig,
            dict(
                input="-",
                output="-",
                backend="openai",
                model="m",
                endpoint=stub.url,
                pairs_per_chunk=1,
                max_retries=0,
                concurrency=3,
            ),
        )
        backend = ServerBackend(config, Endpoint(stub.url, wait_s=5), "qa")
        backend.answer_batch([ChunkRequest("b", i, f"Mara was born in Velmont ({i}).", 10) for i in range(6)])
    assert len(seen) == 6 and all(1 <= n <= 3 for n in seen)  # the asking request counts; never above concurrency
    assert TALLY.snapshot()["qa"][IN_FLIGHT] == 0


def test_grounding_is_the_share_of_the_answers_content_words_in_the_chunk():
    chunk = content_words("Mara Quill kept 812 maps in the cellar of the house at Velmont.")
    assert grounding_score("812 maps", chunk) == 1.0
    assert grounding_score("Mara's map", chunk) == 1.0  # possessive and plural folded
    assert grounding_score("In the cellar of her father", chunk) == 0.5  # cellar yes, father no
    assert grounding_score("Paris, France", chunk) == 0.0
    assert grounding_score("Yes, it is.", chunk) == 1.0  # claims nothing
    pairs = scored([QAPair("Where?", "In Velmont"), QAPair("Who?", "Tomas")], "They met in Velmont.")
    assert [p.grounding for p in pairs] == [1.0, 0.0]
    assert pairs[0].to_dict() == {"question": "Where?", "answer": "In Velmont", "grounding": 1.0}


def test_cloze_blanks_names_not_words_that_open_a_sentence_or_a_quotation():
    text = (
        '"But where is the ship?" asked the old sailor of the town. Let us go down to the water, she said '
        'to the boy. He said, "Who is there at the gate tonight?" and the dog barked at the moon.\n'
        "When Tomas\nBrandt came home, the lamps were lit in every window. So it was that she left at night."
    )
    pairs = cloze_pairs(text, 5)
    assert [p.answer for p in pairs] == ["Tomas Brandt"]  # found across the line break
    assert pairs[0].question == 'What fills the blank in "When _____ came home, the lamps were lit in every window."?'
    # a capital mid-sentence is no name when the text also writes the word in lower case
    assert cloze_pairs('"Oh, she said, Never mind the lamps tonight." She never lit them.', 2) == []


def test_cloze_on_synthetic_books_blanks_no_function_word():
    from lwm_data.text.qa import FUNCTION_WORDS

    for seed in range(4):
        text = generate_book(seed, 2000).text
        answers = [p.answer for p in cloze_pairs(text[:6000], 8)]
        assert answers and not any(a.split()[0].casefold() in FUNCTION_WORDS for a in answers)
