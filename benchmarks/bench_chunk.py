"""The chunk job against raw SentencePiece encoding of the same books, on the same cores.

    python benchmarks/bench_chunk.py [--mb 50] [--repeats 3]

Raw: every book's text already in memory, one `encode(texts, num_threads=<cores>)` call: the floor
for any job that must tokenize the text. Job: `lwm_data.pipelines.chunk.run` over the JSONL
file (read, parse, normalise, deduplicate, tokenize with offsets, cut, write Parquet, manifest).
Goal: job time <= 1.5x raw time. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from lwm_data.pipelines import chunk
from lwm_data.testing.books import generate_books, write_books_jsonl
from lwm_data.tokenizers import load_tokenizer

GOAL = 1.5


def synthetic_corpus(directory: Path, megabytes: int) -> Path:
    path = directory / f"books-{megabytes}mb.jsonl"
    if not path.exists():
        books = generate_books(num_books=megabytes * 21 // 10, num_words=80_000, seed=1234)
        write_books_jsonl(path, books)
    return path


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=50, help="approximate corpus size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lwm-data-bench"))
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = synthetic_corpus(workdir, args.mb)
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    cores = os.cpu_count() or 1
    tokenizer = load_tokenizer()

    raw = median_seconds(lambda: tokenizer.encode_batch(texts, num_threads=cores), args.repeats)
    config = chunk.ChunkConfig(input=str(corpus), output=str(workdir / "chunks"))
    job = median_seconds(lambda: chunk.run(config), args.repeats)
    manifest = chunk.run(config)

    tokens = manifest["stats"]["tokens"]
    print(f"corpus: {len(texts)} books, {megabytes:.1f} MB, {tokens:,} tokens; {cores} cores; median of {args.repeats}")
    print(f"{'':28}{'seconds':>10}{'MB/s':>10}{'Mtok/s':>10}")
    for name, seconds in (("raw sentencepiece encode", raw), ("chunk job (Beam, end to end)", job)):
        print(f"{name:28}{seconds:10.2f}{megabytes / seconds:10.2f}{tokens / seconds / 1e6:10.2f}")
    ratio = job / raw
    print(f"job / raw time: {ratio:.2f}x (goal <= {GOAL}x): {'met' if ratio <= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
