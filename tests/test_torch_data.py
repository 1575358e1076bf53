"""PackedDataset: the PyTorch reader of packed shards."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from lwm_data.examples import Examples
from lwm_data.outputs import Counts, OutputRun, read_table
from lwm_data.packing import PackOptions, pack_examples
from lwm_data.torch_data import PackedDataset

SEQ_LEN = 32
SHARD_ROWS = (13, 7, 20)


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> str:
    """Three shards of packed rows (40 rows of 32 tokens), in row groups of 6 rows."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, SEQ_LEN + 1, 200)
    examples = Examples.from_arrays(
        [f"e{i:03d}" for i in range(len(lengths))], ["chat"] * len(lengths),
        [rng.integers(1, 32000, k).astype(np.int32) for k in lengths], [np.ones(k) for k in lengths],
        [np.zeros(k, bool) for k in lengths],
    )
    table, _ = pack_examples(examples, PackOptions(seq_len=SEQ_LEN))
    table = table.slice(0, sum(SHARD_ROWS))
    directory = tmp_path_factory.mktemp("packed")
    run = OutputRun(str(directory))
    os.makedirs(run.path)
    start = 0
    for i, rows in enumerate(SHARD_ROWS):
        path = f"{run.shard_prefix}-{i:05d}-of-{len(SHARD_ROWS):05d}.parquet"
        pq.write_table(table.slice(start, rows), path, row_group_size=6)  # several row groups per shard
        start += rows
    run.commit({"stage": "pack", "counts": Counts(input=len(lengths), output=len(lengths)).to_dict()})
    return str(directory)


def positions(samples) -> list[tuple[int, int]]:
    return [(int(s["shard"]), int(s["row"])) for s in samples]


def test_yields_tensors_of_the_packed_columns(packed_dir):
    sample = next(iter(PackedDataset(packed_dir)))
    assert sample["tokens"].dtype == torch.int32 and sample["tokens"].shape == (SEQ_LEN,)
    assert sample["loss_weights"].dtype == torch.float32
    assert sample["vision_mask"].dtype == torch.bool
    assert sample["segment_ids"].dtype == torch.int32 and sample["positions"].dtype == torch.int32


def test_order_is_a_seeded_permutation_of_all_rows(packed_dir):
    first = [s["tokens"] for s in PackedDataset(packed_dir, seed=3)]
    again = [s["tokens"] for s in PackedDataset(packed_dir, seed=3)]
    other = [s["tokens"] for s in PackedDataset(packed_dir, seed=4)]
    in_file_order = [s["tokens"] for s in PackedDataset(packed_dir, shuffle=False)]
    assert len(first) == sum(SHARD_ROWS)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    key = lambda t: t.tolist()  # noqa: E731
    assert sorted(map(key, first)) == sorted(map(key, in_file_order))
    expected = read_table(packed_dir, ["tokens"])["tokens"].to_pylist()
    assert [t.tolist() for t in in_file_order] == expected


@pytest.mark.parametrize("world_size,batch_size", [(2, 3), (3, 1)])
def test_ranks_and_workers_split_without_overlap(packed_dir, world_size, batch_size):
    seen: list[tuple[int, int]] = []
    for rank in range(world_size):
        dataset = PackedDataset(packed_dir, seed=1, batch_size=batch_size, rank=rank, world_size=world_size)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=2)
        batches = list(loader)
        in_process = positions(PackedDataset(packed_dir, seed=1, batch_size=batch_size, rank=rank, world_size=world_size))
        # an in-order DataLoader with workers hands rows back in the dataset's own stream order
        assert [p for b in batches for p in zip(b["shard"].tolist(), b["row"].tolist())] == in_process
        assert all(len(b["tokens"]) == batch_size for b in batches)
        seen.extend(in_process)
    step = world_size * batch_size
    assert len(seen) == len(set(seen)) == sum(SHARD_ROWS) // step * step


def test_resumes_from_a_saved_position(packed_dir):
    full = positions(PackedDataset(packed_dir, seed=2, batch_size=4))
    dataset = PackedDataset(packed_dir, seed=2, batch_size=4)
    consumed = []
    for sample in dataset:
        consumed.append(sample)
        if len(consumed) == 12:
            break
    state = dataset.state_dict()
    assert state["seed"] == 2 and (state["shard"], state["row"]) == full[12]
    resumed = PackedDataset(packed_dir, seed=2, batch_size=4)
    resumed.load_state_dict(state)
    assert positions(resumed) == full[12:]


def test_state_after_batches_matches_a_dataloader_with_workers(packed_dir):
    dataset = PackedDataset(packed_dir, seed=5, batch_size=2)
    loader = iter(DataLoader(dataset, batch_size=2, num_workers=2))
    for _ in range(3):
        next(loader)
    state = dataset.state_after(3)
    resumed = PackedDataset(packed_dir, seed=5, batch_size=2)
    resumed.load_state_dict(state)
    rest = [p for b in loader for p in zip(b["shard"].tolist(), b["row"].tolist())]
    assert positions(resumed) == rest


def test_rejects_a_state_from_another_seed(packed_dir):
    state = PackedDataset(packed_dir, seed=1).state_dict()
    with pytest.raises(ValueError):
        PackedDataset(packed_dir, seed=2).load_state_dict(state)

