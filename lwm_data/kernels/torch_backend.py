"""Reference attention backend in plain torch: exact, any device, any float dtype including float64.

It materialises the (Sq, Sk) scores of one block pair per KV head, so it suits the block sizes the
ring hands it (and CPU training and tests), not whole million-token sequences. The backward recomputes
the scores (flash style) from the saved lse, so the ring can call it per block with the global lse.

GQA: query head h uses KV head h // (Hq // Hkv). Queries of one group are stacked along the row axis,
so one matmul per KV head serves the whole group and K/V are never repeated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import TokenIds, accumulation_dtype, attention_mask


def _grouped(x: Tensor, kv_heads: int) -> Tensor:
    """(B, S, Hq, D) -> (B, Hkv, G * S, D) in the accumulation dtype; row g * S + i is head hk * G + g."""
    b, s, h, d = x.shape
    x = x.to(accumulation_dtype(x.dtype)).view(b, s, kv_heads, h // kv_heads, d)
    return x.permute(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, d)


def _ungrouped(x: Tensor, seq: int) -> Tensor:
    """Inverse of `_grouped`: (B, Hkv, G * S, D) -> (B, S, Hq, D)."""
    b, kv_heads, _, d = x.shape
    return x.view(b, kv_heads, -1, seq, d).permute(0, 3, 1, 2, 4).reshape(b, seq, -1, d)


def _heads_first(x: Tensor) -> Tensor:
    """(B, S, Hkv, D) -> (B, Hkv, S, D) in the accumulation dtype."""
    return x.to(accumulation_dtype(x.dtype)).transpose(1, 2)


def _masked_scores(q: Tensor, k: Tensor, q_ids: TokenIds, k_ids: TokenIds, causal: bool, scale: float) -> Tensor:
    """(B, Hkv, G * Sq, Sk) scaled scores, -inf where the mask forbids the pair."""
    b, sq, hq, _ = q.shape
    kv_heads = k.shape[2]
    scores = _grouped(q, kv_heads) @ _heads_first(k).transpose(-1, -2) * scale
    forbidden = ~attention_mask(q_ids, k_ids, causal)[:, None, None]
    return scores.view(b, kv_heads, hq // kv_heads, sq, -1).masked_fill(forbidden, float("-inf")).flatten(2, 3)


def _probabilities(scores: Tensor, lse: Tensor) -> Tensor:
    """exp(scores - lse); rows with lse = -inf (no allowed key) give zeros rather than NaN."""
    return torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_ids: TokenIds,
    k_ids: TokenIds,
    causal: bool,
    scale: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """out (B, Sq, Hq, D) in `out_dtype` and lse (B, Hq, Sq) in the accumulation dtype."""
    b, sq, hq, _ = q.shape
    scores = _masked_scores(q, k, q_ids, k_ids, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = _probabilities(scores, lse) @ _heads_first(v)
    return _ungrouped(out, sq).to(out_dtype), lse.view(b, hq, sq)


def softmax_delta(out: Tensor, dout: Tensor) -> Tensor:
    """(B, Hq, Sq) row sums of out * dout, the softmax backward's correction term."""
    acc = accumulation_dtype(out.dtype)
    return (out.to(acc) * dout.to(acc)).sum(-1).transpose(1, 2)


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    delta: Tensor,
    q_ids: TokenIds,
    k_ids: TokenIds,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the accumulation dtype for one block pair.

    `lse` and `delta` are those of the whole softmax the block belongs to (the ring passes the merged
    ones), so the probabilities recomputed here are the block's share of the full attention.
    """
    b, sq, _, _ = q.shape
    kv_heads = k.shape[2]
    scores = _masked_scores(q, k, q_ids, k_ids, causal, scale)
    p = _probabilities(scores, lse.reshape(b, kv_heads, -1))
    do = _grouped(dout, kv_heads)
    dv = p.transpose(-1, -2) @ do
    ds = p * (do @ _heads_first(v).transpose(-1, -2) - delta.reshape(b, kv_heads, -1)[..., None])
    dq = _ungrouped(ds @ _heads_first(k) * scale, sq)
    dk = ds.transpose(-1, -2) @ _grouped(q, kv_heads) * scale
    return dq, dk.transpose(1, 2), dv.transpose(1, 2)
