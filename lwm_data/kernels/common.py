"""Mask and precision semantics shared by every attention backend and the ring.

Each token carries a position and a segment id, both (B, S) integer tensors. Query i may attend key j
iff their segment ids are equal and non-zero (0 marks padding) and, when causal, k_pos[j] <= q_pos[i].
Positions need not be contiguous or sorted (zigzag shards, restarts per packed document).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class TokenIds(NamedTuple):
    """Positions and segment ids of a block of tokens, (B, S) each."""

    positions: Tensor
    segment_ids: Tensor


class TokenRanges(NamedTuple):
    """Per tile of tokens: min/max position and segment id over its non-padding tokens, (B, n_tiles) each.

    A tile with no non-padding token has min > max (integer extremes), so no range test passes for it.
    """

    pos_min: Tensor
    pos_max: Tensor
    seg_min: Tensor
    seg_max: Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics, partial outputs and gradients accumulate in float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def attention_mask(q_ids: TokenIds, k_ids: TokenIds, causal: bool) -> Tensor:
    """Dense (B, Sq, Sk) bool mask: True where query i may attend key j."""
    q_seg = q_ids.segment_ids[:, :, None]
    allowed = (q_seg == k_ids.segment_ids[:, None, :]) & (q_seg != 0)
    if causal:
        allowed &= k_ids.positions[:, None, :] <= q_ids.positions[:, :, None]
    return allowed


def _tiled(x: Tensor, tile: int, fill: int) -> Tensor:
    """(B, S) -> (B, ceil(S / tile), tile), the tail padded with `fill`."""
    return F.pad(x, (0, -x.shape[1] % tile), value=fill).unflatten(1, (-1, tile))


def token_ranges(ids: TokenIds, tile: int) -> TokenRanges:
    """Ranges of each consecutive `tile` tokens; tokens past the end count as padding."""
    seg = _tiled(ids.segment_ids, tile, fill=0)
    pos = _tiled(ids.positions, tile, fill=0)
    real = seg != 0
    lo, hi = torch.iinfo(pos.dtype).min, torch.iinfo(pos.dtype).max
    slo, shi = torch.iinfo(seg.dtype).min, torch.iinfo(seg.dtype).max
    return TokenRanges(
        pos_min=pos.masked_fill(~real, hi).amin(-1),
        pos_max=pos.masked_fill(~real, lo).amax(-1),
        seg_min=seg.masked_fill(~real, shi).amin(-1),
        seg_max=seg.masked_fill(~real, slo).amax(-1),
    )


def padding_free(ids: TokenIds, tile: int) -> Tensor:
    """(B, n_tiles) bool: every token of the tile exists and has a non-zero segment id."""
    return (_tiled(ids.segment_ids, tile, fill=0) != 0).all(-1)


def may_attend(q: TokenRanges, k: TokenRanges, causal: bool) -> Tensor:
    """False only where no query of the q tile may attend any key of the k tile (broadcasts).

    Conservative: overlapping segment ranges and, when causal, some key position not after some query
    position. Cheap enough to decide which blocks or tiles to skip without looking at their tokens.
    """
    overlap = (q.seg_min <= k.seg_max) & (k.seg_min <= q.seg_max)
    if causal:
        overlap &= k.pos_min <= q.pos_max
    return overlap


def all_attend(q: TokenRanges, k: TokenRanges, causal: bool) -> Tensor:
    """True where every query may attend every key, given both tiles are padding-free (broadcasts)."""
    one_segment = (q.seg_min == q.seg_max) & (k.seg_min == k.seg_max) & (q.seg_min == k.seg_min)
    if causal:
        one_segment &= k.pos_max <= q.pos_min
    return one_segment


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    """The softmax scale, 1 / sqrt(head_dim) unless given."""
    return head_dim**-0.5 if softmax_scale is None else softmax_scale
