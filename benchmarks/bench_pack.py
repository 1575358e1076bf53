"""Packing fill and speed: lwm-data's packer (`fill_rows`) vs greedy in-order packing.

Greedy in-order is what seqio's trim-and-pack does: take examples in order, start a new row when the
next one does not fit. Both packers run on the same examples and share the row builder, so the
difference is the assignment alone. Inputs (synthetic, seeded):
    (a) LWM-like chat mix at 32K: examples of 1K-8K tokens, plus 10% of 8K-32K
    (b) mostly short examples at 8K: log-normal lengths, median ~1.5K, clipped to [16, 8K]

    .venv/bin/python benchmarks/bench_pack.py [--tokens N] [--repeats R]

Prints fill (non-pad tokens / all tokens) for both packers and packing throughput (tokens/s, one
core, median of repeats after a warm-up) beside the goals as ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lwm_data.examples import Examples
from lwm_data.packing import PackOptions, PackPlan, build_rows, packed_table, plan_packing
from lwm_data.testing.packing import gather_pieces

FILL_GOAL = 0.995
TOKENS_PER_SECOND_GOAL = 20e6


def chat_mix_lengths(rng: np.random.Generator, total_tokens: int) -> np.ndarray:
    n = total_tokens // 6500  # mean length of the mix below
    long = rng.random(n) < 0.1
    return np.where(long, rng.integers(8192, 32769, n), rng.integers(1024, 8193, n))


def short_lengths(rng: np.random.Generator, total_tokens: int) -> np.ndarray:
    n = total_tokens // 2000
    return np.clip(np.exp(rng.normal(np.log(1500), 0.8, n)), 16, 8192).astype(np.int64)


def synthetic_examples(lengths: np.ndarray, rng: np.random.Generator) -> Examples:
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Examples(
        example_ids=np.array([f"ex{i}" for i in range(len(lengths))], dtype=object),
        kinds=np.full(len(lengths), "chat", dtype=object),
        offsets=offsets,
        tokens=rng.integers(0, 32000, total, dtype=np.int32),
        loss_weights=(rng.random(total, dtype=np.float32) < 0.9).astype(np.float32),
        vision_mask=np.zeros(total, bool),
    )


def greedy_in_order_plan(lengths: np.ndarray, seq_len: int) -> PackPlan:
    """seqio-style: examples in order, a new row whenever the next one does not fit."""
    lengths = np.minimum(lengths, seq_len)
    row = np.empty(len(lengths), np.int64)
    current, room = 0, seq_len
    for i, length in enumerate(lengths.tolist()):
        if length > room:
            current, room = current + 1, seq_len
        row[i] = current
        room -= length
    first_of_row = np.searchsorted(row, row)
    return PackPlan(
        np.arange(len(lengths)),
        np.zeros(len(lengths), np.int64),
        lengths,
        row,
        np.arange(len(lengths)) - first_of_row,
        current + 1,
    )


def pack_with(plan_fn, examples: Examples, seq_len: int):
    plan = plan_fn()
    tokens, weights, vision = gather_pieces(examples, plan)
    columns = build_rows(tokens, weights, vision, plan.length, plan.row, plan.num_rows, seq_len)
    table = packed_table(columns, examples.example_ids[plan.example], examples.kinds[plan.example], plan.start)
    return table, plan


def measure(plan_fn, examples: Examples, seq_len: int, repeats: int) -> tuple[float, float]:
    """(fill, median seconds of `repeats` runs after one warm-up run)."""
    pack_with(plan_fn, examples, seq_len)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        table, plan = pack_with(plan_fn, examples, seq_len)
        seconds.append(time.perf_counter() - start)
    pad = int(np.sum(table["num_pad_tokens"].to_numpy()))
    return 1 - pad / (table.num_rows * seq_len), float(np.median(seconds))


def run_case(name: str, lengths: np.ndarray, seq_len: int, repeats: int, rng: np.random.Generator) -> None:
    examples = synthetic_examples(lengths, rng)
    options = PackOptions(seq_len=seq_len, overflow="truncate")
    splittable = np.zeros(len(lengths), bool)
    packer = lambda: plan_packing(lengths, examples.kinds, splittable, options)  # noqa: E731
    fill, seconds = measure(packer, examples, seq_len, repeats)
    greedy_fill, greedy_s = measure(lambda: greedy_in_order_plan(lengths, seq_len), examples, seq_len, repeats)
    tokens = int(np.minimum(lengths, seq_len).sum())
    rate, greedy_rate = tokens / seconds, tokens / greedy_s
    print(
        f"{name}: {len(lengths):,} examples, {tokens / 1e6:.1f}M tokens, median length "
        f"{int(np.median(lengths)):,}, seq_len {seq_len:,}"
    )
    print(
        f"  fill      lwm-data {fill:.4%}  greedy in-order {greedy_fill:.4%}  "
        f"goal >= {FILL_GOAL:.1%}: ratio {fill / FILL_GOAL:.3f}"
    )
    print(
        f"  tokens/s  lwm-data {rate / 1e6:.1f}M  greedy in-order {greedy_rate / 1e6:.1f}M  "
        f"goal >= {TOKENS_PER_SECOND_GOAL / 1e6:.0f}M: ratio {rate / TOKENS_PER_SECOND_GOAL:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1 << 25, help="tokens per input (about)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    run_case("(a) chat mix @32K", chat_mix_lengths(rng, args.tokens), 32768, args.repeats, rng)
    run_case("(b) short examples @8K", short_lengths(rng, args.tokens), 8192, args.repeats, rng)


if __name__ == "__main__":
    main()
