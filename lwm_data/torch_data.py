"""A PyTorch IterableDataset over packed shards (the pack stage's output), for the trainer.

Order: shards in a seeded permutation; inside a shard, its Parquet row groups in a seeded
permutation and rows in a seeded permutation inside each group (so one row group is in memory at a
time). That stream is the same on every rank and worker. A position in it is (shard, row): the
shard's index in the shard order and the row's index in that shard's stream order.

Split: the stream is cut into steps of `world_size * batch_size` rows; in every step rank r takes
rows [r * batch_size, (r + 1) * batch_size). A rank's DataLoader workers take whole steps in turn
(worker w: steps w, w + W, ...), which is exactly the order an in-order DataLoader hands batches
back in. So with `DataLoader(dataset, batch_size=batch_size, num_workers=W)` batch i on every rank
is step i, no row goes to two consumers, and a trailing partial step is left out (every rank sees
the same number of batches).

Resume: `state_dict()` is the position of the next step not yet handed out (exact when iterating
in-process); with workers, `state_after(steps)` gives the position after `steps` batches.
`load_state_dict(state)` makes the next iteration start there.

    dataset = PackedDataset("packed/", seed=0, batch_size=8)
    loader = DataLoader(dataset, batch_size=8, num_workers=2)
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from apache_beam.io.filesystems import FileSystems
from torch.utils.data import IterableDataset, get_worker_info

from lwm_data import outputs

TOKEN_COLUMNS = ("tokens", "loss_weights", "vision_mask", "segment_ids", "positions")


class PackedDataset(IterableDataset):
    """Rows of a packed directory as dicts of tensors [seq_len], plus their (shard, row) position."""

    def __init__(
        self,
        directory: str,
        seed: int = 0,
        shuffle: bool = True,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size or batch_size < 1:
            raise ValueError(
                f"need 0 <= rank < world_size and batch_size >= 1, got {self.rank}, {self.world_size}, {batch_size}"
            )
        self.seed = seed
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.shards = outputs.list_shards(directory)
        rows = np.array([outputs.shard_rows(p) for p in self.shards], np.int64)
        self._shard_order = self.permutation(len(self.shards))
        self._ends = np.cumsum(rows[self._shard_order])  # stream index after each shard in order
        self._next = 0  # stream index of the next step

    @property
    def step_rows(self) -> int:
        return self.world_size * self.batch_size

    @property
    def num_rows(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __len__(self) -> int:
        """Rows this rank yields from the current position."""
        return (self.num_rows - self._next) // self.step_rows * self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return self._state(self._next)

    def state_after(self, steps: int) -> dict[str, Any]:
        """The position after `steps` more batches from the current one (for DataLoader workers)."""
        return self._state(min(self._next + steps * self.step_rows, self.num_rows))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError(
                f"state is for seed {state['seed']} shuffle {state['shuffle']}, dataset has {self.seed} {self.shuffle}"
            )
        shard_start = int(self._ends[state["shard"] - 1]) if state["shard"] > 0 else 0
        self._next = shard_start + int(state["row"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        start = self._next
        num_steps = (self.num_rows - start) // self.step_rows
        shard = _ShardCache(self)
        for step in range(worker_id, num_steps, num_workers):
            step_start = start + step * self.step_rows
            begin = step_start + self.rank * self.batch_size
            for index in range(begin, begin + self.batch_size):
                if index == begin + self.batch_size - 1 and worker is None:
                    self._next = step_start + self.step_rows
                yield shard.row(index)
        if worker is None:
            self._next = 0  # the pass is complete: the next one starts over, in the same order

    def _state(self, index: int) -> dict[str, Any]:
        shard = int(np.searchsorted(self._ends, index, side="right"))
        shard_start = int(self._ends[shard - 1]) if shard > 0 else 0
        return {"seed": self.seed, "shuffle": self.shuffle, "shard": shard, "row": index - shard_start}

    def locate(self, index: int) -> tuple[int, int]:
        """Stream index -> (shard position in order, row position in that shard's order)."""
        state = self._state(index)
        return state["shard"], state["row"]

    def shard_path(self, shard: int) -> str:
        """Path of the shard at `shard` in the shard order."""
        return self.shards[int(self._shard_order[shard])]

    def permutation(self, n: int, *keys: int) -> np.ndarray:
        """A seeded permutation of range(n) (the identity without shuffle)."""
        return np.random.default_rng([self.seed, *keys]).permutation(n) if self.shuffle else np.arange(n)


class _ShardCache:
    """The shard being read, one row group in memory at a time.

    A shard's rows are streamed row group by row group (groups in a seeded order, rows in a seeded
    order inside each group), so memory holds one group however large the shard is.
    """

    def __init__(self, dataset: PackedDataset):
        self.dataset = dataset
        self.shard = self.group = -1

    def row(self, index: int) -> dict[str, Any]:
        shard, position = self.dataset.locate(index)
        if shard != self.shard:
            self._enter(shard)
        file_row = int(self.order[position])
        group = int(np.searchsorted(self.group_starts, file_row, side="right")) - 1
        if group != self.group:
            self._load(group)
        in_group = file_row - int(self.group_starts[group])
        sample: dict[str, Any] = {name: torch.from_numpy(column[in_group]) for name, column in self.columns.items()}
        sample["shard"], sample["row"] = shard, position
        return sample

    def _enter(self, shard: int) -> None:
        self.path = self.dataset.shard_path(shard)
        with FileSystems.open(self.path) as f:
            metadata = pq.ParquetFile(f).metadata
        sizes = np.array([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)], np.int64)
        self.group_starts = np.cumsum(sizes) - sizes
        groups = self.dataset.permutation(len(sizes), shard)
        self.order = np.concatenate(
            [self.group_starts[g] + self.dataset.permutation(int(sizes[g]), shard, int(g)) for g in groups]
        ) if len(sizes) else np.zeros(0, np.int64)
        self.shard, self.group = shard, -1

    def _load(self, group: int) -> None:
        with FileSystems.open(self.path) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=list(TOKEN_COLUMNS))
        seq_len = len(table["tokens"][0]) if table.num_rows else 0
        self.columns = {
            name: pc.list_flatten(table[name]).to_numpy(zero_copy_only=False).reshape(-1, seq_len).copy()
            for name in TOKEN_COLUMNS
        }
        self.group = group
