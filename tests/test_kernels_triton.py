"""The Triton backend against the torch backend: on CPU through the Triton interpreter (fp32, tiny sizes,
in a subprocess so TRITON_INTERPRET=1 never leaks into this session), and on CUDA when present (bf16)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lwm_data.kernels import block_attention, shard_sequence, simulated_ring_attention, unshard_sequence
from lwm_data.kernels.common import TokenIds
from lwm_data.kernels.reference import random_packing

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_gpu = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    finite = expected.isfinite()
    assert torch.equal(finite, actual.isfinite()), "infinite entries differ"
    return ((actual - expected)[finite].abs().max() / expected[finite].abs().max()).item()


def random_inputs(batch, seq_q, seq_k, q_heads, kv_heads, head_dim, *, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, q_heads, head_dim, generator=g)
    k, v = (torch.randn(batch, seq_k, kv_heads, head_dim, generator=g) for _ in range(2))
    q_ids = random_packing(batch, seq_q, g)
    k_ids = q_ids if seq_q == seq_k else random_packing(batch, seq_k, g)
    tensors = [x.to(device, dtype) for x in (q, k, v)]
    return tensors, TokenIds(*(x.to(device) for x in q_ids)), TokenIds(*(x.to(device) for x in k_ids))


def backend_errors(q, k, v, q_ids, k_ids, causal, backend="triton", reference="torch"):
    """Relative errors of out, lse, dq, dk, dv (loss through out and lse) of `backend` vs `reference`."""
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=g).to(q)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=g).to(q.device)
    results = []
    for name in (backend, reference):
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        out, lse = block_attention(
            *inputs,
            q_positions=q_ids.positions,
            k_positions=k_ids.positions,
            q_segment_ids=q_ids.segment_ids,
            k_segment_ids=k_ids.segment_ids,
            causal=causal,
            backend=name,
        )
        loss = (out.float() * dout.float()).sum() + (lse.nan_to_num(0, 0, 0) * dlse).sum()
        results.append((out, lse, *torch.autograd.grad(loss, inputs)))
    return {name: rel_err(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results)}


def ring_error(q, k, v, ids, world_size, layout, causal, backend):
    """Relative error of the simulated ring's out against one block_attention call, same backend."""

    def arrange(x):
        return torch.cat([shard_sequence(x, r, world_size, layout) for r in range(world_size)], 1)

    out = simulated_ring_attention(
        *map(arrange, (q, k, v)),
        positions=arrange(ids.positions),
        segment_ids=arrange(ids.segment_ids),
        world_size=world_size,
        causal=causal,
        backend=backend,
    )
    expected, _ = block_attention(
        q,
        k,
        v,
        q_positions=ids.positions,
        k_positions=ids.positions,
        q_segment_ids=ids.segment_ids,
        k_segment_ids=ids.segment_ids,
        causal=causal,
        backend=backend,
    )
    return rel_err(unshard_sequence(out.chunk(world_size, 1), layout), expected)


# ---------------------------------------------------------------------------------------------------
# CPU: the Triton interpreter (run as a script in a subprocess by the test below)


def interpreter_checks() -> None:
    """fp32 Triton vs torch at tiny sizes; 16x16 tiles so every schedule case (full, partial, skipped,
    ragged tail) occurs. Raises AssertionError on the first mismatch."""
    cpu = dict(dtype=torch.float32, device="cpu")
    cases = {
        "packed gqa": random_inputs(2, 40, 40, 4, 2, 16, **cpu),
        "packed mha ragged": random_inputs(1, 37, 37, 2, 2, 32, **cpu, seed=1),
        "sq != sk": random_inputs(1, 24, 40, 2, 1, 16, **cpu, seed=2),
    }
    (q, k, v), _, _ = random_inputs(1, 48, 48, 2, 1, 16, **cpu, seed=3)
    one_document = TokenIds(torch.arange(48)[None], torch.ones(1, 48, dtype=torch.long))
    cases["one document"] = ((q, k, v), one_document, one_document)
    offset = TokenIds(one_document.positions[:, :32] + 48, one_document.segment_ids[:, :32])
    cases["later queries"] = ((q[:, :32], k, v), offset, one_document)
    for name, ((q, k, v), q_ids, k_ids) in cases.items():
        for causal in (True, False):
            errors = backend_errors(q, k, v, q_ids, k_ids, causal)
            print(f"{name:18} causal={causal!s:5} " + " ".join(f"{n}={e:.1e}" for n, e in errors.items()))
            assert max(errors.values()) < 1e-5, (name, causal, errors)

    (q, k, v), ids, _ = random_inputs(1, 64, 64, 4, 2, 16, **cpu, seed=4)
    err = ring_error(q, k, v, ids, world_size=2, layout="zigzag", causal=True, backend="triton")
    print(f"simulated ring of 2 (triton) vs block: {err:.1e}")
    assert err < 1e-5
    check_rows_without_keys()


def check_rows_without_keys() -> None:
    q, k, v = (torch.randn(1, 16, 2, 16, requires_grad=True) for _ in range(3))
    positions = torch.arange(16)[None]
    q_segments = torch.tensor([[0] * 4 + [1] * 4 + [2] * 8])  # padding, a segment absent from keys, a real one
    out, lse = block_attention(
        q,
        k,
        v,
        q_positions=positions,
        k_positions=positions,
        q_segment_ids=q_segments,
        k_segment_ids=torch.full((1, 16), 2),
        backend="triton",
    )
    (out.sum() + lse[..., 8:].sum()).backward()
    assert (out[:, :8] == 0).all() and (lse[..., :8] == float("-inf")).all() and lse[..., 8:].isfinite().all()
    assert all(g.isfinite().all() for g in (q.grad, k.grad, v.grad)) and (q.grad[:, :8] == 0).all()
    print("rows without keys: out 0, lse -inf, zero and finite gradients")


@needs_triton
def test_triton_interpreter_matches_torch():
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@needs_triton
def test_schedule_visits_only_tiles_with_allowed_pairs():
    from lwm_data.kernels.triton_backend import _schedule

    one_document = TokenIds(torch.arange(64)[None], torch.ones(1, 64, dtype=torch.long))
    full_count, full_index, part_count, part_index = _schedule(one_document, one_document, True, 16, 16, False)
    assert full_count.tolist() == [[0, 1, 2, 3]] and part_count.tolist() == [[1, 1, 1, 1]]
    assert part_index[0, :, 0].tolist() == [0, 1, 2, 3] and full_index[0, 3, :3].tolist() == [0, 1, 2]

    two_documents = TokenIds(torch.arange(64)[None] % 32, torch.arange(64)[None] // 32 + 1)
    full_count, _, part_count, _ = _schedule(two_documents, two_documents, False, 16, 16, by_keys=True)
    assert (full_count == 2).all() and (part_count == 0).all()  # each key tile meets its own document only


# ---------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)


@needs_gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim, kv_heads", [(64, 8), (128, 2)])
def test_triton_matches_torch_on_gpu(causal, head_dim, kv_heads):
    inputs, q_ids, k_ids = random_inputs(2, 1000, 1000, 8, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    errors = backend_errors(*inputs, q_ids, k_ids, causal)
    assert errors["out"] < 2e-2 and errors["lse"] < 1e-3, errors
    assert max(errors[n] for n in ("dq", "dk", "dv")) < 5e-2, errors


@needs_gpu
def test_auto_backend_is_triton_on_gpu():
    from lwm_data.kernels import triton_backend
    from lwm_data.kernels.block import resolve_backend

    assert resolve_backend("auto", torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)) is triton_backend


@needs_gpu
def test_simulated_ring_with_triton_on_gpu():
    (q, k, v), ids, _ = random_inputs(1, 1024, 1024, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    assert ring_error(q, k, v, ids, world_size=4, layout="zigzag", causal=True, backend="triton") < 2e-2


if __name__ == "__main__":
    interpreter_checks()
