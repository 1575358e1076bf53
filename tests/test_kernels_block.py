"""block_attention with the torch backend against dense attention with the full mask (float64)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_data.kernels import block_attention
from lwm_data.kernels.common import TokenIds, attention_mask
from lwm_data.kernels.reference import dense_attention, random_packing


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    finite = expected.isfinite()
    assert torch.equal(finite, actual.isfinite()), "infinite entries differ"
    if not finite.any():
        return 0.0
    return ((actual - expected)[finite].abs().max() / expected[finite].abs().max().clamp_min(1e-300)).item()


def make_inputs(batch, seq_q, seq_k, q_heads, kv_heads, head_dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, q_heads, head_dim, generator=g, dtype=dtype)
    k, v = (torch.randn(batch, seq_k, kv_heads, head_dim, generator=g, dtype=dtype) for _ in range(2))
    q_ids = random_packing(batch, seq_q, g)
    k_ids = q_ids if seq_k == seq_q else random_packing(batch, seq_k, g)
    return q, k, v, q_ids, k_ids


def ids_kwargs(q_ids, k_ids):
    return dict(q_positions=q_ids[0], k_positions=k_ids[0], q_segment_ids=q_ids[1], k_segment_ids=k_ids[1])


def test_mask_semantics_by_hand():
    positions = torch.tensor([[0, 1, 2, 0, 1, 5]])
    segments = torch.tensor([[1, 1, 1, 2, 2, 0]])
    ids = TokenIds(positions, segments)
    expected_causal = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],  # padding attends nothing and is attended by nothing
        ],
        dtype=torch.bool,
    )
    assert torch.equal(attention_mask(ids, ids, causal=True)[0], expected_causal)
    full = attention_mask(ids, ids, causal=False)[0]
    assert full[0, 2] and not full[0, 3] and not full[5].any() and not full[:, 5].any()


@settings(max_examples=40, deadline=None)
@given(
    seq_q=st.integers(1, 40),
    seq_k=st.integers(1, 40),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 3]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_matches_dense(seq_q, seq_k, kv_heads, groups, causal, seed):
    q, k, v, q_ids, k_ids = make_inputs(2, seq_q, seq_k, kv_heads * groups, kv_heads, 8, seed)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    kwargs = ids_kwargs(q_ids, k_ids) | dict(causal=causal)
    out, lse = block_attention(q, k, v, backend="torch", **kwargs)
    ref_out, ref_lse = dense_attention(q, k, v, **kwargs)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert rel_err(out, ref_out) < 1e-10
    assert rel_err(lse.double(), ref_lse) < 1e-6  # lse is float32 by contract

    dout = torch.randn_like(out)
    # lse is float32, so its gradient is too: draw one float32 represents exactly.
    dlse = torch.randn_like(lse).double().masked_fill(ref_lse.isinf(), 0.0)
    grads = torch.autograd.grad((out * dout).sum() + (lse.nan_to_num(0, 0, 0) * dlse).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * dout).sum() + (ref_lse.nan_to_num(0, 0, 0) * dlse).sum(), (q, k, v))
    for grad, ref_grad in zip(grads, ref):
        assert rel_err(grad, ref_grad) < 1e-10


def test_gradcheck():
    q, k, v, q_ids, k_ids = make_inputs(1, 5, 6, 2, 1, 4, seed=1)
    k_ids = (k_ids[0], torch.tensor([[1, 1, 1, 2, 2, 2]]))
    q_ids = (q_ids[0], torch.tensor([[1, 1, 2, 2, 2, 2]])[:, :5])

    def fn(q, k, v):
        return block_attention(q, k, v, causal=False, backend="torch", **ids_kwargs(q_ids, k_ids))[0]

    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_() for x in (q, k, v)))


def test_rows_without_keys_give_zero_output_and_gradients():
    q, k, v, _, _ = make_inputs(1, 4, 4, 2, 2, 8, seed=2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    positions = torch.tensor([[0, 1, 2, 3]])
    q_segments = torch.tensor([[0, 1, 2, 2]])  # padding; a segment with no keys; a real one
    k_segments = torch.tensor([[2, 2, 2, 2]])
    out, lse = block_attention(
        q,
        k,
        v,
        q_positions=positions,
        k_positions=positions,
        q_segment_ids=q_segments,
        k_segment_ids=k_segments,
        backend="torch",
    )
    assert (out[:, :2] == 0).all() and (lse[..., :2] == float("-inf")).all() and lse[..., 2:].isfinite().all()
    (out.sum() + lse[..., 2:].sum()).backward()
    for grad in (q.grad, k.grad, v.grad):
        assert grad.isfinite().all()
    assert (q.grad[:, :2] == 0).all() and q.grad[:, 2:].abs().sum() > 0


def test_low_precision_inputs_keep_their_dtype():
    q, k, v, q_ids, k_ids = make_inputs(1, 16, 16, 4, 2, 8, seed=3, dtype=torch.bfloat16)
    out, lse = block_attention(q, k, v, backend="auto", **ids_kwargs(q_ids, k_ids))
    ref_out, _ = dense_attention(q, k, v, **ids_kwargs(q_ids, k_ids))
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(out.float(), ref_out) < 1e-2


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: (q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)), "GQA"),
        (lambda q, k, v: (q, k, v[:1]), "expected q"),
        (lambda q, k, v: (q[..., :4], k, v), "head dim"),
    ],
)
def test_rejects_mismatched_shapes(change, message):
    q, k, v, q_ids, k_ids = make_inputs(2, 8, 8, 4, 2, 8, seed=4)
    with pytest.raises(ValueError, match=message):
        block_attention(*change(q, k, v), **ids_kwargs(q_ids, k_ids))


def test_rejects_bad_ids_and_backend():
    q, k, v, q_ids, k_ids = make_inputs(2, 8, 8, 4, 2, 8, seed=5)
    with pytest.raises(ValueError, match="q_positions|positions"):
        block_attention(q, k, v, **ids_kwargs((q_ids[0][:, :4], q_ids[1]), k_ids))
    with pytest.raises(ValueError, match="unknown attention backend"):
        block_attention(q, k, v, backend="cuda", **ids_kwargs(q_ids, k_ids))


@settings(max_examples=30, deadline=None)
@given(
    seq=st.integers(1, 48),
    groups=st.sampled_from([1, 2]),
    causal=st.booleans(),
    layout=st.sampled_from(["random", "shuffled", "documents"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_fused_cpu_path_matches_dense(seq, groups, causal, layout, dtype, seed):
    """CPU float32/64 with no lse gradient runs ATen's flash kernel: per document for a row laid out as
    packing writes it, else with the mask as a bias; shuffled positions make the mask not index-causal,
    so the kernel must not skip the upper tiles."""
    from lwm_data.kernels.torch_backend import _documents

    q, k, v, q_ids, k_ids = make_inputs(2, seq, seq, 2 * groups, 2, 8, seed, dtype=dtype)
    if layout == "shuffled":
        q_ids = k_ids = (q_ids[0][:, torch.randperm(seq, generator=torch.Generator().manual_seed(seed))], q_ids[1])
    if layout == "documents":  # documents of 5 tokens, a padding tail
        tokens = torch.arange(seq).expand(2, seq)
        q_ids = k_ids = (tokens % 5, (tokens // 5 + 1).masked_fill(tokens >= seq - 2, 0))
        assert _documents(TokenIds(*q_ids), TokenIds(*k_ids)) is not None
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    kwargs = ids_kwargs(q_ids, k_ids) | dict(causal=causal)
    out, lse = block_attention(q, k, v, backend="torch", **kwargs)
    ref_out, ref_lse = dense_attention(q, k, v, **kwargs)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and rel_err(out.double(), ref_out.double()) < tolerance
    assert rel_err(lse.double(), ref_lse.double()) < 1e-5
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out.to(dtype) * dout).sum(), (q, k, v))
    for grad, ref_grad in zip(grads, ref):  # absolute below 1: a gradient that is 0 exactly comes out as rounding
        assert (grad.double() - ref_grad.double()).abs().max() <= tolerance * max(1.0, ref_grad.abs().max().item())


def test_fused_cpu_path_is_taken_without_lse_gradient(monkeypatch):
    from lwm_data.kernels import torch_backend

    def dense_refused(*args):
        raise AssertionError("dense path taken")

    q, k, v, q_ids, k_ids = make_inputs(1, 32, 32, 4, 2, 8, seed=5, dtype=torch.float32)
    q.requires_grad_()
    monkeypatch.setattr(torch_backend, "_masked_scores", dense_refused)
    out, _ = block_attention(q, k, v, backend="torch", **ids_kwargs(q_ids, k_ids))
    out.sum().backward()
    assert q.grad.isfinite().all()
    _, lse = block_attention(q, k, v, backend="torch", **ids_kwargs(q_ids, k_ids))
    with pytest.raises(AssertionError, match="dense path"):  # an lse gradient needs the dense backward
        lse[lse.isfinite()].sum().backward()
