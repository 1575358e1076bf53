"""Held-out evaluation: the training loss on rows the model does not train on, and that loss by
position within the example, the curve long-context work is judged by (it falls with position when
the model uses its context).

`eval_loss` is the training loss, with the same weights and heads: the text head over text targets
and the vision head over vision targets, each a weighted mean over every evaluated row, then 0.5 /
0.5 (or the one kind there is). `eval_loss_by_position` buckets targets by their position in their
example in powers of two, {"1": loss over positions 1, "2": 2..3, "4": 4..7, ...}, each a weighted
mean over both heads. Eval sets (`lwm-data evalset`, packed) add
`eval_loss_by_group`: the loss on the expected answers of each (task, length, depth),
`{"niah_single-4096-0.5": ...}`, a cheap proxy for the accuracy generation would score
(lwm_data.examples.eval_group). Rows are read in order, split over the data-parallel ranks a global
batch at a time; a rank short of rows in the last batch runs a zero-weight row, so every rank runs
the same forwards (FSDP's collectives need it). The sums meet in one all-reduce: one host sync per
evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lwm_data.examples import EVAL, eval_group
from lwm_data.train.data import PackedDataset, eval_groups
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
        self.groups = eval_groups(directory)  # every rank reads the same list: one layout to all-reduce
        self.group_index = {group: i for i, group in enumerate(self.groups)}

    def __call__(self, model: nn.Module, seq_len: int, autocast) -> dict[str, Any]:
        """The eval record's fields: eval_loss, eval_loss_by_position, eval_rows, eval_weight (the targets'
        total weight), eval_seconds."""
        started = time.perf_counter()
        par = self.par
        # text weighted loss, text weight, vision weighted loss, vision weight, rows, two per bucket, two per group
        sums = torch.zeros(5 + 2 * BUCKETS + 2 * len(self.groups), dtype=torch.float64, device=par.device)
        with torch.no_grad():
            for inputs, rows, segment_groups in self._batches(seq_len):
                shard = par.shard(inputs)
                with autocast:
                    losses = model(shard, per_token=True).double()
                sums += self._sums(shard, losses, rows, segment_groups.to(par.device))
        reshard(model)
        values = par.all_reduce(sums).tolist()
        text, text_weight, vision, vision_weight, rows = values[:5]
        means = [s / w for s, w in ((text, text_weight), (vision, vision_weight)) if w > 0]
        buckets, groups = values[5 : 5 + 2 * BUCKETS], values[5 + 2 * BUCKETS :]
        by_position = {str(2**b): buckets[2 * b] / buckets[2 * b + 1] for b in range(BUCKETS) if buckets[2 * b + 1] > 0}
        by_group = {g: groups[2 * i] / groups[2 * i + 1] for i, g in enumerate(self.groups) if groups[2 * i + 1] > 0}
        return {
            "eval_loss": sum(means) / len(means) if means else float("nan"),
            "eval_loss_by_position": by_position,
            **({"eval_loss_by_group": by_group} if self.groups else {}),
            "eval_rows": int(rows),
            "eval_weight": text_weight + vision_weight,
            "eval_seconds": round(time.perf_counter() - started, 3),
        }

    def _sums(self, inputs: ModelInputs, losses: Tensor, rows: int, segment_groups: Tensor) -> Tensor:
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
        group = segment_groups.gather(1, inputs.segment_ids.long())  # each token's group, -1: none
        grouped = counted & (group >= 0)
        per_group = torch.zeros(len(self.groups), 2, dtype=torch.float64, device=losses.device)
        per_group[:, 0].index_add_(0, group[grouped], weighted[grouped])
        per_group[:, 1].index_add_(0, group[grouped], weights[grouped])
        return torch.cat([heads, row_count, per_bucket.reshape(-1), per_group.reshape(-1)])

    def _batches(self, seq_len: int) -> Iterator[tuple[ModelInputs, int, Tensor]]:
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

    def _share(self, rows: list[dict[str, Tensor]], per_rank: int) -> tuple[ModelInputs, int, Tensor]:
        mine = rows[self.par.dp_rank * per_rank : (self.par.dp_rank + 1) * per_rank]
        real = len(mine)
        filler = {**rows[0], "loss_weights": torch.zeros_like(rows[0]["loss_weights"])}
        mine += [filler] * (per_rank - real)
        batch = {name: torch.stack([row[name] for row in mine]) for name in mine[0] if torch.is_tensor(mine[0][name])}
        return model_inputs(batch), real, self._segment_groups(mine)

    def _segment_groups(self, rows: list[dict]) -> Tensor:
        """(rows, 1 + segments): the group index of each row's segment s at [row, s], -1 for padding
        (segment 0) and for segments that are not eval rows."""
        segments = [list(zip(row["example_ids"].split("\n"), row["kinds"].split("\n"))) for row in rows]
        table = torch.full((len(rows), 1 + max(map(len, segments))), -1, dtype=torch.long)
        for r, row_segments in enumerate(segments):
            for s, (example_id, kind) in enumerate(row_segments, start=1):
                if kind == EVAL:
                    table[r, s] = self.group_index[eval_group(example_id)]
        return table
