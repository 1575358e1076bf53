"""Packed rows -> what the model sees: the one place the row contract (lwm_data.schemas.PACKED_SCHEMA)
becomes a next-token task. The model and the parallel layer take `ModelInputs`; the data side
(lwm_data.train.data) hands out the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class ModelInputs:
    """What the model sees for packed rows, all (B, S): position i reads `tokens[i]` (a vision id where
    `vision_mask[i]`) and predicts `targets[i]` with the vision head where `target_vision[i]`, weighted
    by `weights[i]`; `positions` and `segment_ids` go to RoPE and to the attention mask."""

    tokens: Tensor  # int64
    vision_mask: Tensor  # bool
    positions: Tensor  # int64, as the kernels are tested with
    segment_ids: Tensor  # int64
    targets: Tensor  # int64
    target_vision: Tensor  # bool
    weights: Tensor  # float32

    def map(self, fn: Callable[[Tensor], Tensor]) -> ModelInputs:
        """The same inputs with `fn` applied to every tensor (sharding, moving to a device)."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)})


def _next_token(x: Tensor, fill: int | float | bool = 0) -> Tensor:
    """x shifted left by one along the sequence: out[:, i] = x[:, i + 1], the last filled with `fill`."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], dim=1)


def model_inputs(batch: dict[str, Tensor]) -> ModelInputs:
    """The one place the row contract becomes a next-token task.

    Rows keep their length (so the ring can split them evenly): position i predicts token i + 1 with
    weight `loss_weights[i + 1]` (the row contract: `loss_weights[j]` weighs predicting token j), and
    the last position predicts nothing. A target in another segment than its input (a segment's first
    token, or padding) gets weight 0 even if the row says otherwise.
    """
    segment_ids = batch["segment_ids"].long()
    next_segment = _next_token(segment_ids)
    same_segment = (next_segment == segment_ids) & (segment_ids != 0)
    return ModelInputs(
        tokens=batch["tokens"].long(),
        vision_mask=batch["vision_mask"].bool(),
        positions=batch["positions"].long(),
        segment_ids=segment_ids,
        targets=_next_token(batch["tokens"].long()),
        target_vision=_next_token(batch["vision_mask"].bool(), False),
        weights=_next_token(batch["loss_weights"].float()) * same_segment,
    )
