"""The GPU half of issues 10 and 11 in one run, one table: kernels, attention speed, ring, trainer.

    python benchmarks/gpu_check.py            # on one H100/H200 (about 6-8 minutes)
    python benchmarks/gpu_check.py --small    # CPU, tiny sizes: exercises the script, not GPU figures

1. Triton `block_attention` forward and backward in bf16 against the torch backend on the same bf16
   inputs (which accumulates in float32; with --small: the torch backend in float32 against float64),
   random packed documents with padding, B=2 S=1000 H=8, D=64 (8 KV heads) and D=128 (2 KV heads),
   causal and not. Bounds (max abs error / max abs value):
   out <= 2e-2, lse <= 1e-3, dq/dk/dv <= 5e-2.
2. Useful TFLOP/s of forward + backward at S=32K, D=128, 16 heads, causal with 4K documents:
   Triton `block_attention` against compiled FlexAttention with the same document mask (goal >= 1.0x),
   and cuDNN SDPA on plain causal for reference (benchmarks/bench_attention.py's contenders).
3. `simulated_ring_attention`, ring of 4 (zigzag), against one block_attention call (goal <= +10%).
4. The trainer (lwm_data.train, world 1, bf16, packed rows of ~4K-token documents with segment
   masks): tokens/s and MFU against 989 TFLOP/s for the ~1B preset at 32K, with and without
   activation checkpointing (goal MFU >= 45%; anchor: plain PyTorch LLaMA-1.24B, causal SDPA, no
   masks, 43.6% without / 34.4% with activation checkpointing on an H200).
5. The trainer continuing a checkpoint (`init_from`) of the ~1B shape, which the script saves first in
   Hugging Face's layout (random weights, text only; `vision = true` adds LWM's heads, Stage II): the
   seconds to build and load it, and tokens/s and MFU at 32K as in 4 (goal MFU >= 45%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_attention as attention  # noqa: E402
from bench_train import write_packed  # noqa: E402

from lwm_data.kernels import block_attention  # noqa: E402
from lwm_data.kernels.reference import random_packing  # noqa: E402
from lwm_data.train import checkpoint, parallel  # noqa: E402
from lwm_data.train.config import PhaseConfig, TrainConfig  # noqa: E402
from lwm_data.train.model import Transformer  # noqa: E402
from lwm_data.train.trainer import Trainer, train  # noqa: E402

PEAK_TFLOPS = 989.0  # H100/H200 dense bf16
BOUNDS = {"out": 2e-2, "lse": 1e-3, "dq": 5e-2, "dk": 5e-2, "dv": 5e-2}
rows: list[tuple[str, str, str, str]] = []  # (check, measured, goal, verdict)


def add(check: str, measured: str, goal: str, ok: bool | None) -> None:
    rows.append((check, measured, goal, "-" if ok is None else ("ok" if ok else "MISSED")))
    print(f"{check}: {measured} (goal {goal})", flush=True)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    finite = expected.isfinite() & actual.isfinite()
    return ((actual.double() - expected.double())[finite].abs().max() / expected.double()[finite].abs().max()).item()


def kernel_errors(device: str, backend: str, dtype: torch.dtype, reference_dtype: torch.dtype) -> None:
    """`backend` on `dtype` inputs against the torch backend on the same inputs cast to `reference_dtype`."""
    for head_dim, kv_heads in ((64, 8), (128, 2)):
        for causal in (True, False):
            g = torch.Generator().manual_seed(head_dim + causal)
            q = torch.randn(2, 1000, 8, head_dim, generator=g).to(device, dtype)
            k, v = (torch.randn(2, 1000, kv_heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
            positions, segments = (x.to(device) for x in random_packing(2, 1000, g))
            dout = torch.randn(q.shape, generator=g).to(device, dtype)
            dlse = torch.randn(2, 8, 1000, generator=g).to(device)
            results = []
            for name, cast in ((backend, dtype), ("torch", reference_dtype)):
                inputs = [x.detach().to(cast).requires_grad_() for x in (q, k, v)]
                out, lse = block_attention(
                    *inputs,
                    q_positions=positions,
                    k_positions=positions,
                    q_segment_ids=segments,
                    k_segment_ids=segments,
                    causal=causal,
                    backend=name,
                )
                loss = (out.double() * dout.double()).sum() + (lse.double().nan_to_num(0, 0, 0) * dlse.double()).sum()
                results.append((out, lse, *torch.autograd.grad(loss, inputs)))
            errors = {n: rel_err(a, b) for n, a, b in zip(BOUNDS, *results)}
            measured = " ".join(f"{n} {e:.1e}" for n, e in errors.items())
            add(
                f"{backend} {dtype} vs torch {reference_dtype} D={head_dim} Hkv={kv_heads} causal={causal}",
                measured,
                "out 2e-2 lse 1e-3 d* 5e-2",
                all(errors[n] <= b for n, b in BOUNDS.items()),
            )


def attention_speed(setup: attention.Setup) -> None:
    inputs = attention.random_qkv(setup)
    docs, causal = attention.document_ids(setup, setup.doc), attention.document_ids(setup, setup.seq)
    doc_pairs, causal_pairs = attention.useful_pairs(docs, True), attention.useful_pairs(causal, True)
    ours = attention.tflops(doc_pairs, setup, attention.fwd_bwd_ms(attention.ours(docs, setup.backend), inputs))
    label = f"S={setup.seq} D={setup.head_dim} H={setup.heads} doc={setup.doc}"
    if setup.device == "cuda":
        flex = attention.tflops(doc_pairs, setup, attention.fwd_bwd_ms(attention.flex(docs), inputs))
        add(
            f"block_attention[{setup.backend}] fwd+bwd {label}",
            f"{ours:.0f} TFLOP/s vs Flex {flex:.0f} = {ours / flex:.2f}x",
            ">= 1.0x Flex",
            ours >= flex,
        )
        try:
            cudnn_ms = attention.fwd_bwd_ms(attention.sdpa(attention.SDPBackend.CUDNN_ATTENTION), inputs)
            add(
                "cuDNN SDPA plain causal (reference)",
                f"{attention.tflops(causal_pairs, setup, cudnn_ms):.0f} TFLOP/s",
                "-",
                None,
            )
        except RuntimeError as error:
            add("cuDNN SDPA plain causal (reference)", f"unavailable: {str(error)[:50]}", "-", None)
    else:
        add(
            f"block_attention[{setup.backend}] fwd+bwd {label}",
            f"{ours:.3g} TFLOP/s (CPU; no Flex backward)",
            "-",
            None,
        )
    single = attention.fwd_bwd_ms(attention.ours(docs, setup.backend), inputs)
    ring_ms = attention.fwd_bwd_ms(*attention.ring_step(docs, inputs, setup.backend))
    add(
        f"simulated ring of {attention.RING_SIZE} vs one block call ({label})",
        f"{ring_ms / single - 1:+.1%}",
        "<= +10%",
        ring_ms / single - 1 <= 0.10,
    )


def trainer_config(model: str, data: str, seq_len: int, steps: int, checkpointing: bool, **values) -> TrainConfig:
    phase = PhaseConfig(seq_len=seq_len, steps=steps, rope_theta=1e6, data=data)
    config = TrainConfig(
        model=model,
        attention_backend="auto",
        dtype="auto",
        batch_size=1,
        num_workers=2,
        activation_checkpointing=checkpointing,
        progress=False,
        peak_tflops=PEAK_TFLOPS,
        lr=1e-4,
        phases=(phase,),
        **values,
    )
    config.validate()
    return config


def packed_rows(directory: str, steps: int, seq_len: int) -> str:
    return write_packed(os.path.join(directory, "packed"), steps + 1, seq_len, doc_tokens=(seq_len // 16, seq_len // 4))


def add_mfu(label: str, records: list[dict], small: bool, note: str = "") -> None:
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in records)
    mfu = statistics.median(r["mfu"] for r in records)
    add(
        label,
        f"{note}{tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} of {PEAK_TFLOPS:.0f}"
        + (" (CPU: not a GPU figure)" if small else ""),
        "MFU >= 45%",
        None if small else mfu >= 0.45,
    )


def trainer(model: str, seq_len: int, steps: int, checkpointing: bool, small: bool) -> None:
    label = f"trainer {model} S={seq_len} {'AC' if checkpointing else 'no AC'}"
    with tempfile.TemporaryDirectory() as tmp:
        config = trainer_config(model, packed_rows(tmp, steps, seq_len), seq_len, steps, checkpointing)
        try:
            records = train(config)[2:]  # 2 warm-up steps
        except torch.OutOfMemoryError:
            add(label, "out of memory", "MFU >= 45%", False)
            torch.cuda.empty_cache()
            return
    add_mfu(label, records, small)


def save_hf_checkpoint(model: str, directory: str, device: str) -> None:
    """A Hugging Face LLaMA checkpoint of a preset's shape (random weights, text only)."""
    text_only = TrainConfig(model=model, vision=False).model_config()
    with torch.device(device):
        weights = Transformer(text_only)
    weights.init_weights(0)
    checkpoint.export_safetensors(directory, weights, text_only, rope_theta=1e6, max_positions=32768)


def trainer_init_from(model: str, seq_len: int, steps: int, small: bool) -> None:
    """Continue a saved checkpoint of the preset's shape: seconds to build and load, then MFU."""
    label = f"trainer init_from {model} S={seq_len}"
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(model, os.path.join(tmp, "model"), "cpu" if small else "cuda")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the saved weights' memory, before the run
        config = trainer_config(model, packed_rows(tmp, steps, seq_len), seq_len, steps, False,
                                init_from=os.path.join(tmp, "model"), vision=True)  # fmt: skip
        par = parallel.setup(config.ring_size)
        try:
            started = time.perf_counter()
            run = Trainer(config, par)
            loaded = time.perf_counter() - started
            records = [r for r in run.fit(config.resolved_phases()) if "loss" in r][2:]
        except torch.OutOfMemoryError:
            add(label, "out of memory", "MFU >= 45%", False)
            return
        finally:
            parallel.teardown(par)
    add_mfu(label, records, small, note=f"built and loaded in {loaded:.2f} s; ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized run of every part (no GPU figures)")
    parser.add_argument("--steps", type=int, default=6, help="trainer steps per run (2 are warm-up)")
    args = parser.parse_args()
    small = args.small or not torch.cuda.is_available()
    if small:
        print("no GPU (or --small): tiny CPU sizes, torch backend; these are not GPU figures")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    parts = [
        (
            "kernels",
            lambda: kernel_errors(
                *(
                    ("cpu", "torch", torch.float32, torch.float64)
                    if small
                    else ("cuda", "triton", torch.bfloat16, torch.bfloat16)
                )
            ),
        ),
        ("attention", lambda: attention_speed(attention.CPU if small else attention.GPU)),
        ("trainer", lambda: trainer("tiny" if small else "1b", 1024 if small else 32768, args.steps, False, small)),
        ("trainer AC", lambda: trainer("tiny" if small else "1b", 1024 if small else 32768, args.steps, True, small)),
        (
            "trainer init_from",
            lambda: trainer_init_from("tiny" if small else "1b", 1024 if small else 32768, args.steps, small),
        ),
    ]
    for name, part in parts:
        try:
            part()
        except Exception:  # one failing part must not hide the others' figures
            traceback.print_exc()
            add(name, "FAILED (traceback above)", "-", False)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  {'measured':<60}  {'goal':<26}  verdict")
    for check, measured, goal, verdict in rows:
        print(f"{check:<{width}}  {measured:<60}  {goal:<26}  {verdict}")
    sys.exit(1 if any(r[3] == "MISSED" for r in rows) else 0)


if __name__ == "__main__":
    main()
