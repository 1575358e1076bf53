"""The written contracts of each table, as checks that `lwm-data validate` runs.

A row check sees one shard at a time; a global check sees chosen columns of the whole output. Each
counts violations by class ("tokens length != num_tokens", ...), so one message says what is wrong
and how often. The registry (`lwm_data.pipelines.registry`) says which checks hold for which stage.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lwm_data.arrays import flagged_per_list, flat_values, list_lengths, run_starts
from lwm_data.examples import EXAMPLE_PROBLEMS, problem_masks
from lwm_data.lwm_format.layout import CODEBOOK_SIZE, TOKENS_PER_FRAME, VISION_VOCAB_SIZE

TableCheck = Callable[[pa.Table, Counter], None]


@dataclass(frozen=True)
class GlobalCheck:
    """A check over the whole output, reading only `columns`."""

    columns: tuple[str, ...]
    check: TableCheck


def _list_lengths(table: pa.Table, column: str) -> np.ndarray:
    return list_lengths(table[column])


def _flat(table: pa.Table, column: str) -> np.ndarray:
    return flat_values(table[column])


def check_example_rows(table: pa.Table, violations: Counter) -> None:
    """Every problem that keeps an example out of packing (lwm_data.examples.problem_masks), and meta
    that is not JSON."""
    for reason, mask in problem_masks(table):
        violations[EXAMPLE_PROBLEMS[reason]] += int(mask.sum())
    for meta in table["meta"].to_pylist():
        if meta is not None:
            try:
                json.loads(meta)
            except json.JSONDecodeError:
                violations["meta is not JSON"] += 1


def check_token_ids(table: pa.Table, violations: Counter, text_vocab: int | None, shard: str) -> None:
    """Every id has an embedding: text ids in 0..text_vocab-1 (when the manifest records the
    vocabulary), vision ids (`vision_mask`) in LWM's vision vocabulary. Each class names the first
    offending row: its id column where the table has one, else its shard and row number."""
    tokens = _flat(table, "tokens")
    vision = (
        _flat(table, "vision_mask").astype(bool) if "vision_mask" in table.column_names else np.zeros(len(tokens), bool)
    )
    offsets = np.concatenate([[0], np.cumsum(_list_lengths(table, "tokens"))])
    bad_vision = vision & ((tokens < 0) | (tokens >= VISION_VOCAB_SIZE))
    _count_rows(violations, f"vision id outside 0..{VISION_VOCAB_SIZE - 1}", bad_vision, offsets, table, shard)
    text_ids = ~vision
    bad_text = text_ids & (tokens < 0) if text_vocab is None else text_ids & ((tokens < 0) | (tokens >= text_vocab))
    upper = "" if text_vocab is None else f"..{text_vocab - 1}"
    _count_rows(violations, f"text id outside 0{upper}", bad_text, offsets, table, shard)


def _count_rows(violations: Counter, label: str, bad: np.ndarray, offsets: np.ndarray, table: pa.Table, shard: str):
    rows = flagged_per_list(bad, offsets) > 0
    if not rows.any():
        return
    key = next((k for k in violations if k.startswith(label + " ")), None)
    if key is None:
        key = f"{label} (first: {_locator(table, int(np.argmax(rows)), shard)})"
    violations[key] += int(rows.sum())


def _locator(table: pa.Table, row: int, shard: str) -> str:
    for columns in (("example_id",), ("book_id", "chunk_index")):
        if set(columns) <= set(table.column_names):
            return "/".join(str(table[c][row].as_py()) for c in columns)
    return f"{shard} row {row}"


def check_codes_rows(table: pa.Table, violations: Counter) -> None:
    frames = table["num_frames"].to_numpy()
    violations[f"codes length != num_frames x {TOKENS_PER_FRAME}"] += int(
        (_list_lengths(table, "codes") != frames * TOKENS_PER_FRAME).sum()
    )
    violations["frame_indices length != num_frames"] += int((_list_lengths(table, "frame_indices") != frames).sum())
    violations["no frames"] += int((frames < 1).sum())
    violations[f"code outside [0, {CODEBOOK_SIZE})"] += int((_flat(table, "codes") >= CODEBOOK_SIZE).sum())
    media = table["media_type"].to_numpy(zero_copy_only=False)
    violations["media_type not image or video"] += int((~np.isin(media, ["image", "video"])).sum())


def check_chunk_rows(table: pa.Table, violations: Counter) -> None:
    num_tokens = table["num_tokens"].to_numpy()
    violations["tokens length != num_tokens"] += int((_list_lengths(table, "tokens") != num_tokens).sum())
    violations["empty chunk (no tokens)"] += int((num_tokens == 0).sum())
    index, total = table["chunk_index"].to_numpy(), table["num_chunks"].to_numpy()
    violations["chunk_index outside [0, num_chunks)"] += int(((index < 0) | (index >= total)).sum())
    start, end = table["char_start"].to_numpy(), table["char_end"].to_numpy()
    text_lengths = pc.utf8_length(table["text"]).to_numpy()
    violations["len(text) != char_end - char_start"] += int((text_lengths != end - start).sum())


def check_chunk_books(table: pa.Table, violations: Counter) -> None:
    """Across shards: each book's chunks are 0..n-1, once each, and tile its text without gaps."""
    rows = table.select(["book_id", "chunk_index", "num_chunks", "char_start", "char_end"]).sort_by(
        [("book_id", "ascending"), ("chunk_index", "ascending")]
    )
    book = rows["book_id"].to_numpy(zero_copy_only=False)
    index, total = rows["chunk_index"].to_numpy(), rows["num_chunks"].to_numpy()
    start, end = rows["char_start"].to_numpy(), rows["char_end"].to_numpy()
    first = run_starts(book)
    expected_index = np.arange(len(book)) - np.maximum.accumulate(np.where(first, np.arange(len(book)), 0))
    violations["chunk indices of a book are not 0..n-1 exactly once"] += int((index != expected_index).sum())
    last = np.r_[book[1:] != book[:-1], True]
    violations["num_chunks != number of chunks of the book"] += int((last & (index + 1 != total)).sum())
    gaps = (~first[1:]) & (start[1:] != end[:-1])
    violations["chunk texts do not tile the book (gap or overlap)"] += int(gaps.sum() + (first & (start != 0)).sum())


def check_packed_rows(table: pa.Table, violations: Counter) -> None:
    """The packed-row contract (lwm_data.packing): equal-length rows; segment ids 1..n in row
    order then 0-padding; positions restart at 0 per segment; no weight on a segment's first token
    or on padding; per-row counts and per-segment lists agree with the token columns."""
    lengths = _list_lengths(table, "tokens")
    for column in ("loss_weights", "vision_mask", "segment_ids", "positions"):
        violations[f"{column} length != tokens length"] += int((_list_lengths(table, column) != lengths).sum())
    num_segments = table["num_segments"].to_numpy()
    for column in ("example_ids", "kinds", "segment_lengths", "piece_starts"):
        violations[f"{column} length != num_segments"] += int((_list_lengths(table, column) != num_segments).sum())
    if len(set(lengths.tolist())) > 1:
        violations["rows of different lengths"] += 1
    if violations.total() or not table.num_rows:
        return
    width = int(lengths[0])
    seg = _flat(table, "segment_ids").reshape(-1, width)
    pos = _flat(table, "positions").reshape(-1, width)
    weights = _flat(table, "loss_weights").reshape(-1, width)
    vision = _flat(table, "vision_mask").reshape(-1, width).astype(bool)
    tokens = _flat(table, "tokens").reshape(-1, width)
    columns = np.arange(width)[None, :]
    starts = np.ones_like(seg, dtype=bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    pad = seg == 0
    step = np.diff(seg, axis=1)
    violations["segment ids not 1..n in row order (0 only at the end)"] += int(
        ((step < 0) & (seg[:, 1:] != 0)).sum()
        + (step > 1).sum()
        + (seg[:, 0] > 1).sum()
        + (pad[:, :-1] & ~pad[:, 1:]).sum()
    )
    violations["row without a segment"] += int(pad[:, 0].sum())
    expected_pos = columns - np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
    violations["positions do not restart at 0 in each segment"] += int(
        ((pos != expected_pos) & ~pad).sum() + (pos[pad] != 0).sum()
    )
    violations["loss weight on a segment's first token or on padding"] += int(((weights != 0) & (starts | pad)).sum())
    violations["loss weight negative or not finite"] += int((~np.isfinite(weights) | (weights < 0)).sum())
    violations["padding with a non-zero token or a vision flag"] += int(((tokens != 0) | vision)[pad].sum())
    violations["num_segments != max segment id"] += int((seg.max(axis=1, initial=0) != num_segments).sum())
    violations["num_pad_tokens wrong"] += int((pad.sum(axis=1) != table["num_pad_tokens"].to_numpy()).sum())
    violations["num_text_tokens wrong"] += int(
        ((~pad & ~vision).sum(axis=1) != table["num_text_tokens"].to_numpy()).sum()
    )
    violations["num_vision_tokens wrong"] += int(
        ((~pad & vision).sum(axis=1) != table["num_vision_tokens"].to_numpy()).sum()
    )
    run_starts = np.flatnonzero(starts[~pad])  # segments are contiguous runs once padding is removed
    run_lengths = np.diff(np.append(run_starts, int((~pad).sum())))
    segment_lengths = _flat(table, "segment_lengths")
    if len(run_lengths) != len(segment_lengths) or (run_lengths != segment_lengths).any():
        violations["segment_lengths != tokens per segment"] += 1
    violations["piece_starts negative"] += int((_flat(table, "piece_starts") < 0).sum())


def check_packed_row_lengths(table: pa.Table, violations: Counter) -> None:
    """Across shards: every row has the same length (pad + segment tokens)."""
    num_segments = _list_lengths(table, "segment_lengths")
    row_of_segment = np.repeat(np.arange(table.num_rows), num_segments)
    segment_tokens = np.bincount(row_of_segment, weights=_flat(table, "segment_lengths"), minlength=table.num_rows)
    row_lengths = table["num_pad_tokens"].to_numpy() + segment_tokens.astype(np.int64)
    if len(set(row_lengths.tolist())) > 1:
        violations["rows of different lengths across shards"] += 1


def check_qa_rows(table: pa.Table, violations: Counter) -> None:
    violations["no QA pairs"] += int((_list_lengths(table, "pairs") == 0).sum())
    pairs = pc.list_flatten(table["pairs"].combine_chunks())
    for field in ("question", "answer"):
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(pairs.field(field))), 0)
        violations[f"empty {field}"] += int(empty.to_numpy(zero_copy_only=False).sum())


def check_qa_chunks(table: pa.Table, violations: Counter) -> None:
    """Across shards: each chunk is answered at most once."""
    keys = table.group_by(["book_id", "chunk_index"]).aggregate([([], "count_all")])
    violations["chunk answered more than once"] += int((keys["count_all"].to_numpy() > 1).sum())


def check_evalset_rows(table: pa.Table, violations: Counter) -> None:
    """An eval row asks for something and fits its length: answers present and non-empty, the prompt
    within the example, the example within its context length, weight only after the prompt."""
    answers = _list_lengths(table, "answers")
    violations["no expected answers"] += int((answers == 0).sum())
    if answers.sum():
        flat = pc.list_flatten(table["answers"].combine_chunks())
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(flat)), 0).to_numpy(zero_copy_only=False)
        violations["empty expected answer"] += int(empty.sum())
    num_tokens = table["num_tokens"].to_numpy()
    prompt = table["prompt_tokens"].to_numpy()
    violations["num_tokens > context_length"] += int((num_tokens > table["context_length"].to_numpy()).sum())
    violations["prompt_tokens outside 1..num_tokens - 1"] += int(((prompt < 1) | (prompt >= num_tokens)).sum())
    depth = table["depth"].to_numpy(zero_copy_only=False)
    present = ~np.isnan(depth.astype(np.float64))
    violations["depth outside [0, 1]"] += int(((depth[present] < 0) | (depth[present] > 1)).sum())
    weights = table["loss_weights"]
    for i in range(table.num_rows):
        w = weights[i].values.to_numpy()
        if len(w) == num_tokens[i] and (w[: prompt[i]].any() or not w[prompt[i] :].all()):
            violations["loss weight on the prompt or missing on the answer"] += 1
