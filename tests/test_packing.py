"""The packing core (lwm_data.packing): invariants on random inputs, plus the pieces one by one."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_data.checks import check_packed_rows
from lwm_data.config import parse_mapping as parse_mix
from lwm_data.examples import Examples
from lwm_data.packing import PackOptions, cut_overflow, fill_rows, mix_order
from lwm_data.testing.packing import pack_examples, unpack_rows

SETTINGS = settings(max_examples=100, deadline=None)


@st.composite
def packing_cases(draw):
    seq_len = draw(st.integers(4, 48))
    n = draw(st.integers(0, 25))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    lengths = [draw(st.integers(1, 3 * seq_len)) for _ in range(n)]
    kinds = [draw(st.sampled_from(["chat", "text", "image_text"])) for _ in range(n)]
    examples = Examples.from_arrays(
        [f"ex{i:03d}" for i in range(n)],
        kinds,
        [rng.integers(1, 32000, size=k).astype(np.int32) for k in lengths],
        [(rng.random(k) < 0.7) * rng.uniform(0.5, 2.0) for k in lengths],
        [(rng.random(k) < 0.5) & (kind == "image_text") for k, kind in zip(lengths, kinds)],
    )
    options = PackOptions(
        seq_len=seq_len,
        overflow=draw(st.sampled_from(["drop", "truncate", "split"])),
        loss_weighting=draw(st.sampled_from(["token", "example"])),
        buffer_size=draw(st.integers(1, 30)),
        carry_rows=draw(st.integers(0, 6)),
        seed=seed,
    )
    return examples, options


def example_slice(examples: Examples, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = examples.offsets[i], examples.offsets[i + 1]
    return examples.tokens[lo:hi], examples.loss_weights[lo:hi], examples.vision_mask[lo:hi]


def expected_packed_length(examples: Examples, i: int, options: PackOptions) -> int:
    """Tokens of example i that packing keeps (0: dropped)."""
    length = int(examples.lengths[i])
    if length <= options.seq_len:
        return length
    if options.overflow == "truncate":
        return options.seq_len
    if options.overflow == "split" and examples.splittable[i]:
        return length
    return 0


@SETTINGS
@given(packing_cases())
def test_every_example_is_packed_once_or_counted_dropped(case):
    examples, options = case
    table, plan = pack_examples(examples, options)
    kept = {examples.example_ids[i] for i in range(len(examples)) if expected_packed_length(examples, i, options)}
    segments_per_example = Counter(id for ids in table["example_ids"].to_pylist() for id in ids)
    assert set(segments_per_example) == kept
    assert plan.counts["filtered.too_long"] == len(examples) - len(kept)
    for i in range(len(examples)):
        packed = expected_packed_length(examples, i, options)
        pieces = -(-packed // options.seq_len)
        assert segments_per_example.get(examples.example_ids[i], 0) == pieces


@SETTINGS
@given(packing_cases())
def test_rows_follow_the_contract(case):
    examples, options = case
    table, _ = pack_examples(examples, options)
    for column in ("tokens", "loss_weights", "vision_mask", "segment_ids", "positions"):
        assert all(len(row) == options.seq_len for row in table[column].to_pylist())
    violations = Counter()
    check_packed_rows(table, violations)
    assert not +violations
    for row in table.to_pylist():
        segments = np.array(row["segment_ids"])
        n = row["num_segments"]
        assert sorted(set(segments.tolist()) - {0}) == list(range(1, n + 1))
        for s in range(1, n + 1):
            where = np.flatnonzero(segments == s)
            assert (np.diff(where) == 1).all()  # contiguous
            assert np.array_equal(np.array(row["positions"])[where], np.arange(len(where)))
            assert row["loss_weights"][where[0]] == 0
        assert row["num_pad_tokens"] == options.seq_len - sum(row["segment_lengths"])


@SETTINGS
@given(packing_cases())
def test_unpacking_gives_back_the_examples(case):
    examples, options = case
    table, _ = pack_examples(examples, options)
    unpacked = unpack_rows(table)
    by_id = {id: i for i, id in enumerate(examples.example_ids)}
    for j, example_id in enumerate(unpacked.example_ids):
        i = by_id[example_id]
        kept = expected_packed_length(examples, i, options)
        tokens, weights, vision = example_slice(examples, i)
        got_tokens, got_weights, got_vision = example_slice(unpacked, j)
        assert unpacked.kinds[j] == examples.kinds[i]
        assert np.array_equal(got_tokens, tokens[:kept])
        assert np.array_equal(got_vision, vision[:kept])
        piece_starts = np.arange(0, kept, options.seq_len)
        expected = weights[:kept].astype(np.float32).copy()
        expected[piece_starts] = 0
        if options.loss_weighting == "token":
            assert np.array_equal(got_weights, expected)
        else:  # each piece's weights are the example's, scaled to sum to 1 (or all 0)
            for start in piece_starts:
                piece, want = got_weights[start : start + options.seq_len], expected[start : start + options.seq_len]
                total = want.sum()
                assert np.allclose(piece, want / total if total else 0, rtol=1e-5)
                assert np.isclose(piece.sum(), 1.0 if total else 0.0, rtol=1e-5)


@SETTINGS
@given(packing_cases())
def test_packing_is_deterministic_for_a_seed(case):
    examples, options = case
    first, _ = pack_examples(examples, options)
    again, _ = pack_examples(examples, options)
    assert first.equals(again)


def test_a_different_seed_packs_differently():
    lengths = np.arange(1, 200) % 37 + 1
    examples = Examples.from_arrays(
        [f"e{i}" for i in range(len(lengths))],
        ["chat"] * len(lengths),
        [np.full(k, i, np.int32) for i, k in enumerate(lengths)],
        [np.ones(k) for k in lengths],
        [np.zeros(k, bool) for k in lengths],
    )
    a, _ = pack_examples(examples, PackOptions(seq_len=64, seed=1, buffer_size=20))
    b, _ = pack_examples(examples, PackOptions(seq_len=64, seed=2, buffer_size=20))
    assert a["example_ids"].to_pylist() != b["example_ids"].to_pylist()


def test_a_row_takes_the_largest_item_that_fits_and_closes_with_an_exact_fit():
    # row 0: 6 (room 4), then 4 fits exactly; row 1: the 5 left
    rows, segments, num_rows = fill_rows(np.array([4, 6, 5]), seq_len=10)
    assert num_rows == 2
    assert rows.tolist() == [0, 0, 1]
    assert segments.tolist() == [1, 0, 0]


def test_a_row_keeps_room_for_the_smallest_item_rather_than_leave_a_dead_gap():
    # largest-first would take 6 then 3 (gap 1 that nothing fills); keeping room for a 2 closes it
    rows, _, num_rows = fill_rows(np.array([6, 3, 2, 2]), seq_len=10)
    assert rows.tolist() == [0, 1, 0, 0] and num_rows == 2


def test_rows_are_nearly_full_for_short_and_for_image_text_like_lengths():
    rng = np.random.default_rng(0)
    short = np.clip(np.exp(rng.normal(np.log(300), 0.8, 3000)), 8, 2048).astype(np.int64)
    _, _, num_rows = fill_rows(short, 2048, buffer_size=1000)
    assert short.sum() / (num_rows * 2048) > 0.99
    pairs = rng.integers(257, 601, 40_000)  # image-text pairs: no short item to fill a gap with
    _, _, num_rows = fill_rows(pairs, 8192)
    assert pairs.sum() / (num_rows * 8192) > 0.995


def test_fill_rows_rejects_items_longer_than_a_row():
    with pytest.raises(ValueError):
        fill_rows(np.array([5, 11]), seq_len=10)


def test_cut_overflow_modes():
    lengths, splittable = np.array([5, 25, 25]), np.array([True, True, False])
    assert cut_overflow(lengths, splittable, 10, "drop").num_pieces.tolist() == [1, 0, 0]
    truncated = cut_overflow(lengths, splittable, 10, "truncate")
    assert truncated.kept_length.tolist() == [5, 10, 10] and truncated.num_pieces.tolist() == [1, 1, 1]
    split = cut_overflow(lengths, splittable, 10, "split")
    assert split.kept_length.tolist() == [5, 25, 0] and split.num_pieces.tolist() == [1, 3, 0]


def test_mix_order_keeps_token_shares_in_every_prefix():
    rng = np.random.default_rng(1)
    kinds = rng.integers(0, 2, 4000)
    lengths = rng.integers(100, 1000, 4000)
    order = mix_order(kinds, lengths, np.array([0.84, 0.16]))
    tokens = np.where(kinds[order] == 1, lengths[order], 0).cumsum() / lengths[order].cumsum()
    assert abs(tokens[-1] - 0.16) < 0.01
    assert np.all(np.abs(tokens[200:] - 0.16) < 0.02)
    within_kind = order[kinds[order] == 0]
    assert (np.diff(within_kind) > 0).all()  # order within a kind is kept


def test_mix_order_leaves_out_kinds_without_tokens_and_mixes_the_rest():
    kinds = np.array([0, 2, 0, 2, 2])
    lengths = np.array([10, 10, 10, 10, 10])
    order = mix_order(kinds, lengths, np.array([0.5, 0.3, 0.2]))  # kind 1 absent: 0 and 2 mixed 5:2
    assert sorted(kinds[order].tolist()) == [0, 0, 2]
    assert mix_order(np.zeros(0, np.int64), np.zeros(0, np.int64), np.array([0.5, 0.5])).tolist() == []


def test_parse_mix():
    assert parse_mix("chat=0.84, text=0.16") == {"chat": 0.84, "text": 0.16}
    assert parse_mix(None) is None
    with pytest.raises(ValueError):
        parse_mix("chat")


def test_mix_in_plan_counts_kinds_left_out_and_the_excess():
    n = 300
    kinds = ["chat" if i % 2 else "text" for i in range(n)] + ["image_text"] * 5
    lengths = [20] * len(kinds)
    examples = Examples.from_arrays(
        [f"e{i}" for i in range(len(kinds))],
        kinds,
        [np.ones(k, np.int32) for k in lengths],
        [np.ones(k) for k in lengths],
        [np.zeros(k, bool) for k in lengths],
    )
    table, plan = pack_examples(examples, PackOptions(seq_len=100, mix={"chat": 0.8, "text": 0.2}))
    assert plan.counts["filtered.not_in_mix"] == 5
    packed_kinds = Counter(k for ks in table["kinds"].to_pylist() for k in ks)
    assert packed_kinds["chat"] == 150 and abs(packed_kinds["text"] - 150 * 0.25) <= 1
    assert plan.counts["filtered.mix_excess"] == 150 - packed_kinds["text"]
    _, chat_only = pack_examples(examples, PackOptions(seq_len=100, mix={"chat": 0.8, "video_text": 0.2}))
    assert chat_only.counts["absent_from_mix_video_text"] == 1 and chat_only.counts["filtered.mix_excess"] == 0
