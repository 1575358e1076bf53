"""Held-out evaluation: the training loss on rows the model does not train on, and that loss by
position within the example, the curve long-context work is judged by (it falls with position when
the model uses its context).

`eval_loss` is the training loss, with the same weights and heads: the text head over text targets
and the vision head over vision targets, each a weighted mean over every evaluated row, then 0.5 /
0.5 (or the one kind there is). `eval_loss_by_position` buckets targets by their position in their
example in powers of two, {"1": loss over positions 1, "2": 2..3, "4": 4..7, ...}, each a weighted
mean over both heads. Rows are read in order, split over the data-parallel ranks a global batch at a
time; a rank short of rows in the last batch runs a zero-weight row, so every rank runs the same
forwards (FSDP's collectives need it). The sums meet in one all-reduce: one host sync per evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lwm_data.train.data import PackedDataset
from lwm_data.train.inputs import ModelInputs, model_inputs
from lwm_data.train.parallel import Parallel

BUCKETS = 40  # positions up to 2^40


def reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded parameters after forwards with no backward: it keeps the root's unsharded
    after a forward (for the backward it expects), and they would stand in for the sharded ones."""
    for module in model.modules():
        if hasattr(module, "reshard"):
            module.reshard()


def position_buckets(positions: Tensor) -> Tensor:
    """The bucket of a target at `positions + 1`: floor(log2(position)), i.e. 1 | 2-3 | 4-7 | ..."""
    return torch.log2((positions + 1).double()).floor().long().clamp(0, BUCKETS - 1)


class Evaluator:
    def __init__(
        self, directory: str, batches: int, batch_size: int, par: Parallel, vocabulary: tuple[int, int] | None
    ):
        self.directory, self.batches, self.batch_size, self.par = directory, batches, batch_size, par
        self.vocabulary = vocabulary

    def __call__(self, model: nn.Module, seq_len: int, autocast) -> dict[str, Any]:
        """The eval record's fields: eval_loss, eval_loss_by_position, eval_rows, eval_weight (the targets'
        total weight), eval_seconds."""
        started = time.perf_counter()
        par = self.par
        # text weighted loss, text weight, vision weighted loss, vision weight, rows, then two per bucket
        sums = torch.zeros(5 + 2 * BUCKETS, dtype=torch.float64, device=par.device)
        with torch.no_grad():
            for inputs, rows in self._batches(seq_len):
                shard = par.shard(inputs)
                with autocast:
                    losses = model(shard, per_token=True).double()
                sums += self._sums(shard, losses, rows)
        reshard(model)
        values = par.all_reduce(sums).tolist()
        text, text_weight, vision, vision_weight, rows = values[:5]
        means = [s / w for s, w in ((text, text_weight), (vision, vision_weight)) if w > 0]
        buckets = values[5:]
        by_position = {str(2**b): buckets[2 * b] / buckets[2 * b + 1] for b in range(BUCKETS) if buckets[2 * b + 1] > 0}
        return {
            "eval_loss": sum(means) / len(means) if means else float("nan"),
            "eval_loss_by_position": by_position,
            "eval_rows": int(rows),
            "eval_weight": text_weight + vision_weight,
            "eval_seconds": round(time.perf_counter() - started, 3),
        }

    def _sums(self, inputs: ModelInputs, losses: Tensor, rows: int) -> Tensor:
        weights = inputs.weights.double()
        counted = weights != 0
        weighted = losses * weights
        text, vision = counted & ~inputs.target_vision, counted & inputs.target_vision
        heads = torch.stack([weighted[text].sum(), weights[text].sum(), weighted[vision].sum(), weights[vision].sum()])
        bucket = position_buckets(inputs.positions)[counted]
        per_bucket = torch.zeros(BUCKETS, 2, dtype=torch.float64, device=losses.device)
        per_bucket[:, 0].index_add_(0, bucket, weighted[counted])
        per_bucket[:, 1].index_add_(0, bucket, weights[counted])
        row_count = torch.tensor([rows / self.par.ring_size], dtype=torch.float64, device=losses.device)
        return torch.cat([heads, row_count, per_bucket.reshape(-1)])

    def _batches(self, seq_len: int) -> Iterator[tuple[ModelInputs, int]]:
        """This rank's share of each global batch, padded with zero-weight rows, and how many are real."""
        stream = PackedDataset(
            self.directory, seq_len=seq_len, shuffle=False, rank=0, world_size=1, vocabulary=self.vocabulary
        )
        per_rank, ranks = self.batch_size, self.par.dp_size
        rows: list[dict[str, Tensor]] = []
        batches = 0
        for row in stream:
            rows.append(row)
            if len(rows) == per_rank * ranks:
                yield self._share(rows, per_rank)
                rows, batches = [], batches + 1
                if batches == self.batches:
                    return
        if rows:
            yield self._share(rows, per_rank)

    def _share(self, rows: list[dict[str, Tensor]], per_rank: int) -> tuple[ModelInputs, int]:
        mine = rows[self.par.dp_rank * per_rank : (self.par.dp_rank + 1) * per_rank]
        real = len(mine)
        filler = {**rows[0], "loss_weights": torch.zeros_like(rows[0]["loss_weights"])}
        mine += [filler] * (per_rank - real)
        batch = {name: torch.stack([row[name] for row in mine]) for name in mine[0] if torch.is_tensor(mine[0][name])}
        return model_inputs(batch), real
