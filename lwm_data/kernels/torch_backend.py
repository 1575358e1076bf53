"""Attention backend in plain torch: exact, any device, any float dtype including float64.

Two paths compute the same thing. On CPU, float32 and float64 blocks go to ATen's fused flash kernel
(the one SDPA uses on CPU), which never materialises the scores and runs on every core: a row's own
block laid out as packing writes it (each document one run of increasing positions) is one plain
causal call per document, so masked-out pairs cost nothing; any other block passes the mask as an
additive bias, the kernel skipping the tiles above the diagonal when the mask allows it. Everything else (bf16,
GPUs without Triton, an lse gradient) takes the dense path, which materialises the (Sq, Sk) scores of
one block pair per KV head: fine for the block sizes the ring hands it, not for whole million-token
sequences. Both backwards recompute the probabilities (flash style) from the given lse, so the ring
can call them per block with the merged lse and output.

GQA: query head h uses KV head h // (Hq // Hkv). The dense path stacks the queries of one group along
the row axis, so one matmul per KV head serves the whole group and K/V are never repeated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import TokenIds, accumulation_dtype, attention_mask

_FUSED_DTYPES = (torch.float32, torch.float64)
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


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
    if _fused(q, out_dtype):
        return _fused_forward(q, k, v, q_ids, k_ids, causal, scale)
    return _dense_forward(q, k, v, q_ids, k_ids, causal, scale, out_dtype)


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_ids: TokenIds,
    k_ids: TokenIds,
    causal: bool,
    scale: float,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv in the accumulation dtype for one block pair.

    `out` and `lse` are those of the whole softmax the block belongs to (the ring passes the merged
    ones), so the probabilities recomputed here are the block's share of the full attention; `dlse`
    is the gradient reaching lse directly, None when nothing used it.
    """
    if dlse is None and _fused(q, out.dtype):
        return _fused_backward(dout, q, k, v, out, lse, q_ids, k_ids, causal, scale)
    # d lse_i / d s_ij = p_ij, so an lse gradient just shifts delta: ds = p * (dp - (delta - dlse)).
    delta = _softmax_delta(out, dout) if dlse is None else _softmax_delta(out, dout) - dlse
    return _dense_backward(dout, q, k, v, lse, delta, q_ids, k_ids, causal, scale)


def _softmax_delta(out: Tensor, dout: Tensor) -> Tensor:
    """(B, Hq, Sq) row sums of out * dout, the softmax backward's correction term."""
    acc = accumulation_dtype(out.dtype)
    return (out.to(acc) * dout.to(acc)).sum(-1).transpose(1, 2)


# Fused path: ATen's CPU flash kernel, in (B, H, S, D) layout.


def _fused(q: Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the fused kernel serves this block: CPU, float32/64, output kept in q's dtype (the ring
    asks for accumulation-dtype outputs, which are q's own for these dtypes)."""
    return q.device.type == "cpu" and q.dtype in _FUSED_DTYPES and out_dtype == q.dtype


def _additive_mask(q_ids: TokenIds, k_ids: TokenIds, causal: bool, dtype: torch.dtype) -> tuple[Tensor, bool, Tensor]:
    """The mask as a (B, 1, Sq, Sk) bias of 0 / -inf; whether it is also index-causal; (B, Sq) rows with a key.

    Index-causal (no allowed pair above the diagonal) holds for a row's own block whenever positions
    increase within each document, as packing writes them; the kernel then skips the upper tiles.
    """
    allowed = attention_mask(q_ids, k_ids, causal)
    index_causal = causal and allowed.shape[1] == allowed.shape[2] and not allowed.triu(1).any()
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return bias[:, None], index_causal, allowed.any(-1)


def _heads_major(*xs: Tensor) -> list[Tensor]:
    """(B, S, H, D) <-> (B, H, S, D), as views."""
    return [x.transpose(1, 2) for x in xs]


def _documents(q_ids: TokenIds, k_ids: TokenIds) -> list[list[tuple[int, int]]] | None:
    """Per batch row, each document's token range (start, end), when queries and keys are the same
    tokens laid out as packing writes them (each segment one run, positions increasing within it);
    None otherwise. Then the mask is causal attention within each run, and each run is one plain call."""
    if q_ids.segment_ids.shape != k_ids.segment_ids.shape or not (
        torch.equal(q_ids.segment_ids, k_ids.segment_ids) and torch.equal(q_ids.positions, k_ids.positions)
    ):
        return None
    seg, pos = q_ids.segment_ids, q_ids.positions
    same = seg[:, 1:] == seg[:, :-1]
    if (same & (seg[:, 1:] != 0) & (pos[:, 1:] <= pos[:, :-1])).any():
        return None
    documents = []
    for row in seg:
        bounds = [0, *(torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist(), len(row)]
        ids = row[bounds[:-1]].tolist()
        runs = [(start, end) for start, end, segment in zip(bounds, bounds[1:], ids) if segment != 0]
        if len(runs) != len({segment for segment in ids if segment != 0}):
            return None  # a segment in two runs: its tokens may attend across the gap
        documents.append(runs)
    return documents


def _fused_forward(q, k, v, q_ids, k_ids, causal, scale) -> tuple[Tensor, Tensor]:
    documents = _documents(q_ids, k_ids)
    if documents is not None:
        return _forward_by_document(q, k, v, documents, causal, scale)
    bias, index_causal, has_key = _additive_mask(q_ids, k_ids, causal, q.dtype)
    out, lse = _FLASH(*_heads_major(q, k, v), is_causal=index_causal, attn_mask=bias, scale=scale)
    # The kernel gives rows without a key out 0 and lse 0; the contract says lse -inf.
    return out.transpose(1, 2), lse.masked_fill(~has_key[:, None], float("-inf"))


def _forward_by_document(q, k, v, documents, causal, scale) -> tuple[Tensor, Tensor]:
    """Padding gets out 0, lse -inf; each document attends within itself, unmasked."""
    out = torch.zeros_like(q)
    lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"))
    for row, runs in enumerate(documents):
        for start, end in runs:
            doc = slice(start, end)
            o, doc_lse = _FLASH(
                *_heads_major(*(x[row : row + 1, doc] for x in (q, k, v))), is_causal=causal, scale=scale
            )
            out[row, doc], lse[row, :, doc] = o[0].transpose(0, 1), doc_lse[0]
    return out, lse


def _fused_backward(dout, q, k, v, out, lse, q_ids, k_ids, causal, scale) -> tuple[Tensor, Tensor, Tensor]:
    documents = _documents(q_ids, k_ids)
    if documents is not None:
        return _backward_by_document(dout, q, k, v, out, lse, documents, causal, scale)
    bias, index_causal, _ = _additive_mask(q_ids, k_ids, causal, q.dtype)
    # Rows without a key: any finite lse gives p = exp(-inf - lse) = 0, as the kernel's forward assumed.
    finite_lse = lse.masked_fill(lse == float("-inf"), 0.0)
    grads = _FLASH_BACKWARD(
        *_heads_major(dout, q, k, v, out), finite_lse, 0.0, index_causal, attn_mask=bias, scale=scale
    )
    return tuple(_heads_major(*grads))


def _backward_by_document(dout, q, k, v, out, lse, documents, causal, scale) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
    for row, runs in enumerate(documents):
        for start, end in runs:
            doc = slice(start, end)
            pieces = _heads_major(*(x[row : row + 1, doc] for x in (dout, q, k, v, out)))
            grads = _FLASH_BACKWARD(*pieces, lse[row : row + 1, :, doc], 0.0, causal, scale=scale)
            for grad, piece in zip((dq, dk, dv), grads):
                grad[row, doc] = piece[0].transpose(0, 1)
    return dq, dk, dv


# Dense path: scores materialised per block pair, queries of a GQA group stacked along the rows.


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


def _dense_forward(q, k, v, q_ids, k_ids, causal, scale, out_dtype) -> tuple[Tensor, Tensor]:
    b, sq, hq, _ = q.shape
    scores = _masked_scores(q, k, q_ids, k_ids, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = _probabilities(scores, lse) @ _heads_first(v)
    return _ungrouped(out, sq).to(out_dtype), lse.view(b, hq, sq)


def _dense_backward(dout, q, k, v, lse, delta, q_ids, k_ids, causal, scale) -> tuple[Tensor, Tensor, Tensor]:
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
