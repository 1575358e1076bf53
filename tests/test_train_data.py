"""lwm_data.train.data: PackedDataset (the reader of packed shards), PackedLoader (exact resume with
DataLoader workers) and model_inputs (the row contract as a next-token task)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from lwm_data.errors import ConfigError, NotAStageOutput
from lwm_data.examples import Examples
from lwm_data.outputs import Counts, OutputRun, read_table
from lwm_data.packing import PackOptions
from lwm_data.testing.packing import pack_examples
from lwm_data.train.data import PackedDataset, PackedLoader
from lwm_data.train.inputs import model_inputs

SEQ_LEN = 32
SHARD_ROWS = (13, 7, 20)


def write_packed(directory, table: pa.Table, shard_rows, row_group_size: int = 6) -> str:
    """`table` as a committed packed output of several shards, each of several row groups."""
    run = OutputRun(str(directory))
    os.makedirs(run.path)
    start = 0
    for i, rows in enumerate(shard_rows):
        path = f"{run.shard_prefix}-{i:05d}-of-{len(shard_rows):05d}.parquet"
        pq.write_table(table.slice(start, rows), path, row_group_size=row_group_size)
        start += rows
    run.commit({"stage": "pack", "counts": Counts(input=start, output=start).to_dict()})
    return str(directory)


def packed_table(seq_len: int, rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq_len + 1, rows * 5)
    examples = Examples.from_arrays(
        [f"e{i:03d}" for i in range(len(lengths))],
        ["chat"] * len(lengths),
        [rng.integers(1, 32000, k).astype(np.int32) for k in lengths],
        [np.ones(k) for k in lengths],
        [np.zeros(k, bool) for k in lengths],
    )
    table, _ = pack_examples(examples, PackOptions(seq_len=seq_len))
    assert table.num_rows >= rows
    return table.slice(0, rows)


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> str:
    """Three shards of packed rows (40 rows of 32 tokens), in row groups of 6 rows."""
    table = packed_table(SEQ_LEN, sum(SHARD_ROWS))
    return write_packed(tmp_path_factory.mktemp("packed"), table, SHARD_ROWS)


def positions(samples) -> list[tuple[int, int]]:
    return [(int(s["epoch"]), int(s["index"])) for s in samples]


def batch_positions(batches) -> list[tuple[int, int]]:
    return [p for b in batches for p in zip(b["epoch"].tolist(), b["index"].tolist())]


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


def test_each_epoch_has_its_own_order(packed_dir):
    dataset = PackedDataset(packed_dir, seed=3)
    first = [s["tokens"].tolist() for s in dataset]
    dataset.set_epoch(1)
    second = [s["tokens"].tolist() for s in dataset]
    assert first != second and sorted(first) == sorted(second)


@pytest.mark.parametrize("world_size,batch_size", [(2, 3), (3, 1)])
def test_ranks_and_workers_split_without_overlap(packed_dir, world_size, batch_size):
    seen: list[tuple[int, int]] = []
    for rank in range(world_size):
        dataset = PackedDataset(packed_dir, seed=1, batch_size=batch_size, rank=rank, world_size=world_size)
        batches = list(DataLoader(dataset, batch_size=batch_size, num_workers=2))
        in_process = positions(
            PackedDataset(packed_dir, seed=1, batch_size=batch_size, rank=rank, world_size=world_size)
        )
        # an in-order DataLoader with workers hands rows back in the dataset's own stream order
        assert batch_positions(batches) == in_process
        assert all(len(b["tokens"]) == batch_size for b in batches)
        seen.extend(in_process)
    step = world_size * batch_size
    assert len(seen) == len(set(seen)) == sum(SHARD_ROWS) // step * step


def test_resumes_in_process_from_a_saved_position(packed_dir):
    full = positions(PackedDataset(packed_dir, seed=2, batch_size=4))
    dataset = PackedDataset(packed_dir, seed=2, batch_size=4)
    for consumed, _ in enumerate(dataset, start=1):
        if consumed == 12:
            break
    resumed = PackedDataset(packed_dir, seed=2, batch_size=4)
    resumed.load_state_dict(dataset.state_dict())
    assert positions(resumed) == full[12:]


def test_loader_with_two_workers_resumes_on_exactly_the_next_batch(packed_dir):
    """Across an epoch boundary, and with workers that have read ahead when the state is taken."""
    dataset = PackedDataset(packed_dir, seed=5, batch_size=3, rank=1, world_size=2)  # 6 steps per epoch
    loader = iter(PackedLoader(dataset, num_workers=2))
    uninterrupted = batch_positions(next(loader) for _ in range(14))

    stopped = PackedLoader(PackedDataset(packed_dir, seed=5, batch_size=3, rank=1, world_size=2), num_workers=2)
    batches = iter(stopped)
    before = batch_positions(next(batches) for _ in range(8))  # into the second epoch
    state = stopped.state_dict()
    del batches
    resumed = PackedLoader(PackedDataset(packed_dir, seed=5, batch_size=3, rank=1, world_size=2), num_workers=2)
    resumed.load_state_dict(state)
    after = batch_positions(b for b, _ in zip(resumed, range(6)))
    assert before + after == uninterrupted
    assert state["epoch"] == 1


def test_rejects_a_state_from_another_seed(packed_dir):
    state = PackedDataset(packed_dir, seed=1).state_dict()
    with pytest.raises(ValueError):
        PackedDataset(packed_dir, seed=2).load_state_dict(state)


def test_shorter_rows_are_padded_and_longer_rows_are_an_error(packed_dir):
    sample = next(iter(PackedDataset(packed_dir, seq_len=40)))
    assert sample["tokens"].shape == (40,) and not sample["segment_ids"][SEQ_LEN:].any()
    with pytest.raises(ConfigError, match="longer than the phase's seq_len 16"):
        next(iter(PackedDataset(packed_dir, seq_len=16)))


def test_clear_errors_for_missing_data_and_a_schema_mismatch(tmp_path, packed_dir):
    with pytest.raises(NotAStageOutput):
        PackedDataset(str(tmp_path / "nothing"))
    table = read_table(packed_dir).drop_columns(["positions"])
    with pytest.raises(ConfigError, match="schema mismatch, column 'positions'"):
        PackedDataset(write_packed(tmp_path / "bad", table, (10,)))
    with pytest.raises(ConfigError, match="fewer than one step"):
        PackedDataset(packed_dir, batch_size=30, world_size=2, rank=0)


def test_model_inputs_follow_the_row_contract_with_vision():
    """Two hand-made rows: text then an image (vision ids with their own mask), and padding."""
    tokens = torch.tensor([[1, 660, 29973, 7, 8192 + 1, 2, 0, 0], [1, 5, 6, 1, 9, 10, 11, 2]], dtype=torch.int32)
    vision = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0], [0] * 8], dtype=torch.bool)
    weights = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.float32)
    segments = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2, 2, 2]], dtype=torch.int32)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 0, 1, 2, 3, 4]], dtype=torch.int32)
    batch = {
        "tokens": tokens,
        "vision_mask": vision,
        "loss_weights": weights,
        "segment_ids": segments,
        "positions": pos,
    }
    inputs = model_inputs(batch)
    assert inputs.tokens.dtype == torch.int64 and torch.equal(inputs.tokens, tokens.long())
    assert inputs.targets.tolist() == [[660, 29973, 7, 8193, 2, 0, 0, 0], [5, 6, 1, 9, 10, 11, 2, 0]]
    assert inputs.target_vision.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0] * 8]
    assert torch.equal(inputs.vision_mask, vision)
    # position i carries the weight of token i + 1; nothing is predicted across segments or into padding
    assert inputs.weights.tolist() == [[0, 1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 1, 1, 1, 0]]
    assert torch.equal(inputs.positions, pos.long()) and torch.equal(inputs.segment_ids, segments.long())
