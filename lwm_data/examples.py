"""The unpacked training example, shared by every stage that makes or reads EXAMPLE_SCHEMA rows
(text, chat, import-lwm, pack, export): its kinds, its row form `Example`, its column form
`Examples`, and the one reader and writer of EXAMPLE_SCHEMA tables.

Token conventions: text ids and vision ids share one int32 sequence and `vision_mask` marks the
vision ids; `loss_weights[i]` weighs predicting token i from the tokens before it (so a prompt
token, and the first token, carry 0).

Kinds:
    text        plain text (a whole book: BOS + its chunks); the only kind packing may split
    chat        a prompt and answers (weight only on the answers), such as long-context QA chats
    image_text  one frame of vision codes with text
    video_text  several frames with text
    image_chat  a conversation about one image (LLaVA-style instruction data): weight on the answers
    video_chat  a conversation about a video
    eval        a long-context eval prompt (weight 0) and its expected answer (weight 1)
Vision kinds (the last four) are never split by packing (`splittable`).

What makes a row unusable for packing and training is said once, in `problem_masks`: pack
dead-letters such rows by reason, `lwm-data validate` counts them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from lwm_data.arrays import flagged_per_list, flat_values, list_lengths
from lwm_data.schemas import EXAMPLE_SCHEMA

TEXT, CHAT, IMAGE_TEXT, VIDEO_TEXT = "text", "chat", "image_text", "video_text"
IMAGE_CHAT, VIDEO_CHAT = "image_chat", "video_chat"
EVAL = "eval"
VISION_KINDS = frozenset({IMAGE_TEXT, VIDEO_TEXT, IMAGE_CHAT, VIDEO_CHAT})
KINDS = frozenset({TEXT, CHAT, EVAL}) | VISION_KINDS
SPLITTABLE_KINDS = frozenset({TEXT})

# Why an example row cannot be packed or trained on: reason (its dead letters) -> what validate calls it.
EXAMPLE_PROBLEMS = {
    "unknown_kind": "unknown kind",
    "bad_loss_weights": "loss weight negative or not finite",
    "length_mismatch": "tokens, loss_weights or vision_mask length != num_tokens",
    "empty_example": "empty example",
}


def eval_example_id(task: str, context_length: int, depth: float | None, sample: int) -> str:
    """An eval row's id, `task-length[-depth]-sample` (`niah_single-4096-0.5-0`): its group, what
    `eval_group` gives back, is everything before the sample."""
    where = "" if depth is None else f"-{depth:g}"
    return f"{task}-{context_length}{where}-{sample}"


def eval_group(example_id: str) -> str:
    """The (task, length, depth) an eval row measures, from its id: `niah_single-4096-0.5`."""
    return example_id.rsplit("-", 1)[0]


def splittable(kinds: np.ndarray, vision_tokens: np.ndarray) -> np.ndarray:
    """Which examples packing may split: plain text, a splittable kind holding no vision token."""
    return np.isin(np.asarray(kinds, dtype=object), list(SPLITTABLE_KINDS)) & (np.asarray(vision_tokens) == 0)


def problem_masks(table: pa.Table) -> list[tuple[str, np.ndarray]]:
    """(reason, rows it applies to) for every problem of EXAMPLE_PROBLEMS, vectorised per column, most
    basic last. The list columns are checked against `num_tokens` where the table holds them, so a
    reader that leaves the token lists out (pack's first pass) checks all the rest."""
    num_tokens = table["num_tokens"].to_numpy(zero_copy_only=False)
    kinds = table["kind"].to_numpy(zero_copy_only=False)
    masks = [("unknown_kind", ~np.isin(kinds, list(KINDS)))]
    if "loss_weights" in table.column_names:
        weights = flat_values(table["loss_weights"])
        offsets = np.concatenate([[0], np.cumsum(list_lengths(table["loss_weights"], 0))])
        masks.append(("bad_loss_weights", flagged_per_list(~np.isfinite(weights) | (weights < 0), offsets) > 0))
    for column in ("tokens", "loss_weights", "vision_mask"):
        if column in table.column_names:
            masks.append(("length_mismatch", list_lengths(table[column]) != num_tokens))
    masks.append(("empty_example", num_tokens < 1))
    return masks


def example_problems(table: pa.Table) -> list[str]:
    """Each row's problem ("" when it has none): the most basic of its problems, as a reason."""
    problems = np.full(table.num_rows, "", dtype=object)
    for reason, mask in problem_masks(table):
        problems[mask] = reason
    return problems.tolist()


@dataclass
class Example:
    """One unpacked, tokenized example (one EXAMPLE_SCHEMA row)."""

    example_id: str
    kind: str
    source: str
    tokens: np.ndarray  # int32
    loss_weights: np.ndarray  # float32, weight on predicting token i
    vision_mask: np.ndarray  # bool
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def examples_to_table(examples: Sequence[Example]) -> pa.Table:
    """EXAMPLE_SCHEMA rows; token columns are built from numpy buffers, not per-token Python objects."""
    columns = Examples.from_arrays(
        [e.example_id for e in examples],
        [e.kind for e in examples],
        [e.tokens for e in examples],
        [e.loss_weights for e in examples],
        [e.vision_mask for e in examples],
    )
    return columns.to_table(
        sources=[e.source for e in examples],
        texts=[e.text for e in examples],
        metas=[json.dumps(e.meta, sort_keys=True) for e in examples],
    )


def examples_from_table(table: pa.Table) -> Iterator[Example]:
    """The rows of an EXAMPLE_SCHEMA table as `Example`s (token columns as numpy)."""
    for batch in table.to_batches():
        tokens, weights, mask = (batch.column(name) for name in ("tokens", "loss_weights", "vision_mask"))
        for i in range(batch.num_rows):
            meta = batch.column("meta")[i].as_py()
            yield Example(
                example_id=batch.column("example_id")[i].as_py(),
                kind=batch.column("kind")[i].as_py(),
                source=batch.column("source")[i].as_py(),
                tokens=tokens[i].values.to_numpy(),
                loss_weights=weights[i].values.to_numpy(),
                vision_mask=mask[i].values.to_numpy(zero_copy_only=False),
                text=batch.column("text")[i].as_py() or "",
                meta=json.loads(meta) if meta else {},
            )


@dataclass
class Examples:
    """Examples in Arrow's list layout: example i is `tokens[offsets[i]:offsets[i+1]]`."""

    example_ids: np.ndarray  # object (str)
    kinds: np.ndarray  # object (str)
    offsets: np.ndarray  # int64, n + 1
    tokens: np.ndarray  # int32
    loss_weights: np.ndarray  # float32
    vision_mask: np.ndarray  # bool

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.example_ids)

    @property
    def splittable(self) -> np.ndarray:
        return splittable(self.kinds, flagged_per_list(self.vision_mask, self.offsets))

    @classmethod
    def from_arrays(
        cls,
        example_ids: Sequence[str],
        kinds: Sequence[str],
        tokens: Sequence[np.ndarray],
        loss_weights: Sequence[np.ndarray],
        vision_mask: Sequence[np.ndarray],
    ) -> Examples:
        lengths = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
        return cls(
            example_ids=np.asarray(list(example_ids), dtype=object),
            kinds=np.asarray(list(kinds), dtype=object),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            tokens=_concat(tokens, np.int32),
            loss_weights=_concat(loss_weights, np.float32),
            vision_mask=_concat(vision_mask, np.bool_),
        )

    def to_table(
        self, sources: Sequence[str] | str = "", texts: Sequence[str] | None = None, metas: Sequence[str] | None = None
    ) -> pa.Table:
        """EXAMPLE_SCHEMA rows; `sources` one per example or one for all, text and meta null if absent."""
        n = len(self)
        offsets = pa.array(self.offsets.astype(np.int32))
        sources = [sources] * n if isinstance(sources, str) else list(sources)
        columns = {
            "example_id": pa.array(self.example_ids.tolist(), pa.string()),
            "kind": pa.array(self.kinds.tolist(), pa.string()),
            "source": pa.array(sources, pa.string()),
            "num_tokens": pa.array(self.lengths.astype(np.int32)),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array(self.tokens, pa.int32())),
            "loss_weights": pa.ListArray.from_arrays(offsets, pa.array(self.loss_weights, pa.float32())),
            "vision_mask": pa.ListArray.from_arrays(offsets, pa.array(self.vision_mask, pa.bool_())),
            "text": pa.array(texts, pa.string()) if texts is not None else pa.nulls(n, pa.string()),
            "meta": pa.array(metas, pa.string()) if metas is not None else pa.nulls(n, pa.string()),
        }
        return pa.Table.from_arrays([columns[f.name] for f in EXAMPLE_SCHEMA], schema=EXAMPLE_SCHEMA)


def _concat(arrays: Sequence[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype) for a in arrays]) if len(arrays) else np.zeros(0, dtype)


def tokens_by_kind(kinds: Sequence[str], lengths: np.ndarray) -> dict[str, int]:
    """Total length per kind, for parallel sequences of kinds and lengths."""
    names, index = np.unique(np.asarray(kinds, dtype=str), return_inverse=True)
    sums = np.bincount(index, weights=np.asarray(lengths, np.float64), minlength=len(names))
    return {str(n): int(s) for n, s in zip(names, sums)}
