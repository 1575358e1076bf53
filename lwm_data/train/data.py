"""Packed shards in, model inputs out: the trainer's data side.

`PackedDataset` streams the rows of a packed directory (the pack stage's output) through pyarrow's
filesystems (local paths, gs://, s3://, hdfs://). Order: in each pass (epoch), shards in a seeded
permutation; inside a shard, its Parquet row groups in a seeded permutation and rows in a seeded
permutation inside each group, so one row group is in memory at a time. That stream is the same on
every rank and worker; a position in it is its index.

Split: the stream is cut into steps of `world_size * batch_size` rows (world = the data-parallel
ranks); in every step rank r takes rows [r * batch_size, (r + 1) * batch_size). A rank's DataLoader
workers take whole steps in turn (worker w: steps w, w + W, ...), which is the order an in-order
DataLoader hands batches back in, so batch i on every rank is step i and a trailing partial step is
left out. Every row carries `next`, the stream index after its step.

Resume: `PackedLoader` runs the DataLoader pass after pass and records the `next` of the last batch
it handed out, so its `state_dict()` is the exact position of the next batch whatever the number
of workers and however far they have read ahead.

    dataset = PackedDataset("packed/", seq_len=1024, seed=0, batch_size=8)
    loader = PackedLoader(dataset, num_workers=2)
    for batch in loader:
        inputs = model_inputs(batch)    # lwm_data.train.inputs
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lwm_data.errors import ConfigError, NotAStageOutput
from lwm_data.examples import EVAL, eval_group
from lwm_data.schemas import MANIFEST, PACKED_SCHEMA, SHARD_SUFFIX

TOKEN_COLUMNS = ("tokens", "loss_weights", "vision_mask", "segment_ids", "positions")


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for `path` (a URI such as gs://b/dir, or a local path) and the path in it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def read_manifest(directory: str) -> dict[str, Any]:
    """A committed output's manifest, through pyarrow's filesystems."""
    fs, root = filesystem(directory)
    manifest_path = posixpath.join(root, MANIFEST)
    if fs.get_file_info(manifest_path).type == pafs.FileType.NotFound:
        raise NotAStageOutput(f"{directory} has no {MANIFEST}: it is not the output of a finished lwm-data stage")
    with fs.open_input_stream(manifest_path) as f:
        return json.loads(f.read())


def eval_groups(directory: str) -> list[str]:
    """The (task, length, depth) groups of a packed output's `eval` segments
    (lwm_data.examples.eval_group), sorted; empty when it holds no eval rows."""
    fs, shards = list_packed_shards(directory)
    groups: set[str] = set()
    for path in shards:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["example_ids", "kinds"])
        ids, kinds = pc.list_flatten(table["example_ids"]), pc.list_flatten(table["kinds"])
        groups.update(eval_group(i) for i in pc.filter(ids, pc.equal(kinds, EVAL)).to_pylist())
    return sorted(groups)


def list_packed_shards(directory: str) -> tuple[pafs.FileSystem, list[str]]:
    """The shards the manifest of a committed packed output names, in name order."""
    fs, root = filesystem(directory)
    manifest = read_manifest(directory)
    shards = sorted(
        posixpath.join(root, f["path"]) for f in manifest.get("files", []) if f["path"].endswith(SHARD_SUFFIX)
    )
    return fs, shards


def check_vocabulary(manifest: dict[str, Any], vocabulary: tuple[int, int], directory: str) -> None:
    """The packed output's recorded vocabulary (pack's manifest) fits the model's."""
    recorded = (manifest.get("packing") or {}).get("vocabulary") or {}
    text = recorded.get("text")
    if text is not None and text > vocabulary[0]:
        raise ConfigError(
            f"{directory} was tokenized with a vocabulary of {text} ids; the model embeds {vocabulary[0]}: "
            "tokenize the data with the model's tokenizer (--tokenizer DIR), or start from a model that has it"
        )


def check_packed_schema(schema: pa.Schema, path: str) -> None:
    """ConfigError unless the shard has the token columns of PACKED_SCHEMA with their types."""
    for name in TOKEN_COLUMNS:
        expected = PACKED_SCHEMA.field(name).type
        if name not in schema.names or schema.field(name).type != expected:
            found = schema.field(name).type if name in schema.names else "missing"
            raise ConfigError(
                f"{path}: shard schema mismatch, column {name!r} is {found}, expected {expected}: "
                "the trainer reads the output of `lwm-data pack`"
            )


class PackedDataset(IterableDataset):
    """Rows of a packed directory as dicts of tensors [seq_len], plus `epoch`, `index` (stream index
    of the row) and `next` (stream index after its step).

    Rows shorter than `seq_len` are padded (segment id 0, weight 0); longer rows are a ConfigError.
    `rank` and `world_size` are the data-parallel ones (default: torch.distributed's world). With
    `vocabulary` (the model's text and vision vocabulary sizes), a row holding an id the model has no
    embedding for is a ConfigError naming the row, before it reaches the model; so is a packed output
    whose manifest records a larger text vocabulary. Each row also carries `example_ids`, its
    segments' example ids joined by newlines (for messages about the rows of a step).
    """

    def __init__(
        self,
        directory: str,
        seq_len: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        vocabulary: tuple[int, int] | None = None,
    ):
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size or batch_size < 1:
            raise ValueError(
                f"need 0 <= rank < world_size and batch_size >= 1, got {self.rank}, {self.world_size}, {batch_size}"
            )
        self.directory, self.seed, self.shuffle, self.batch_size = directory, seed, shuffle, batch_size
        self.vocabulary = vocabulary
        if vocabulary is not None:
            check_vocabulary(read_manifest(directory), vocabulary, directory)
        self.fs, self.shards = list_packed_shards(directory)
        self.rows = np.array([self._metadata(p).num_rows for p in self.shards], np.int64)
        self.seq_len = seq_len if seq_len is not None else self._first_row_length()
        if self.num_rows < self.step_rows:
            raise ConfigError(
                f"{directory} holds {self.num_rows} rows, fewer than one step of {self.step_rows} "
                f"({self.world_size} data-parallel ranks x batch size {self.batch_size})"
            )
        self.epoch, self._next = 0, 0
        self._order_shards()

    # --- positions -------------------------------------------------------------------------------

    @property
    def step_rows(self) -> int:
        return self.world_size * self.batch_size

    @property
    def num_rows(self) -> int:
        return int(self.rows.sum())

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.step_rows

    def __len__(self) -> int:
        """Rows this rank yields from the current position to the end of the pass."""
        return (self.num_rows - self._next) // self.step_rows * self.batch_size

    def state_dict(self) -> dict[str, Any]:
        """The position of the next step (exact when iterating in-process; see `PackedLoader`)."""
        return self.state_at(self.epoch, self._next)

    def state_at(self, epoch: int, index: int) -> dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "epoch": int(epoch), "index": int(index)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ValueError(
                f"state is for seed {state['seed']} shuffle {state['shuffle']}, dataset has {self.seed} {self.shuffle}"
            )
        self.set_epoch(int(state["epoch"]))
        self._next = int(state["index"])

    def set_epoch(self, epoch: int) -> None:
        """Start pass `epoch` (its own seeded order) from its beginning."""
        self.epoch, self._next = epoch, 0
        self._order_shards()

    def permutation(self, n: int, *keys: int) -> np.ndarray:
        """A seeded permutation of range(n) for this epoch (the identity without shuffle)."""
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch, *keys]).permutation(n)

    def locate(self, index: int) -> tuple[int, int]:
        """Stream index -> (shard position in this epoch's order, row position in that shard's order)."""
        shard = int(np.searchsorted(self._ends, index, side="right"))
        return shard, index - (int(self._ends[shard - 1]) if shard > 0 else 0)

    def shard_path(self, shard: int) -> str:
        return self.shards[int(self._shard_order[shard])]

    def _order_shards(self) -> None:
        self._shard_order = self.permutation(len(self.shards))
        self._ends = np.cumsum(self.rows[self._shard_order])  # stream index after each shard in order

    # --- reading ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        start = self._next
        reader = _ShardReader(self)
        for step in range(worker_id, (self.num_rows - start) // self.step_rows, num_workers):
            step_start = start + step * self.step_rows
            step_end = step_start + self.step_rows
            begin = step_start + self.rank * self.batch_size
            for index in range(begin, begin + self.batch_size):
                if worker is None and index == begin + self.batch_size - 1:
                    self._next = step_end
                yield {**reader.row(index), "epoch": self.epoch, "index": index, "next": step_end}

    def _metadata(self, path: str) -> pq.FileMetaData:
        with self.fs.open_input_file(path) as f:
            metadata = pq.ParquetFile(f).metadata
        check_packed_schema(metadata.schema.to_arrow_schema(), path)
        return metadata

    def _first_row_length(self) -> int:
        path = self.shards[int(np.argmax(self.rows > 0))]
        with self.fs.open_input_file(path) as f:
            batch = next(pq.ParquetFile(f).iter_batches(batch_size=1, columns=["tokens"]))
        return len(batch.column("tokens")[0])


class _ShardReader:
    """The shard being read, one row group in memory at a time."""

    def __init__(self, dataset: PackedDataset):
        self.dataset = dataset
        self.shard = self.group = -1

    def row(self, index: int) -> dict[str, Tensor]:
        shard, position = self.dataset.locate(index)
        if shard != self.shard:
            self._enter(shard)
        file_row = int(self.order[position])
        group = int(np.searchsorted(self.group_starts, file_row, side="right")) - 1
        if group != self.group:
            self._load(group)
        in_group = file_row - int(self.group_starts[group])
        row = {name: torch.from_numpy(column[in_group]) for name, column in self.columns.items()}
        return {**row, "example_ids": self.example_ids[in_group], "kinds": self.kinds[in_group]}

    def _enter(self, shard: int) -> None:
        self.path = self.dataset.shard_path(shard)
        with self.dataset.fs.open_input_file(self.path) as f:
            metadata = pq.ParquetFile(f).metadata
        sizes = np.array([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)], np.int64)
        self.group_starts = np.cumsum(sizes) - sizes
        groups = self.dataset.permutation(len(sizes), shard)
        orders = [self.group_starts[g] + self.dataset.permutation(int(sizes[g]), shard, int(g)) for g in groups]
        self.order = np.concatenate(orders) if orders else np.zeros(0, np.int64)
        self.shard, self.group = shard, -1

    def _load(self, group: int) -> None:
        with self.dataset.fs.open_input_file(self.path) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=[*TOKEN_COLUMNS, "example_ids", "kinds"])
        row_len = len(table["tokens"][0]) if table.num_rows else 0
        seq_len = self.dataset.seq_len
        if row_len > seq_len:
            raise ConfigError(
                f"{self.path}: rows of {row_len} tokens are longer than the phase's seq_len {seq_len}; "
                "pack the data for this phase's length or raise seq_len"
            )
        self.columns = {}
        for name in TOKEN_COLUMNS:
            rows = pc.list_flatten(table[name]).to_numpy(zero_copy_only=False).reshape(-1, row_len)
            self.columns[name] = np.pad(rows, ((0, 0), (0, seq_len - row_len)))  # zeros: padding
        self.example_ids = ["\n".join(ids) for ids in table["example_ids"].to_pylist()]
        self.kinds = ["\n".join(kinds) for kinds in table["kinds"].to_pylist()]
        if self.dataset.vocabulary is not None:
            self._check_ids(group)
        self.group = group

    def _check_ids(self, group: int) -> None:
        """Every id has an embedding: text ids below the text vocabulary, vision ids below the vision one."""
        text_size, vision_size = self.dataset.vocabulary
        tokens, vision = self.columns["tokens"], self.columns["vision_mask"].astype(bool)
        bad_text = (tokens >= text_size) & ~vision | (tokens < 0)
        bad_vision = vision & (tokens >= vision_size)
        for bad, what in ((bad_text, f"text ids >= the model's {text_size}"), (bad_vision, "vision ids")):
            if bad.any():
                row = int(np.argmax(bad.any(axis=1)))
                example = self.example_ids[row].split("\n")[0]
                hint = (
                    "the model has no vision embedding: train with vision = true"
                    if what == "vision ids" and vision_size == 0
                    else f"vision ids >= {vision_size}"
                    if what == "vision ids"
                    else "tokenize the data with the model's tokenizer (--tokenizer DIR at chunk/import-lwm/video)"
                )
                raise ConfigError(
                    f"{self.path} row group {group}, row {row} (example {example}): {what} "
                    f"(largest {int(tokens[bad].max())}); {hint}"
                )


class PackedLoader:
    """Batches of a PackedDataset through a DataLoader, pass after pass, with an exact position.

    `state_dict()` is the position after the last batch handed out (from that batch's `next`), so a
    checkpoint resumes on exactly the next batch with any number of workers.
    """

    def __init__(self, dataset: PackedDataset, num_workers: int = 0):
        self.dataset, self.num_workers = dataset, num_workers
        self._state = dataset.state_dict()

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        while True:
            self.dataset.load_state_dict(self._state)
            loader = DataLoader(
                self.dataset,
                batch_size=self.dataset.batch_size,
                num_workers=self.num_workers,
                persistent_workers=False,
                prefetch_factor=2 if self.num_workers else None,
            )
            for batch in loader:
                self._state = self.dataset.state_at(int(batch["epoch"][0]), int(batch["next"][0]))
                yield batch
            self._state = self.dataset.state_at(self._state["epoch"] + 1, 0)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)  # validates seed and shuffle
        self._state = self.dataset.state_dict()
