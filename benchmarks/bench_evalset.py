"""The evalset builder against the tokenizer's raw encode rate of the same text, at 128K and 1M.

    python benchmarks/bench_evalset.py [--lengths 131072,1048576] [--tasks niah_single,...]

Raw: one `encode` of each built prompt's text, the floor for any builder that reports an honest token
count. Builder: each task's row function (lwm_data.text.evalset) for one prompt per task and length
(depth 0.5) over a haystack built once (encoded once with offsets, its time reported apart). Goals: a prompt builds
in <= 2x the raw encode of its text, and a 1M-token prompt in <= 5 s.
"""

from __future__ import annotations

import argparse
import random
import time

from lwm_data.testing.books import generate_books
from lwm_data.text.evalset import (
    EvalsetConfig,
    build_haystack,
    common_words_row,
    frequent_words_row,
    niah_row,
    variable_tracking_row,
    vocabulary,
)
from lwm_data.tokenizers import load_tokenizer

GOAL_RATIO, GOAL_1M_SECONDS = 2.0, 5.0
TASKS = "niah_single,niah_multiquery,variable_tracking,common_words,frequent_words"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="131072,1048576")
    parser.add_argument("--tasks", default=TASKS)
    args = parser.parse_args()
    lengths = tuple(int(n) for n in args.lengths.split(","))
    tasks = tuple(args.tasks.split(","))
    tokenizer = load_tokenizer()
    books = [(b.id, b.text) for b in generate_books(num_books=24, num_words=40_000, seed=11)]

    start = time.perf_counter()
    haystack = build_haystack([t for _, t in books], tokenizer, max(lengths))
    haystack_seconds = time.perf_counter() - start
    words = vocabulary(haystack.text)
    print(f"haystack: {haystack.num_tokens:,} tokens, encoded once with offsets in {haystack_seconds:.2f} s")
    print(
        f"{'task':18}{'length':>9}{'build s':>9}{'raw s':>8}{'ratio':>7}{'prompts/s':>11}{'Mtok/s':>8}"
        f"{'raw Mtok/s':>11}"
    )
    worst, slowest_1m = 0.0, 0.0
    for task in tasks:
        for length in lengths:
            config, rng = EvalsetConfig((length,), (0.5,), (task,), seed=1), random.Random(1)
            start = time.perf_counter()
            if task.startswith("niah"):
                row = niah_row(task, haystack, tokenizer, length, 0.5, rng, config, "bench")
            elif task == "variable_tracking":
                row = variable_tracking_row(haystack, tokenizer, length, rng, config, "bench")
            elif task == "common_words":
                row = common_words_row(words, tokenizer, length, rng, config, "bench")
            else:
                row = frequent_words_row(tokenizer, length, rng, config, "bench")
            built = time.perf_counter() - start
            start = time.perf_counter()
            raw_tokens = len(tokenizer.encode(row["prompt"]))
            raw = time.perf_counter() - start
            ratio = built / raw
            worst = max(worst, ratio)
            if length >= 1 << 20:
                slowest_1m = max(slowest_1m, built)
            print(
                f"{task:18}{length:9,}{built:9.2f}{raw:8.2f}{ratio:7.2f}{1 / built:11.2f}"
                f"{row['prompt_tokens'] / built / 1e6:8.2f}{raw_tokens / raw / 1e6:11.2f}"
            )
    print(
        f"worst build / raw encode: {worst:.2f}x (goal <= {GOAL_RATIO}x): {'met' if worst <= GOAL_RATIO else 'NOT met'}"
    )
    if slowest_1m:
        met = "met" if slowest_1m <= GOAL_1M_SECONDS else "NOT met"
        print(f"slowest 1M prompt: {slowest_1m:.2f} s (goal <= {GOAL_1M_SECONDS} s): {met}")


if __name__ == "__main__":
    main()
