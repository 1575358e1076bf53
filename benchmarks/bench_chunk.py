"""The chunk job against raw SentencePiece encoding of the same books on the same cores; its peak
memory at two corpus sizes; optionally, datatrove's DocumentTokenizer beside it.

    python benchmarks/bench_chunk.py [--mb 50] [--small-mb 15] [--repeats 3]
        [--datatrove-python /tmp/dt-venv/bin/python] [--hf-tokenizer DIR]

Time: raw = every book's text already in memory, one `encode(texts, num_threads=<cores>)` call
returning numpy ids: the floor for any job that must tokenize the text. Job = `chunk.run` over the
JSONL file in this process (read, parse, normalise, deduplicate, tokenize with offsets, cut, write
Parquet, manifest). Raw and job alternate; medians. Goal: job <= 1.15x raw.

Memory: the job as a whole process (the `lwm-data chunk` command), peak RSS, at --small-mb and --mb.
Goal: flat in corpus size (the larger corpus <= 1.1x the smaller one's peak).

Peer (only with --datatrove-python, a Python with datatrove installed): with a Hugging Face
tokenizer.json (--hf-tokenizer, default SmolLM2's), whole processes alternating, medians: our chunk
job vs datatrove's JsonlReader + DocumentTokenizer writing token shards. Goal: wall <= 1.2x datatrove's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lwm_data.pipelines import chunk
from lwm_data.testing.books import generate_books, write_books_jsonl
from lwm_data.tokenizers import load_tokenizer

RAW_GOAL = 1.15
MEMORY_GOAL = 1.1
PEER_GOAL = 1.2
# A process's own peak, written at exit: its RSS high-water mark since exec (VmHWM), or a child's.
# Not wait4's ru_maxrss, which counts the launching process's memory from before the exec.
PEAK = """
import atexit, os, resource
def _peak():
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.environ["PEAK_FILE"], "w") as f:
        f.write(str(max(hwm, children)))
atexit.register(_peak)
"""
CHUNK_CLI = """
import runpy, sys
sys.argv[0] = "lwm-data"
runpy.run_module("lwm_data.cli", run_name="__main__")
"""
DATATROVE = """
import os, sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
corpus, tokenizer_json, output, logs = sys.argv[1:]
folder, name = os.path.split(corpus)
steps = [JsonlReader(folder, glob_pattern=name), DocumentTokenizer(output, tokenizer_name_or_path=tokenizer_json)]
LocalPipelineExecutor(pipeline=steps, tasks=1, workers=1, logging_dir=logs).run()
"""


def synthetic_corpus(directory: Path, megabytes: int) -> Path:
    path = directory / f"books-{megabytes}mb.jsonl"
    if not path.exists():
        books = generate_books(num_books=megabytes * 21 // 10, num_words=80_000, seed=1234)
        write_books_jsonl(path, books)
    return path


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds (every thread of this process) of a call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def run_process(command: list[str], scratch: list[Path]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (GB) of a whole Python process (`command`: python, -c,
    a script, its arguments), after removing `scratch`."""
    for path in scratch:
        shutil.rmtree(path, ignore_errors=True)
    python, flag, script, *args = command
    with tempfile.TemporaryFile() as log, tempfile.NamedTemporaryFile() as peak:
        start = time.perf_counter()
        env = {**os.environ, "PEAK_FILE": peak.name}
        process = subprocess.Popen([python, flag, PEAK + script, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            log.seek(0)
            sys.exit(f"{Path(python).name} failed:\n{log.read().decode(errors='replace')[-3000:]}")
        peak_gb = int(Path(peak.name).read_text()) / 1e6  # KiB
    return seconds, usage.ru_utime + usage.ru_stime, peak_gb


def chunk_command(corpus: Path, output: Path, tokenizer: str | None = None) -> list[str]:
    command = [sys.executable, "-c", CHUNK_CLI, "chunk", "--input", str(corpus), "--output", str(output)]
    return command + (["--tokenizer", tokenizer] if tokenizer else [])


def verdict(ratio: float, goal: float) -> str:
    return f"{ratio:.2f}x (goal <= {goal}x): {'met' if ratio <= goal else 'NOT met'}"


def bench_time(corpus: Path, workdir: Path, repeats: int) -> None:
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    cores = os.cpu_count() or 1
    tokenizer = load_tokenizer()
    config = chunk.ChunkConfig(input=str(corpus), output=str(workdir / "chunks"))
    chunk.run(config)  # warm: imports, the tokenizer's offset table
    runs: dict[str, list[tuple[float, float]]] = {"raw sentencepiece encode": [], "chunk job (Beam, end to end)": []}
    for _ in range(repeats):
        runs["raw sentencepiece encode"].append(timed(lambda: tokenizer.encode_batch(texts, num_threads=cores)))
        runs["chunk job (Beam, end to end)"].append(timed(lambda: chunk.run(config)))
    tokens = chunk.run(config)["stats"]["tokens"]
    print(f"corpus: {len(texts)} books, {megabytes:.1f} MB, {tokens:,} tokens; {cores} cores; median of {repeats}")
    print(f"{'':30}{'seconds':>9}{'MB/s':>8}{'Mtok/s':>8}{'CPU s':>8}   wall per run")
    wall = {}
    for name, results in runs.items():
        wall[name] = statistics.median(w for w, _ in results)
        cpu = statistics.median(c for _, c in results)
        per_run = " ".join(f"{w:.2f}" for w, _ in results)
        rates = f"{megabytes / wall[name]:8.2f}{tokens / wall[name] / 1e6:8.2f}"
        print(f"{name:30}{wall[name]:9.2f}{rates}{cpu:8.2f}   {per_run}")
    raw, job = wall.values()
    print(f"job / raw time: {verdict(job / raw, RAW_GOAL)}")


def bench_memory(corpora: list[Path], workdir: Path) -> None:
    peaks = []
    for corpus in corpora:
        output = workdir / "memory-chunks"
        seconds, cpu, peak = run_process(chunk_command(corpus, output), [output])
        peaks.append(peak)
        megabytes = corpus.stat().st_size / 1e6
        print(f"chunk job, {megabytes:5.1f} MB of JSONL: peak RSS {peak:.2f} GB ({seconds:.1f} s, {cpu:.1f} CPU s)")
    print(f"peak memory, larger / smaller corpus: {verdict(peaks[-1] / peaks[0], MEMORY_GOAL)}")


def bench_peer(corpus: Path, workdir: Path, repeats: int, datatrove_python: str, hf_tokenizer: str | None) -> None:
    if hf_tokenizer is None:
        from lwm_data.testing.models import smollm2_instruct

        hf_tokenizer = str(smollm2_instruct())
    ours, peer = workdir / "peer-chunks", workdir / "datatrove"
    tokenizer_json = str(Path(hf_tokenizer) / "tokenizer.json")
    datatrove = [datatrove_python, "-c", DATATROVE, str(corpus), tokenizer_json, str(peer / "out"), str(peer / "logs")]
    runs: dict[str, list[tuple[float, float, float]]] = {"chunk job": [], "datatrove": []}
    for _ in range(repeats):
        runs["chunk job"].append(run_process(chunk_command(corpus, ours, hf_tokenizer), [ours]))
        runs["datatrove"].append(run_process(datatrove, [peer]))
    print(f"beside datatrove ({Path(hf_tokenizer).name}, whole processes, median of {repeats}):")
    wall = {}
    for name, results in runs.items():
        wall[name] = statistics.median(w for w, _, _ in results)
        cpu = statistics.median(c for _, c, _ in results)
        peak = max(m for _, _, m in results)
        per_run = " ".join(f"{w:.2f}" for w, _, _ in results)
        print(f"  {name:12}{wall[name]:8.2f} s {cpu:8.2f} CPU s   peak RSS {peak:.2f} GB   wall per run {per_run}")
    print(f"chunk job / datatrove wall time: {verdict(wall['chunk job'] / wall['datatrove'], PEER_GOAL)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=50, help="approximate corpus size")
    parser.add_argument("--small-mb", type=int, default=15, help="the smaller corpus for the memory comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lwm-data-bench"))
    parser.add_argument("--datatrove-python", help="a Python with datatrove installed: compare with it")
    parser.add_argument("--hf-tokenizer", help="Hugging Face tokenizer dir for the peer (default: SmolLM2's)")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = synthetic_corpus(workdir, args.mb)
    bench_time(corpus, workdir, args.repeats)
    bench_memory([synthetic_corpus(workdir, args.small_mb), corpus], workdir)
    if args.datatrove_python:
        bench_peer(corpus, workdir, args.repeats, args.datatrove_python, args.hf_tokenizer)
    else:
        print("beside datatrove: skipped (pass --datatrove-python)")


if __name__ == "__main__":
    main()
