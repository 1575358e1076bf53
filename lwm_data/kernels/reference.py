"""Dense attention with the full mask, written as plainly as possible: the ground truth for tests and
benchmark checks. Memory is O(Sq * Sk * Hq); gradients come from autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import TokenIds, accumulation_dtype, attention_mask, resolve_scale


def dense_attention(
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
) -> tuple[Tensor, Tensor]:
    """Same contract as `block_attention`, except out and lse are in the accumulation dtype."""
    acc = accumulation_dtype(q.dtype)
    groups = q.shape[2] // k.shape[2]
    scale = resolve_scale(softmax_scale, q.shape[-1])
    q, k, v = (x.to(acc).transpose(1, 2) for x in (q, k, v))
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    mask = attention_mask(TokenIds(q_positions, q_segment_ids), TokenIds(k_positions, k_segment_ids), causal)
    mask = mask[:, None]
    empty_row = ~mask.any(-1, keepdim=True)
    # Empty rows get finite dummy scores and are zeroed afterwards, so autograd never sees -inf - -inf.
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).masked_fill(empty_row, 0.0)
    out = (torch.softmax(scores, dim=-1).masked_fill(empty_row, 0.0) @ v).transpose(1, 2)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(empty_row[..., 0], float("-inf"))
    return out, lse


def random_packing(batch: int, seq: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(positions, segment_ids), each (batch, seq) int64: random documents packed back to back (segment
    ids 1, 2, ...), then a padding tail of up to seq // 8 tokens and one padding token inside (id 0).
    Positions restart at 0 in each document on even rows and count through the row on odd rows."""
    positions = torch.zeros(batch, seq, dtype=torch.long)
    segments = torch.zeros(batch, seq, dtype=torch.long)
    for row in range(batch):
        end = seq - int(torch.randint(0, seq // 8 + 1, (), generator=generator))
        start, segment = 0, 1
        while start < end:
            length = min(int(torch.randint(1, max(2, seq // 3), (), generator=generator)), end - start)
            segments[row, start : start + length] = segment
            positions[row, start : start + length] = torch.arange(length) + (start if row % 2 else 0)
            start, segment = start + length, segment + 1
        segments[row, int(torch.randint(0, seq, (), generator=generator))] = 0
    return positions, segments
