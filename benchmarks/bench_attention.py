"""Attention kernels side by side: useful TFLOP/s of forward + backward, and the ring's overhead.

GPU (the figures that count): bf16, head dim 128, 32K tokens, causal with packed 4K-token documents.
  - lwm_data triton block_attention, and torch FlexAttention with the same document mask;
  - torch SDPA flash and cuDNN, causal only (no document mask): the dense-causal ceiling;
  - ring_attention simulated on one GPU (ring of 4, zigzag shards) against one block_attention call
    over the whole sequence: the ring's compute overhead (blocking, merging, skipping).
Useful FLOPs count only allowed (query, key) pairs: forward 4 * pairs * heads * head_dim, backward 2.5x
that. Correctness is checked first at a small size; the script exits non-zero if it fails.

Without CUDA the same script runs at reduced sizes with the torch backend, labelled CPU; those numbers
exercise the script and are not GPU figures.

    python benchmarks/bench_attention.py [--seq 32768 --doc 4096 --heads 16 --head-dim 128 --batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lwm_data.kernels import block_attention, shard_sequence, simulated_ring_attention, unshard_sequence
from lwm_data.kernels.common import TokenIds, attention_mask
from lwm_data.kernels.reference import dense_attention

RING_SIZE = 4
FLEX = "torch FlexAttention (compiled)"


@dataclass(frozen=True)
class Setup:
    device: str
    dtype: torch.dtype
    backend: str
    batch: int
    seq: int
    heads: int
    head_dim: int
    doc: int

    @property
    def label(self) -> str:
        name = torch.cuda.get_device_name() if self.device == "cuda" else "CPU (torch backend; not GPU figures)"
        return f"{name}: B={self.batch} S={self.seq} H={self.heads} D={self.head_dim} doc={self.doc} {self.dtype}"


GPU = Setup("cuda", torch.bfloat16, "triton", batch=1, seq=32768, heads=16, head_dim=128, doc=4096)
CPU = Setup("cpu", torch.float32, "torch", batch=1, seq=2048, heads=4, head_dim=64, doc=512)


def document_ids(setup: Setup, doc: int) -> TokenIds:
    """Positions 0..S-1 and back-to-back documents of `doc` tokens (segment ids 1, 2, ...)."""
    positions = torch.arange(setup.seq, device=setup.device).expand(setup.batch, -1)
    return TokenIds(positions, positions // doc + 1)


def random_qkv(setup: Setup, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(setup.device).manual_seed(seed)
    shape = (setup.batch, setup.seq, setup.heads, setup.head_dim)
    return [
        torch.randn(shape, generator=g, device=setup.device, dtype=setup.dtype, requires_grad=True) for _ in range(3)
    ]


def useful_pairs(ids: TokenIds, causal: bool, rows: int = 1024) -> int:
    """Allowed (query, key) pairs under the mask, counted in row chunks to bound memory."""
    chunks = zip(ids.positions.split(rows, 1), ids.segment_ids.split(rows, 1))
    return sum(int(attention_mask(TokenIds(*chunk), ids, causal).sum()) for chunk in chunks)


def tflops(pairs: int, setup: Setup, ms: float) -> float:
    return 3.5 * 4 * pairs * setup.heads * setup.head_dim / (ms * 1e-3) / 1e12


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------------
# Contenders: each maps (q, k, v) in (B, S, H, D) to out


def ours(ids: TokenIds, backend: str) -> Callable:
    def attend(q, k, v):
        return block_attention(
            q,
            k,
            v,
            q_positions=ids.positions,
            k_positions=ids.positions,
            q_segment_ids=ids.segment_ids,
            k_segment_ids=ids.segment_ids,
            backend=backend,
        )[0]

    return attend


def ring(ids: TokenIds, backend: str, world_size: int = RING_SIZE) -> Callable:
    """Simulated ring over zigzag shards; arranging and unarranging is outside what a real rank does,
    so it is done here only for checking; `ring_step` (below) times the ring alone."""

    def attend(q, k, v):
        out = simulated_ring_attention(
            *(arrange(x, world_size) for x in (q, k, v)),
            positions=arrange(ids.positions, world_size),
            segment_ids=arrange(ids.segment_ids, world_size),
            world_size=world_size,
            backend=backend,
        )
        return unshard_sequence(out.chunk(world_size, 1), "zigzag")

    return attend


def arrange(x: torch.Tensor, world_size: int) -> torch.Tensor:
    return torch.cat([shard_sequence(x, r, world_size, "zigzag") for r in range(world_size)], 1)


def flex(ids: TokenIds) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    segments, seq = ids.segment_ids, ids.segment_ids.shape[1]

    def document_causal(b, h, q_idx, kv_idx):
        return (segments[b, q_idx] == segments[b, kv_idx]) & (kv_idx <= q_idx)

    block_mask = create_block_mask(document_causal, segments.shape[0], None, seq, seq, device=segments.device)
    run = torch.compile(flex_attention)

    def attend(q, k, v):
        return run(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=block_mask).transpose(1, 2)

    return attend


def sdpa(backend: SDPBackend | list[SDPBackend]) -> Callable:
    def attend(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
        return out.transpose(1, 2)

    return attend


# ---------------------------------------------------------------------------------------------------
# Timing


def fwd_bwd_ms(attend: Callable, inputs: list[torch.Tensor]) -> float:
    """Median milliseconds of forward + backward (gradients of q, k, v for a fixed random dout)."""
    dout = torch.randn_like(attend(*inputs))

    def step():
        torch.autograd.grad(attend(*inputs), inputs, dout)

    if inputs[0].is_cuda:
        from triton.testing import do_bench

        return do_bench(step, warmup=200, rep=1000, return_mode="median")
    step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def ring_step(ids: TokenIds, inputs: list[torch.Tensor], backend: str) -> tuple[Callable, list[torch.Tensor]]:
    """The simulated ring on inputs already in rank order, as each rank holds them."""
    arranged = [arrange(x.detach(), RING_SIZE).requires_grad_() for x in inputs]
    positions, segments = (arrange(x, RING_SIZE) for x in ids)

    def attend(q, k, v):
        return simulated_ring_attention(
            q, k, v, positions=positions, segment_ids=segments, world_size=RING_SIZE, backend=backend
        )

    return attend, arranged


# ---------------------------------------------------------------------------------------------------
# Correctness at a small size, then the table


def check(setup: Setup) -> None:
    small = replace(setup, seq=1024, heads=4, doc=256)
    if setup.device == "cpu":
        small = replace(small, dtype=torch.float64)
    ids = document_ids(small, small.doc)
    inputs = random_qkv(small, seed=1)
    dout = torch.randn_like(inputs[0])
    ref = dense_attention(  # computes in float32 (float64 on CPU) whatever the input dtype
        *inputs,
        q_positions=ids.positions,
        k_positions=ids.positions,
        q_segment_ids=ids.segment_ids,
        k_segment_ids=ids.segment_ids,
    )[0]
    ref_grads = torch.autograd.grad(ref, inputs, dout.to(ref.dtype))
    checked = {f"block_attention[{setup.backend}]": ours(ids, setup.backend), "ring of 4": ring(ids, setup.backend)}
    if setup.device == "cuda":
        checked["flex_attention"] = flex(ids)
    tolerance = 1e-10 if small.dtype == torch.float64 else 5e-2
    failed = False
    for name, attend in checked.items():
        out = attend(*inputs)
        grads = torch.autograd.grad(out, inputs, dout)
        errors = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
        ok = max(errors) < tolerance
        failed |= not ok
        print(f"check {name:24} vs dense reference: max rel err {max(errors):.1e} {'ok' if ok else 'FAILED'}")
    if failed:
        sys.exit("correctness check failed; not timing")


def contenders(setup: Setup, docs: TokenIds, causal: TokenIds) -> list[tuple]:
    """(name, mask, attend, useful pairs, optional): an optional SDPA backend the card lacks is reported."""
    doc_pairs, causal_pairs = useful_pairs(docs, True), useful_pairs(causal, True)
    rows = [(f"lwm block_attention [{setup.backend}]", "causal+doc", ours(docs, setup.backend), doc_pairs, False)]
    if setup.device == "cpu":  # FlexAttention has no CPU backward; SDPA picks its CPU kernel
        cpu_sdpa = sdpa([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
        return rows + [("torch SDPA (CPU default)", "causal", cpu_sdpa, causal_pairs, False)]
    return rows + [
        (FLEX, "causal+doc", flex(docs), doc_pairs, False),
        ("torch SDPA flash", "causal", sdpa(SDPBackend.FLASH_ATTENTION), causal_pairs, True),
        ("torch SDPA cuDNN", "causal", sdpa(SDPBackend.CUDNN_ATTENTION), causal_pairs, True),
    ]


def print_table(setup: Setup, rows: list[tuple], inputs: list[torch.Tensor]) -> None:
    print(f"\n{'kernel':34} {'mask':11} {'fwd+bwd ms':>11} {'useful TFLOP/s':>15}")
    results = {}
    for name, mask, attend, pairs, optional in rows:
        try:
            ms = fwd_bwd_ms(attend, inputs)
        except RuntimeError as error:
            if not optional:
                raise
            print(f"{name:34} {mask:11} unavailable: {str(error).splitlines()[0][:60]}")
            continue
        results[name] = tflops(pairs, setup, ms)
        print(f"{name:34} {mask:11} {ms:11.2f} {results[name]:15.3g}")
    if FLEX in results:
        print(f"triton / FlexAttention (causal+doc): {results[rows[0][0]] / results[FLEX]:.2f}x (goal >= 1.0x)")


def print_ring_overhead(setup: Setup, masks: dict[str, TokenIds], inputs: list[torch.Tensor]) -> None:
    print(f"\nring_attention simulated, ring of {RING_SIZE} (zigzag), vs one block_attention call [{setup.backend}]")
    for mask, ids in masks.items():
        single = fwd_bwd_ms(ours(ids, setup.backend), inputs)
        ring_ms = fwd_bwd_ms(*ring_step(ids, inputs, setup.backend))
        print(f"  {mask:11} block {single:9.2f} ms   ring {ring_ms:9.2f} ms   overhead {ring_ms / single - 1:+.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    base = GPU if torch.cuda.is_available() else CPU
    for field in ("batch", "seq", "heads", "head_dim", "doc"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(base, field))
    setup = replace(base, **vars(parser.parse_args()))
    print(f"{setup.label}\ntorch {torch.__version__}")
    check(setup)

    inputs = random_qkv(setup)
    docs, causal = document_ids(setup, setup.doc), document_ids(setup, setup.seq)
    print_table(setup, contenders(setup, docs, causal), inputs)
    print_ring_overhead(setup, {"causal+doc": docs, "causal": causal}, inputs)


if __name__ == "__main__":
    main()
