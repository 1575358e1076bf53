"""Masked sequence packing: unpacked examples -> fixed-length rows with segment ids.

LWM's paper packs several examples per training row, keeps attention inside each example and
re-weights the loss so packed training matches unpacked training. This module is that packer, as
small pure functions over numpy arrays (no Beam, no per-token Python):

    plan_packing(lengths, kinds, splittable, options) -> PackPlan   which piece goes to which row
        1. shuffle       examples in a seeded order
        2. cut_overflow  examples longer than the row: drop | truncate | split (plain text only)
        3. mix_order     interleave kinds by tokens (`--mix chat=0.84,text=0.16`), cut the excess
        4. fill_rows     rows built one by one from a streaming pool of pieces, largest fit first
    With `partition_tokens`, examples are first hashed by id into independent partitions of about
    that many tokens (`partition_of`), each planned alone (a worker each, in the Beam job), so no
    worker holds every example's length: LWM's 1K stage packs hundreds of millions of pairs.
    `--mix` is applied per plan: globally without partitions, else within each partition, from the
    kinds that partition holds (a kind absent from it, or from the whole input, leaves the others
    mixed at their relative shares; the job counts and warns of it, it does not fail).
    build_rows(...)  -> PackedColumns                                the row arrays, vectorised
    packed_table(...) -> pyarrow Table in PACKED_SCHEMA
    fill_efficiency(tokens, slots)                                   the share of slots that hold tokens
The Beam job (lwm_data.pipelines.pack) runs these; lwm_data.testing.packing runs them in memory, the
reference tests check the job against.

Row contract (PACKED_SCHEMA), for a row of length L holding n segments:
    segment_ids   1..n in row order, 0 on padding (padding only at the end of the row)
    positions     0-based within each segment, 0 on padding
    loss_weights  weight on predicting token i from the tokens before it in the same segment:
                  0 on each segment's first token, on prompts and on padding. Packing keeps an
                  example's own weights except that it zeroes each segment's first token.

Split plain text: an over-long `text` example without vision tokens is cut into pieces of L tokens
(the last shorter), each packed as its own segment. Positions restart at 0 in every piece: a piece
cannot attend to the previous one (it is another segment, usually in another row), and with rotary
embeddings only relative positions matter. Each piece's first token has weight 0 like any segment.
`piece_starts` records where each segment starts in its original example, so rows unpack exactly.

Loss weighting:
    token    weights stay as they are: the row's loss is the mean over its trained tokens, so a long
             example outweighs a short one in proportion to its tokens.
    example  each segment s with weights w_i (summing to W_s > 0) gets w'_i = w_i / W_s, so each
             segment's weights sum to 1. A trainer's loss  sum_i w'_i l_i / sum_i w'_i  over a row
             (or a batch) then equals  (1/n) sum_s [ sum_{i in s} w_i l_i / W_s ],  the mean over
             examples of each example's own mean loss: exactly what training the n examples
             unpacked (one per row, per-example mean, averaged over the batch) computes. Segments
             with no trained token (W_s = 0) keep weight 0 and are not counted in n.
"""

from __future__ import annotations

import bisect
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from lwm_data.config import setting
from lwm_data.errors import ConfigError
from lwm_data.schemas import PACKED_SCHEMA

ABSENT_FROM_MIX = "absent_from_mix_"  # a plan's count per kind its mix names and its examples lack
OVERFLOW_MODES = ("drop", "truncate", "split")
LOSS_WEIGHTINGS = ("token", "example")
LWM_TEXT_SHARE = 0.16  # LWM keeps about 16% pure text in each batch up to its 8K vision stage


@dataclass(frozen=True)
class PackOptions:
    seq_len: int = setting(help="Tokens per packed row.")
    overflow: str = setting("drop", "Examples longer than a row: drop, truncate, or split (plain text only).")
    loss_weighting: str = setting("token", "token: weights as they are; example: every example counts equally.")
    mix: dict[str, float] | None = setting(None, "Shares of tokens by kind, e.g. chat=0.84,text=0.16.")
    buffer_size: int = setting(10_000, "Examples added to the packer's pool at a time.", flags=("--buffer",))
    carry_rows: int = setting(
        64, "Rows' worth of examples kept in the pool between buffers (sizes to close rows with)."
    )
    seed: int = setting(0, "Seed of the example order.")
    partition_tokens: int = setting(
        0, "Plan in independent partitions of about this many tokens, each on its own worker (0: one plan)."
    )

    def __post_init__(self):
        if self.seq_len < 1:
            raise ConfigError(f"seq_len must be positive, got {self.seq_len}")
        if self.overflow not in OVERFLOW_MODES:
            raise ConfigError(f"overflow must be one of {OVERFLOW_MODES}, got {self.overflow!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.buffer_size < 1 or self.carry_rows < 0:
            raise ConfigError("buffer_size must be >= 1 and carry_rows >= 0")
        if self.partition_tokens < 0:
            raise ConfigError("partition_tokens must be >= 0")
        if self.mix is not None and (not self.mix or min(self.mix.values()) <= 0):
            raise ConfigError(f"mix shares must be positive, got {self.mix}")


# ---------------------------------------------------------------------------------------------
# Planning: which piece of which example goes to which row


@dataclass
class OverflowCut:
    """Each kept example's packed length and number of pieces (0 pieces: dropped)."""

    kept_length: np.ndarray  # int64 tokens packed per example (0 if dropped)
    num_pieces: np.ndarray  # int64


def cut_overflow(lengths: np.ndarray, splittable: np.ndarray, seq_len: int, overflow: str) -> OverflowCut:
    """Apply `overflow` to examples longer than seq_len; `split` drops those that are not plain text."""
    lengths = np.asarray(lengths, np.int64)
    too_long = lengths > seq_len
    if overflow == "truncate":
        kept = np.minimum(lengths, seq_len)
    elif overflow == "split":
        kept = np.where(too_long & ~np.asarray(splittable, bool), 0, lengths)
    else:
        kept = np.where(too_long, 0, lengths)
    num_pieces = -(-kept // seq_len)
    return OverflowCut(kept, num_pieces)


def mix_order(kind_ids: np.ndarray, lengths: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Interleave examples of several kinds so tokens follow `shares`; returns the kept indices.

    kind_ids[i] in [0, len(shares)) names example i's kind; examples keep their order within a kind.
    Example j of kind k sits at virtual time M_kj / share_k, with M_kj the tokens of kind k before
    its middle; merging by that time keeps every prefix of the stream at the target shares (within
    half an example per kind). The stream ends when the scarcest kind runs out:
    T = min_k(total_k / share_k); examples whose middle comes at or after T are the excess and not
    returned (the scarcest kind is always kept whole). Kinds with no tokens take no part: the
    others are mixed at their shares relative to each other (`absent_kinds` says which).
    """
    lengths = np.asarray(lengths, np.int64)
    totals = np.bincount(kind_ids, weights=lengths, minlength=len(shares))
    present = totals > 0
    if not present.any():
        return np.zeros(0, np.int64)
    shares = np.where(present, np.asarray(shares, np.float64), 0.0)
    shares /= shares.sum()
    order = np.argsort(kind_ids, kind="stable")
    sorted_lengths = lengths[order]
    sorted_kinds = kind_ids[order]
    cumulative = np.cumsum(sorted_lengths)
    kind_start = np.searchsorted(sorted_kinds, np.arange(len(shares)))
    tokens_before = cumulative - sorted_lengths - np.concatenate([[0], cumulative])[kind_start[sorted_kinds]]
    virtual_middle = (tokens_before + sorted_lengths / 2) / shares[sorted_kinds]
    budget = np.min(totals[present] / shares[present])
    keep = virtual_middle < budget
    merged = np.lexsort((np.arange(len(order))[keep], virtual_middle[keep]))
    return order[keep][merged]


def absent_kinds(kinds: np.ndarray, mix: dict[str, float]) -> list[str]:
    """The kinds `mix` names that none of `kinds` is."""
    return sorted(set(mix) - set(np.asarray(kinds, dtype=object).tolist()))


def fill_rows(
    lengths: np.ndarray, seq_len: int, buffer_size: int = 10_000, carry_rows: int = 64
) -> tuple[np.ndarray, np.ndarray, int]:
    """Row by row from a pool of items: (row, segment index in row, number of rows) per item.

    Items join the pool a buffer at a time. A row takes the largest pooled item that fits its room,
    again and again, except that an item that does not fill the room exactly must leave room for
    the smallest pooled item: so the row's last item is chosen to close it, instead of leaving a gap
    nothing can fill (best-fit-decreasing over items of 257-600 tokens leaves about 0.9% of an 8K
    row empty; this, 0.25%). Rows are built while the pool holds more than `carry_rows` rows' worth
    of tokens, so every buffer's rows are chosen from a pool that still has sizes to choose from; the
    rest of the pool is packed at the end. Rows are numbered and segments placed in the order they
    are built; items of one size leave the pool in arrival order. Deterministic.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > seq_len):
        raise ValueError(f"item lengths must be in [1, {seq_len}]")
    rows = np.empty(len(lengths), np.int64)
    segments = np.empty(len(lengths), np.int64)
    pool: dict[int, deque[int]] = {}  # size -> items of that size, in arrival order
    sizes: list[int] = []  # pooled sizes, ascending
    pool_tokens = num_rows = 0

    def build_rows_while(more_than: int) -> None:
        nonlocal pool_tokens, num_rows
        while sizes and pool_tokens > more_than:
            room = seq_len
            segment = 0
            while sizes and sizes[0] <= room:
                i = bisect.bisect_right(sizes, room) - 1  # the largest item that fits
                if sizes[i] != room:  # short of an exact fit: the largest that leaves room for the smallest
                    leaves_room = bisect.bisect_right(sizes, room - sizes[0]) - 1
                    if leaves_room >= 0:
                        i = leaves_room
                size = sizes[i]
                items = pool[size]
                item = items.popleft()
                if not items:
                    del sizes[i], pool[size]
                rows[item], segments[item] = num_rows, segment
                segment += 1
                room -= size
                pool_tokens -= size
            num_rows += 1

    for start in range(0, len(lengths), buffer_size):
        for item, size in enumerate(lengths[start : start + buffer_size].tolist(), start):
            items = pool.get(size)
            if items is None:
                items = pool[size] = deque()
                bisect.insort(sizes, size)
            items.append(item)
            pool_tokens += size
        build_rows_while(carry_rows * seq_len)
    build_rows_while(0)
    return rows, segments, num_rows


def _rank_within_groups(groups: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its group."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    first = np.searchsorted(sorted_groups, sorted_groups, side="left")
    ranks = np.empty(len(groups), np.int64)
    ranks[order] = np.arange(len(groups)) - first
    return ranks


@dataclass
class PackPlan:
    """Packed pieces sorted by (row, segment); `example` indexes the planner's input."""

    example: np.ndarray
    start: np.ndarray  # first token of the piece in its example
    length: np.ndarray
    row: np.ndarray
    segment: np.ndarray
    num_rows: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return len(np.unique(self.example))


def plan_packing(lengths: np.ndarray, kinds: np.ndarray, splittable: np.ndarray, options: PackOptions) -> PackPlan:
    """Decide every piece's row and segment from example lengths alone (no token data needed).

    `counts`: filtered.too_long, filtered.not_in_mix, filtered.mix_excess (examples), and
    truncated, truncated_tokens, split, split_pieces; `absent_from_mix_<kind>` = 1 for each kind the
    mix names that these examples lack (they are mixed without it).
    """
    lengths = np.asarray(lengths, np.int64)
    kinds = np.asarray(kinds, dtype=object)
    if len(lengths) and lengths.min() < 1:
        raise ValueError("examples must have at least one token")
    shuffled = np.random.default_rng(options.seed).permutation(len(lengths))
    cut = cut_overflow(lengths, splittable, options.seq_len, options.overflow)
    counts = {
        "filtered.too_long": int((cut.num_pieces == 0).sum()),
        "truncated": int((cut.kept_length < lengths).sum() - (cut.num_pieces == 0).sum()),
        "truncated_tokens": int((lengths - cut.kept_length)[cut.num_pieces > 0].sum()),
        "split": int((cut.num_pieces > 1).sum()),
        "split_pieces": int(cut.num_pieces[cut.num_pieces > 1].sum()),
    }
    stream = shuffled[cut.num_pieces[shuffled] > 0]
    if options.mix is not None:
        names = list(options.mix)
        kind_ids = np.array([names.index(k) if k in options.mix else -1 for k in kinds[stream]], np.int64)
        in_mix = stream[kind_ids >= 0]
        counts["filtered.not_in_mix"] = int((kind_ids < 0).sum())
        shares = np.array(list(options.mix.values()))
        mixed = in_mix[mix_order(kind_ids[kind_ids >= 0], cut.kept_length[in_mix], shares)]
        counts["filtered.mix_excess"] = len(in_mix) - len(mixed)
        if len(in_mix):  # with none of the kinds, there is nothing to mix (and no rows)
            counts.update({f"{ABSENT_FROM_MIX}{kind}": 1 for kind in absent_kinds(kinds[in_mix], options.mix)})
        stream = mixed
    example = np.repeat(stream, cut.num_pieces[stream])
    start = _rank_within_groups(np.repeat(np.arange(len(stream)), cut.num_pieces[stream])) * options.seq_len
    length = np.minimum(cut.kept_length[example] - start, options.seq_len)
    row, segment, num_rows = fill_rows(length, options.seq_len, options.buffer_size, options.carry_rows)
    order = np.lexsort((segment, row))
    return PackPlan(example[order], start[order], length[order], row[order], segment[order], num_rows, counts)


def num_partitions(total_tokens: int, partition_tokens: int) -> int:
    """How many independent plans a packing of `total_tokens` is cut into."""
    return max(1, -(-total_tokens // partition_tokens)) if partition_tokens else 1


def partition_of(example_id: str, partitions: int) -> int:
    """An example's plan, by a hash of its id that every worker and run computes alike."""
    return zlib.crc32(example_id.encode()) % partitions


def partition_options(options: PackOptions, partition: int) -> PackOptions:
    """Each partition shuffles with a seed of its own (partition 0 keeps the single plan's)."""
    return replace(options, seed=options.seed + partition * 1_000_003) if partition else options


# ---------------------------------------------------------------------------------------------
# Building rows


def fill_efficiency(tokens: int, slots: int) -> float:
    """The share of a packed output's token slots (rows x seq_len) that hold example tokens."""
    return round(tokens / slots, 6) if slots else 0.0


@dataclass
class PackedColumns:
    """Row arrays, each [num_rows, seq_len], plus per-segment lengths in (row, segment) order."""

    tokens: np.ndarray
    loss_weights: np.ndarray
    vision_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    segment_rows: np.ndarray  # row of each segment
    segment_lengths: np.ndarray


def build_rows(
    tokens: np.ndarray,
    loss_weights: np.ndarray,
    vision_mask: np.ndarray,
    segment_lengths: np.ndarray,
    segment_rows: np.ndarray,
    num_rows: int,
    seq_len: int,
    loss_weighting: str = "token",
) -> PackedColumns:
    """Lay out segments (flat arrays in (row, segment) order) into rows, padding at the end.

    Vectorised over all tokens: a row's segments are contiguous in the flat arrays and padding
    only follows them, so one boolean mask (`filled`) places every token.
    """
    segment_lengths = np.asarray(segment_lengths, np.int64)
    segment_rows = np.asarray(segment_rows, np.int64)
    total = int(segment_lengths.sum())
    if total != len(tokens):
        raise ValueError(f"segments cover {total} tokens, got {len(tokens)}")
    row_tokens = np.bincount(segment_rows, weights=segment_lengths, minlength=num_rows).astype(np.int64)
    if len(row_tokens) and row_tokens.max() > seq_len:
        raise ValueError(f"a row holds more than {seq_len} tokens")
    filled = np.arange(seq_len) < row_tokens[:, None]
    index_type = np.int32 if total < 2**31 else np.int64
    seg_first_token = np.cumsum(segment_lengths) - segment_lengths
    segment_index = np.arange(len(segment_lengths)) - np.searchsorted(segment_rows, segment_rows)
    positions = np.arange(total, dtype=index_type) - np.repeat(seg_first_token.astype(index_type), segment_lengths)

    weights = np.array(loss_weights, np.float32)
    weights[seg_first_token[segment_lengths > 0]] = 0.0
    if loss_weighting == "example" and len(segment_lengths):
        sums = np.add.reduceat(weights.astype(np.float64), seg_first_token)
        scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
        weights *= np.repeat(scale.astype(np.float32), segment_lengths)

    def scatter(values: np.ndarray, dtype) -> np.ndarray:
        out = np.zeros((num_rows, seq_len), dtype)
        out[filled] = values
        return out

    return PackedColumns(
        tokens=scatter(tokens, np.int32),
        loss_weights=scatter(weights, np.float32),
        vision_mask=scatter(vision_mask, np.bool_),
        segment_ids=scatter(np.repeat((segment_index + 1).astype(np.int32), segment_lengths), np.int32),
        positions=scatter(positions, np.int32),
        segment_rows=segment_rows,
        segment_lengths=segment_lengths,
    )


def packed_table(
    columns: PackedColumns, example_ids: Sequence[str], kinds: Sequence[str], piece_starts: np.ndarray
) -> pa.Table:
    """PACKED_SCHEMA rows; example_ids/kinds/piece_starts are per segment in (row, segment) order."""
    num_rows, seq_len = columns.tokens.shape
    row_offsets = pa.array(np.arange(num_rows + 1, dtype=np.int64) * seq_len, pa.int32())
    segment_offsets = pa.array(
        np.searchsorted(columns.segment_rows, np.arange(num_rows + 1)).astype(np.int32), pa.int32()
    )

    def per_token(values: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(row_offsets, pa.array(values.reshape(-1), arrow_type))

    def per_segment(values, arrow_type: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(segment_offsets, pa.array(values, arrow_type))

    pad = columns.segment_ids == 0
    vision = columns.vision_mask
    arrays = {
        "tokens": per_token(columns.tokens, pa.int32()),
        "loss_weights": per_token(columns.loss_weights, pa.float32()),
        "vision_mask": per_token(columns.vision_mask, pa.bool_()),
        "segment_ids": per_token(columns.segment_ids, pa.int32()),
        "positions": per_token(columns.positions, pa.int32()),
        "num_segments": pa.array(np.bincount(columns.segment_rows, minlength=num_rows).astype(np.int32)),
        "num_text_tokens": pa.array((~pad & ~vision).sum(axis=1).astype(np.int32)),
        "num_vision_tokens": pa.array((~pad & vision).sum(axis=1).astype(np.int32)),
        "num_pad_tokens": pa.array(pad.sum(axis=1).astype(np.int32)),
        "example_ids": per_segment(list(example_ids), pa.string()),
        "kinds": per_segment(list(kinds), pa.string()),
        "segment_lengths": per_segment(columns.segment_lengths.astype(np.int32), pa.int32()),
        "piece_starts": per_segment(np.asarray(piece_starts, np.int32), pa.int32()),
    }
    return pa.Table.from_arrays([arrays[f.name] for f in PACKED_SCHEMA], schema=PACKED_SCHEMA)
