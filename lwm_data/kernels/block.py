"""Attention of a block of queries over a block of keys with causal and packed-segment masks.

A backend is a module with two functions computing in the accumulation dtype (float32, or float64
for float64 inputs) and returning lse and gradients in it (the softmax delta is each backend's own):
    forward(q, k, v, q_ids, k_ids, causal, scale, out_dtype) -> (out, lse)
    backward(dout, q, k, v, out, lse, q_ids, k_ids, causal, scale, dlse=None) -> (dq, dk, dv)
`backward` is given the output and lse of the whole softmax and the gradient reaching lse directly
(None when unused, which lets a backend use a kernel that knows no lse gradient). `torch_backend`
runs anywhere (fused on CPU); `triton_backend` is the fused GPU kernel. The ring calls them per block.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch
from torch import Tensor

from . import torch_backend
from .common import TokenIds, resolve_scale


def _triton_backend() -> ModuleType:
    from . import triton_backend  # imported on demand: triton is optional and slow to import

    return triton_backend


def resolve_backend(name: str, q: Tensor) -> ModuleType:
    """The backend module for `name`: "torch", "triton", or "auto" (triton on CUDA when it supports q)."""
    if name == "auto":
        use_triton = q.is_cuda and importlib.util.find_spec("triton") is not None
        name = "triton" if use_triton and _triton_backend().unsupported_reason(q) is None else "torch"
    if name == "torch":
        return torch_backend
    if name == "triton":
        backend = _triton_backend()
        reason = backend.unsupported_reason(q)
        if reason is not None:
            raise ValueError(f"triton backend: {reason}")
        return backend
    raise ValueError(f"unknown attention backend {name!r}; expected 'auto', 'torch' or 'triton'")


def check_inputs(q: Tensor, k: Tensor, v: Tensor, q_ids: TokenIds, k_ids: TokenIds) -> None:
    """Raise ValueError unless q is (B, Sq, Hq, D), k and v are (B, Sk, Hkv, D) with Hkv | Hq, and the
    ids are (B, Sq) and (B, Sk) integer tensors."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D); got {q.shape}, {k.shape}, {v.shape}")
    (b, _, hq, d), (bk, _, hkv, dk) = q.shape, k.shape
    if b != bk or d != dk or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch, head dim or GQA groups")
    for ids, x, side in ((q_ids, q, "q"), (k_ids, k, "k")):
        for name, t in zip(ids._fields, ids):
            if t.shape != x.shape[:2] or t.is_floating_point():
                raise ValueError(f"{side} {name} must be an integer (B, S) = {tuple(x.shape[:2])} tensor")


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, backend):
        q_ids, k_ids = TokenIds(q_pos, q_seg), TokenIds(k_pos, k_seg)
        out, lse = backend.forward(q, k, v, q_ids, k_ids, causal, scale, q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, q_seg, k_pos, k_seg)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        ctx.set_materialize_grads(False)  # an unused lse gets dlse None, not zeros
        return out, lse.float()

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, q_pos, q_seg, k_pos, k_seg = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = ctx.backend.backward(
            dout, q, k, v, out, lse, TokenIds(q_pos, q_seg), TokenIds(k_pos, k_seg), ctx.causal, ctx.scale, dlse
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    q_positions: Tensor,
    k_positions: Tensor,
    q_segment_ids: Tensor,
    k_segment_ids: Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention of q (B, Sq, Hq, D) over k, v (B, Sk, Hkv, D); Hq a multiple of Hkv (GQA).

    Query i may attend key j iff q_segment_ids[i] == k_segment_ids[j] != 0 (0 is padding) and, when
    causal, k_positions[j] <= q_positions[i]; positions and segment ids are (B, S) integer tensors.
    Returns out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) float32, the natural-log normaliser.
    A query with no allowed key gets out 0, lse -inf and zero gradients. Differentiable in q, k, v
    (through out and lse). `softmax_scale` defaults to 1 / sqrt(D); `backend` is "auto", "torch" or
    "triton" (auto: triton for CUDA tensors it supports, torch otherwise).
    """
    q_ids, k_ids = TokenIds(q_positions, q_segment_ids), TokenIds(k_positions, k_segment_ids)
    check_inputs(q, k, v, q_ids, k_ids)
    impl = resolve_backend(backend, q)
    scale = resolve_scale(softmax_scale, q.shape[-1])
    return _BlockAttention.apply(q, k, v, *q_ids, *k_ids, causal, scale, impl)
