"""Packing plans at LAION scale: one plan over every length against independent hashed partitions.

    python benchmarks/bench_pack_scale.py [--examples 5000000] [--seq-len 8192] [--partition-tokens 268435456]

Lengths like image-text pairs (257-600 tokens, uniform), ids hashed into partitions of about
`--partition-tokens` tokens exactly as the pack job does (`lwm_data.packing.partition_of`); each plan
is `plan_packing` (seeded shuffle, `fill_rows`), what one worker runs. Figures: fill, planning
tokens/s (all partitions in series on one core), and peak memory of one plan (tracemalloc: numpy
arrays included; the largest partition's), which is what bounds a worker. Goals: fill >= 99.5%,
partitioned fill within 0.1 point of the single plan.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
import zlib

import numpy as np

from lwm_data.packing import PackOptions, num_partitions, partition_options, plan_packing

FILL_GOAL, GAP_GOAL = 0.995, 0.001


def measured_plan(lengths: np.ndarray, options: PackOptions, trace_memory: bool) -> tuple[int, float, int]:
    """(rows, seconds, peak bytes) of one plan; memory is traced in a second run (tracing slows numpy)."""
    kinds = np.full(len(lengths), "image_text", dtype=object)
    splittable = np.zeros(len(lengths), bool)
    start = time.perf_counter()
    plan = plan_packing(lengths, kinds, splittable, options)
    seconds = time.perf_counter() - start
    peak = 0
    if trace_memory:
        tracemalloc.start()
        plan_packing(lengths, kinds, splittable, options)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return plan.num_rows, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5_000_000)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--partition-tokens", type=int, default=1 << 28)
    args = parser.parse_args()

    lengths = np.random.default_rng(0).integers(257, 601, args.examples)
    total = int(lengths.sum())
    options = PackOptions(seq_len=args.seq_len)
    partitions = num_partitions(total, args.partition_tokens)
    # the pack job's hash of each example id, vectorised over the ids it would see
    ids = np.fromiter((zlib.crc32(f"ex-{i:09d}".encode()) for i in range(args.examples)), np.int64, args.examples)
    groups = ids % partitions

    rows, seconds, peak = measured_plan(lengths, options, trace_memory=True)
    single_fill = total / (rows * args.seq_len)
    largest = int(np.bincount(groups, minlength=partitions).argmax())  # the worker that needs the most memory
    results = [
        measured_plan(lengths[groups == p], partition_options(options, p), p == largest) for p in range(partitions)
    ]
    part_rows = sum(r for r, _, _ in results)
    part_fill = total / (part_rows * args.seq_len)
    part_seconds = sum(s for _, s, _ in results)
    part_peak = max(m for _, _, m in results)

    print(f"{args.examples:,} examples of 257-600 tokens ({total / 1e9:.2f}B tokens) into {args.seq_len}-token rows")
    print(f"{'plan':24} {'rows':>10} {'fill':>8} {'tokens/s':>10} {'peak MiB/worker':>16}")
    print(f"{'single':24} {rows:10,} {single_fill:8.4%} {total / seconds / 1e6:9.1f}M {peak / 2**20:16.0f}")
    print(
        f"{f'{partitions} partitions':24} {part_rows:10,} {part_fill:8.4%} {total / part_seconds / 1e6:9.1f}M "
        f"{part_peak / 2**20:16.0f}"
    )
    print(
        f"fill goal >= {FILL_GOAL:.1%}: single {single_fill / FILL_GOAL:.4f}x, "
        f"partitioned {part_fill / FILL_GOAL:.4f}x; "
        f"gap {100 * (single_fill - part_fill):.3f} points (goal <= {100 * GAP_GOAL:.1f}); "
        f"peak memory {part_peak / peak:.2f}x the single plan's"
    )


if __name__ == "__main__":
    main()
