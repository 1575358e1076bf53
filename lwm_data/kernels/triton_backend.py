"""Fused flash-attention forward and backward in Triton, for GPUs (and the Triton interpreter on CPU).

The mask is `common`'s, computed in-kernel from positions and segment ids. Before each launch a tile
schedule is built from per-tile position/segment ranges: for every query tile (forward, dq) or key tile
(dk/dv), the tiles on the other side that may hold allowed pairs, split into full tiles (every pair
allowed: no mask arithmetic, no bounds checks) and partial ones (mask per element). Empty tiles are
never visited, so packed documents and causal masks cost only their useful tiles.

Layouts: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) with unit stride along D; lse and delta (B, Hq, Sq)
float32. Scores are kept in base 2 (exp2) inside the kernels; the lse they return is natural-log.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import TokenIds, TokenRanges, all_attend, may_attend, padding_free, token_ranges

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


def unsupported_reason(q: Tensor) -> str | None:
    """Why this backend cannot run on q, or None when it can."""
    if not (q.is_cuda or _INTERPRET):
        return "needs CUDA tensors (or TRITON_INTERPRET=1)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not float16, bfloat16 or float32"
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head dim {d} is not a power of two in [16, 256]"
    return None


# ---------------------------------------------------------------------------------------------------
# Tile schedule


class _Tiles(NamedTuple):
    """(row tile, column tile) sizes of each kernel: rows are what a program owns, columns what it visits."""

    forward: tuple[int, int]
    dkdv: tuple[int, int]
    dq: tuple[int, int]


def _tiles(head_dim: int) -> _Tiles:
    if _INTERPRET:
        return _Tiles((16, 16), (16, 16), (16, 16))
    if head_dim <= 64:
        return _Tiles((128, 64), (128, 64), (128, 64))
    if head_dim <= 128:
        return _Tiles((128, 64), (64, 64), (128, 64))
    return _Tiles((64, 32), (32, 32), (64, 32))


class _Schedule(NamedTuple):
    """Per (batch, row tile): how many column tiles to visit and which, full ones then partial ones."""

    full_count: Tensor  # (B, rows) int32
    full_index: Tensor  # (B, rows, cols) int32, the first full_count entries used
    part_count: Tensor
    part_index: Tensor


def _visit_lists(flags: Tensor) -> tuple[Tensor, Tensor]:
    """(B, R, C) bool -> per row the number of True columns and their indices, ascending, first."""
    count = flags.sum(-1, dtype=torch.int32)
    index = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count.contiguous(), index.contiguous()


def _schedule(q_ids: TokenIds, k_ids: TokenIds, causal: bool, q_tile: int, k_tile: int, by_keys: bool) -> _Schedule:
    """Rows are query tiles, or key tiles when `by_keys` (the dk/dv kernel walks queries per key tile)."""
    q = TokenRanges(*(r[:, :, None] for r in token_ranges(q_ids, q_tile)))
    k = TokenRanges(*(r[:, None, :] for r in token_ranges(k_ids, k_tile)))
    dense = padding_free(q_ids, q_tile)[:, :, None] & padding_free(k_ids, k_tile)[:, None, :]
    full = all_attend(q, k, causal) & dense
    partial = may_attend(q, k, causal) & ~full
    if by_keys:
        full, partial = full.transpose(1, 2), partial.transpose(1, 2)
    return _Schedule(*_visit_lists(full), *_visit_lists(partial))


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (4, 3), (8, 2), (8, 3))]


_TUNING_KEY = ["HEAD_DIM", "BLOCK_M", "BLOCK_N"]

# ---------------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _allowed(q_pos, q_seg, k_pos, k_seg, CAUSAL: tl.constexpr):
    """The mask on broadcast-shaped ids: same non-zero segment and, when causal, key not after query."""
    ok = (q_seg == k_seg) & (q_seg != 0)
    if CAUSAL:
        ok = ok & (k_pos <= q_pos)
    return ok


@triton.jit
def _load_rows(base, start, stride, seq, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Rows start .. start + BLOCK of a (seq, HEAD_DIM) matrix; rows past seq read as 0 when MASKED."""
    rows = tl.arange(0, BLOCK)
    ptrs = base + start * stride + rows[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        x = tl.load(ptrs, mask=(start + rows < seq)[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _load_vector(base, start, seq, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Entries start .. start + BLOCK of a length-seq vector; entries past seq read as 0 when MASKED."""
    offs = start + tl.arange(0, BLOCK)
    if MASKED:
        x = tl.load(base + offs, mask=offs < seq, other=0)
    else:
        x = tl.load(base + offs)
    return x


@triton.jit
def _store_rows(base, start, stride, seq, x, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    ptrs = base + start * stride + rows[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(start + rows < seq)[:, None])


@triton.jit
def _log2_lse(lse):
    """lse in base 2 for exp2(score - lse); rows without keys (-inf) become +inf so that p = 0, not NaN."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


# ---------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _forward_tiles(
    acc, l_i, m_i, q, q_pos, q_seg, K, V, KPos, KSeg, tiles, count, stride_ks, stride_vs, seq_k, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Online softmax over the listed key tiles; m_i is the running row max of base-2 scores."""
    for i in range(count):
        start = tl.load(tiles + i).to(tl.int64) * BLOCK_N
        k = _load_rows(K, start, stride_ks, seq_k, BLOCK_N, HEAD_DIM, MASKED)
        v = _load_rows(V, start, stride_vs, seq_k, BLOCK_N, HEAD_DIM, MASKED)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            k_pos = _load_vector(KPos, start, seq_k, BLOCK_N, MASKED)
            k_seg = _load_vector(KSeg, start, seq_k, BLOCK_N, MASKED)
            allowed = _allowed(q_pos[:, None], q_seg[:, None], k_pos[None, :], k_seg[None, :], CAUSAL)
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed key yet: keep p and alpha 0
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_ref = m_new
        p = tl.exp2(qk - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs(), key=_TUNING_KEY)
@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse, QPos, QSeg, KPos, KSeg, FullCount, FullIndex, PartCount, PartIndex,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, seq_q, seq_k, heads, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M queries of one (batch, query head)."""
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    q = _load_rows(Q + b * stride_qb + h * stride_qh, start, stride_qs, seq_q, BLOCK_M, HEAD_DIM, True)
    q_pos = _load_vector(QPos + b * seq_q, start, seq_q, BLOCK_M, True)
    q_seg = _load_vector(QSeg + b * seq_q, start, seq_q, BLOCK_M, True)
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    row = b * tl.num_programs(0) + tl.program_id(0)
    tiles = row * tl.cdiv(seq_k, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _forward_tiles(
        acc, l_i, m_i, q, q_pos, q_seg, K, V, KPos + b * seq_k, KSeg + b * seq_k,
        FullIndex + tiles, tl.load(FullCount + row), stride_ks, stride_vs, seq_k, qk_scale,
        BLOCK_N, HEAD_DIM, CAUSAL, MASKED=False,
    )  # fmt: skip
    acc, l_i, m_i = _forward_tiles(
        acc, l_i, m_i, q, q_pos, q_seg, K, V, KPos + b * seq_k, KSeg + b * seq_k,
        PartIndex + tiles, tl.load(PartCount + row), stride_ks, stride_vs, seq_k, qk_scale,
        BLOCK_N, HEAD_DIM, CAUSAL, MASKED=True,
    )  # fmt: skip

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)  # rows without keys have acc = 0 and get out 0, lse -inf
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    _store_rows(Out + b * stride_ob + h * stride_oh, start, stride_os, seq_q, acc / l_safe[:, None], BLOCK_M, HEAD_DIM)
    offs = start + tl.arange(0, BLOCK_M)
    tl.store(Lse + bh.to(tl.int64) * seq_q + offs, lse, mask=offs < seq_q)


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
    """out (B, Sq, Hq, D) in `out_dtype` and lse (B, Hq, Sq) float32."""
    q, k, v = (_unit_stride(x) for x in (q, k, v))
    (b, sq, hq, d), (sk, hkv) = q.shape, k.shape[1:3]
    block_m, block_n = _tiles(d).forward
    schedule = _schedule(q_ids, k_ids, causal, block_m, block_n, by_keys=False)
    out = q.new_empty(q.shape, dtype=out_dtype)
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    _forward_kernel[(triton.cdiv(sq, block_m), b * hq)](
        q, k, v, out, lse, *_contiguous(*q_ids, *k_ids), *schedule,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        sq, sk, hq, scale * LOG2E.value,
        GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
    )  # fmt: skip
    return out, lse


# ---------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(out * dout); dk/dv per key tile (looping over the GQA group); dq per query tile


@triton.jit
def _delta_kernel(
    Out, DOut, Delta, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh, seq, heads,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    o = _load_rows(Out + b * stride_ob + h * stride_oh, start, stride_os, seq, BLOCK_M, HEAD_DIM, True)
    do = _load_rows(DOut + b * stride_db + h * stride_dh, start, stride_ds, seq, BLOCK_M, HEAD_DIM, True)
    offs = start + tl.arange(0, BLOCK_M)
    tl.store(Delta + bh.to(tl.int64) * seq + offs, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs < seq)


def _softmax_delta(out: Tensor, dout: Tensor) -> Tensor:
    """(B, Hq, Sq) float32 row sums of out * dout."""
    out, dout = _unit_stride(out), _unit_stride(dout)
    b, s, h, d = out.shape
    delta = out.new_empty((b, h, s), dtype=torch.float32)
    block_m = 16 if _INTERPRET else 64
    _delta_kernel[(triton.cdiv(s, block_m), b * h)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], s, h, HEAD_DIM=d, BLOCK_M=block_m
    )
    return delta


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, k_pos, k_seg, Q, DO, Lse, Delta, QPos, QSeg, tiles, count, stride_qs, stride_dos, seq_q,
    qk_scale, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Accumulate one query head's contribution to a key tile's dk, dv over the listed query tiles."""
    for i in range(count):
        start = tl.load(tiles + i).to(tl.int64) * BLOCK_M
        q = _load_rows(Q, start, stride_qs, seq_q, BLOCK_M, HEAD_DIM, MASKED)
        do = _load_rows(DO, start, stride_dos, seq_q, BLOCK_M, HEAD_DIM, MASKED)
        lse = _log2_lse(_load_vector(Lse, start, seq_q, BLOCK_M, MASKED))
        delta = _load_vector(Delta, start, seq_q, BLOCK_M, MASKED)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if MASKED:
            q_pos = _load_vector(QPos, start, seq_q, BLOCK_M, MASKED)
            q_seg = _load_vector(QSeg, start, seq_q, BLOCK_M, MASKED)
            p_t = tl.where(_allowed(q_pos[None, :], q_seg[None, :], k_pos[:, None], k_seg[:, None], CAUSAL), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.autotune(configs=_configs(), key=_TUNING_KEY)
@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, QPos, QSeg, KPos, KSeg, FullCount, FullIndex, PartCount, PartIndex,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    seq_q, seq_k, kv_heads, qk_scale, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N keys of one (batch, KV head), over all query heads of its group (no atomics)."""
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    hk = bh % kv_heads
    start = tl.program_id(0).to(tl.int64) * BLOCK_N
    k = _load_rows(K + b * stride_kb + hk * stride_kh, start, stride_ks, seq_k, BLOCK_N, HEAD_DIM, True)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, start, stride_vs, seq_k, BLOCK_N, HEAD_DIM, True)
    k_pos = _load_vector(KPos + b * seq_k, start, seq_k, BLOCK_N, True)
    k_seg = _load_vector(KSeg + b * seq_k, start, seq_k, BLOCK_N, True)
    col = b * tl.num_programs(0) + tl.program_id(0)
    tiles = col * tl.cdiv(seq_q, BLOCK_M)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        rows = (b * kv_heads * GROUP + h) * seq_q
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, k_pos, k_seg, q_base, do_base, Lse + rows, Delta + rows, QPos + b * seq_q,
            QSeg + b * seq_q, FullIndex + tiles, tl.load(FullCount + col), stride_qs, stride_dos, seq_q,
            qk_scale, BLOCK_M, HEAD_DIM, CAUSAL, MASKED=False,
        )  # fmt: skip
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, k_pos, k_seg, q_base, do_base, Lse + rows, Delta + rows, QPos + b * seq_q,
            QSeg + b * seq_q, PartIndex + tiles, tl.load(PartCount + col), stride_qs, stride_dos, seq_q,
            qk_scale, BLOCK_M, HEAD_DIM, CAUSAL, MASKED=True,
        )  # fmt: skip
    _store_rows(DK + b * stride_dkb + hk * stride_dkh, start, stride_dks, seq_k, dk * scale, BLOCK_N, HEAD_DIM)
    _store_rows(DV + b * stride_dvb + hk * stride_dvh, start, stride_dvs, seq_k, dv, BLOCK_N, HEAD_DIM)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, q_pos, q_seg, K, V, KPos, KSeg, tiles, count, stride_ks, stride_vs, seq_k, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Accumulate a query tile's dq over the listed key tiles."""
    for i in range(count):
        start = tl.load(tiles + i).to(tl.int64) * BLOCK_N
        k = _load_rows(K, start, stride_ks, seq_k, BLOCK_N, HEAD_DIM, MASKED)
        v = _load_rows(V, start, stride_vs, seq_k, BLOCK_N, HEAD_DIM, MASKED)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            k_pos = _load_vector(KPos, start, seq_k, BLOCK_N, MASKED)
            k_seg = _load_vector(KSeg, start, seq_k, BLOCK_N, MASKED)
            p = tl.where(_allowed(q_pos[:, None], q_seg[:, None], k_pos[None, :], k_seg[None, :], CAUSAL), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.autotune(configs=_configs(), key=_TUNING_KEY)
@triton.jit
def _dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, QPos, QSeg, KPos, KSeg, FullCount, FullIndex, PartCount, PartIndex,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    seq_q, seq_k, heads, qk_scale, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M queries of one (batch, query head)."""
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    start = tl.program_id(0).to(tl.int64) * BLOCK_M
    q = _load_rows(Q + b * stride_qb + h * stride_qh, start, stride_qs, seq_q, BLOCK_M, HEAD_DIM, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, start, stride_dos, seq_q, BLOCK_M, HEAD_DIM, True)
    lse = _log2_lse(_load_vector(Lse + bh.to(tl.int64) * seq_q, start, seq_q, BLOCK_M, True))
    delta = _load_vector(Delta + bh.to(tl.int64) * seq_q, start, seq_q, BLOCK_M, True)
    q_pos = _load_vector(QPos + b * seq_q, start, seq_q, BLOCK_M, True)
    q_seg = _load_vector(QSeg + b * seq_q, start, seq_q, BLOCK_M, True)
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    row = b * tl.num_programs(0) + tl.program_id(0)
    tiles = row * tl.cdiv(seq_k, BLOCK_N)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_tiles(
        dq, q, do, lse, delta, q_pos, q_seg, K, V, KPos + b * seq_k, KSeg + b * seq_k, FullIndex + tiles,
        tl.load(FullCount + row), stride_ks, stride_vs, seq_k, qk_scale, BLOCK_N, HEAD_DIM, CAUSAL, MASKED=False,
    )  # fmt: skip
    dq = _dq_tiles(
        dq, q, do, lse, delta, q_pos, q_seg, K, V, KPos + b * seq_k, KSeg + b * seq_k, PartIndex + tiles,
        tl.load(PartCount + row), stride_ks, stride_vs, seq_k, qk_scale, BLOCK_N, HEAD_DIM, CAUSAL, MASKED=True,
    )  # fmt: skip
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, start, stride_dqs, seq_q, dq * scale, BLOCK_M, HEAD_DIM)


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
    """dq, dk, dv float32 for one block pair, given the output and lse of the softmax it belongs to
    and the gradient reaching lse directly (None: unused)."""
    q, k, v, dout = (_unit_stride(x) for x in (q, k, v, dout))
    delta = _softmax_delta(out, dout)
    # d lse_i / d s_ij = p_ij, so an lse gradient just shifts delta: ds = p * (dp - (delta - dlse)).
    delta = delta if dlse is None else delta - dlse.float()
    lse, delta = lse.float().contiguous(), delta.contiguous()
    (b, sq, hq, d), (sk, hkv) = q.shape, k.shape[1:3]
    ids = _contiguous(*q_ids, *k_ids)
    dq, dk, dv = (x.new_empty(x.shape, dtype=torch.float32) for x in (q, k, v))
    tiles = _tiles(d)
    shared = dict(GROUP=hq // hkv, HEAD_DIM=d, CAUSAL=causal)

    block_m, block_n = tiles.dkdv[1], tiles.dkdv[0]
    schedule = _schedule(q_ids, k_ids, causal, block_m, block_n, by_keys=True)
    _dkdv_kernel[(triton.cdiv(sk, block_n), b * hkv)](
        q, k, v, dout, lse, delta, dk, dv, *ids, *schedule,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        sq, sk, hkv, scale * LOG2E.value, scale, BLOCK_M=block_m, BLOCK_N=block_n, **shared,
    )  # fmt: skip

    block_m, block_n = tiles.dq
    schedule = _schedule(q_ids, k_ids, causal, block_m, block_n, by_keys=False)
    _dq_kernel[(triton.cdiv(sq, block_m), b * hq)](
        q, k, v, dout, lse, delta, dq, *ids, *schedule,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
        sq, sk, hq, scale * LOG2E.value, scale, BLOCK_M=block_m, BLOCK_N=block_n, **shared,
    )  # fmt: skip
    return dq, dk, dv


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _contiguous(*xs: Tensor) -> list[Tensor]:
    return [x.contiguous() for x in xs]
