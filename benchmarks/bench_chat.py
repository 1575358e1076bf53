"""Chat assembly speed and memory for one synthetic book of ~1.1M tokens, at 1M and 32K context
(the book is over 1M tokens so that it fills a 1M window).

Runs the chat job's per-book step (`AssembleChats.process`: chunk rows -> one token array -> windows
-> examples -> Arrow tables, flushed as in the job) in a fresh subprocess per context length, so
peak figures are that step's alone:

    tokens/s        example tokens written per second (median of 3 runs)
    traced peak     tracemalloc peak (Python objects and numpy buffers) during one run
    rss growth      peak resident memory during one run minus before it (Arrow buffers included)

Each memory figure is printed beside the book's own token array (4 bytes/token) as a ratio; the
job's docstring bounds memory per book by about (8 + text bytes/token) x T + 9 x flush_tokens.

    python benchmarks/bench_chat.py [--tokens 1150000]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from bisect import bisect_right
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lwm_data.schemas import QA_SCHEMA

WORDS_PER_TOKEN = 0.61  # synthetic books, embedded tokenizer


def write_book(directory: Path, num_tokens: int) -> int:
    """Chunk rows and one QA pair per stated fact of a synthetic book; returns its token count."""
    from lwm_data.testing.books import generate_book
    from lwm_data.text.chunking import cut_chunks
    from lwm_data.tokenizers import load_tokenizer

    book = generate_book(1, int(num_tokens * WORDS_PER_TOKEN), "bench-book")
    tokenized = load_tokenizer(None).encode_with_offsets([book.text])[0]
    chunks = cut_chunks(book.text, tokenized, 1000)
    starts = [c.char_start for c in chunks]
    ids = tokenized.ids
    pq.write_table(
        pa.table(
            {
                "book_id": [book.id] * len(chunks),
                "chunk_index": pa.array([c.index for c in chunks], pa.int32()),
                "num_chunks": pa.array([len(chunks)] * len(chunks), pa.int32()),
                "num_tokens": pa.array([c.token_end - c.token_start for c in chunks], pa.int32()),
                "text": [book.text[c.char_start : c.char_end] for c in chunks],
                "tokens": pa.array([ids[c.token_start : c.token_end] for c in chunks], pa.list_(pa.int32())),
            }
        ),
        directory / "chunks.parquet",
    )
    pairs: dict[int, list[dict]] = {}
    for fact in book.facts:
        chunk = bisect_right(starts, book.text.find(fact.sentence)) - 1
        pairs.setdefault(chunk, []).append(
            {"question": f"What is the {fact.relation} of {fact.subject}?", "answer": fact.value}
        )
    rows = [
        {"book_id": book.id, "chunk_index": c, "pairs": p, "model": "m", "backend": "b", "prompt_version": "v"}
        for c, p in sorted(pairs.items())
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=QA_SCHEMA), directory / "qa.parquet")
    return len(ids)


def assemble_once(chunks: pa.Table, qa: pa.Table, context_length: int) -> int:
    from lwm_data import config as settings
    from lwm_data.pipelines.chat import AssembleChats, ChatStageConfig
    from lwm_data.tokenizers import load_tokenizer

    config = settings.build(
        ChatStageConfig, {"chunks": "", "qa": "", "output": "", "context_lengths": (context_length,)}
    )
    step = AssembleChats("chat", config, load_tokenizer(None).entry)
    step.setup()
    written = 0
    for table in step(("bench-book", {"chunks": [chunks], "qa": [qa]})):
        written += int(pa.compute.sum(table["num_tokens"]).as_py())
    return written


class RssPeak:
    """Peak resident memory above the starting level while the block runs (sampled every ms)."""

    def __enter__(self) -> RssPeak:
        self.start = self.peak = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(directory: Path, context_length: int) -> dict:
    """Memory first (the first assembly in a fresh process), then the median time of 3 runs."""
    from lwm_data.tokenizers import load_tokenizer

    chunks, qa = pq.read_table(directory / "chunks.parquet"), pq.read_table(directory / "qa.parquet")
    load_tokenizer(None)
    with RssPeak() as rss:
        assemble_once(chunks, qa, context_length)
    tracemalloc.start()
    assemble_once(chunks, qa, context_length)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        written = assemble_once(chunks, qa, context_length)
        seconds.append(time.perf_counter() - start)
    return {
        "written": written,
        "seconds": statistics.median(seconds),
        "traced_peak": traced_peak,
        "rss_growth": rss.growth,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1_150_000)
    parser.add_argument("--worker", nargs=2, metavar=("DIR", "CONTEXT"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), int(args.worker[1]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        book_tokens = write_book(directory, args.tokens)
        token_bytes = 4 * book_tokens
        print(f"book: {book_tokens:,} tokens, token array {token_bytes / 2**20:.1f} MiB")
        for context_length in (1_048_576, 32_768):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", tmp, str(context_length)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"context {context_length:>9,}: {r['written']:>10,} example tokens in {r['seconds']:.3f} s = "
                f"{r['written'] / r['seconds'] / 1e6:.2f} M tokens/s | traced peak {r['traced_peak'] / 2**20:.1f} MiB "
                f"= {r['traced_peak'] / token_bytes:.2f} x token array | rss growth {r['rss_growth'] / 2**20:.1f} MiB "
                f"= {r['rss_growth'] / token_bytes:.2f} x token array"
            )


if __name__ == "__main__":
    main()
