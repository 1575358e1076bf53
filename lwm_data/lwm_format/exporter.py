"""Export: an example -> an LWM JSONL record that LWM's processor turns back into exactly its tokens.

`to_lwm_record` cuts an example into text fields (runs of one loss weight, rendered so that
re-tokenizing gives the same ids), `<|bos|>`/`<|eos|>` fields and vision fields, and checks the
result with `LwmProcessor` before it is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from lwm_data.errors import Rejection
from lwm_data.examples import Example
from lwm_data.lwm_format.grammar import BOS_FIELD, EOS_FIELD, FIELDS_KEY, FieldSpec, format_field_spec
from lwm_data.lwm_format.layout import VISION_END, VISION_START
from lwm_data.lwm_format.processor import LwmProcessor
from lwm_data.tokenizers import TextTokenizer


@dataclass(frozen=True)
class _Run:
    start: int
    end: int
    kind: str  # "text", "bos", "eos", "vision"
    weight: float


def to_lwm_record(example: Example, tokenizer: TextTokenizer, processor: LwmProcessor | None = None) -> dict[str, Any]:
    """An LWM JSONL record (`fields` + text keys `text_K` + vision keys `vision_K`) that LWM's
    processor turns back into exactly this example's tokens, loss weights and vision mask.

    Raises Rejection("not_representable") when no such record exists (no leading BOS with
    weight 0 or trailing EOS with weight 1, a malformed vision block, or text whose ids are not what
    the tokenizer gives for their own text).
    """
    processor = processor or LwmProcessor(tokenizer)
    tokens, weights, vision = example.tokens, example.loss_weights, example.vision_mask
    n, start = len(tokens), len(processor.bos)  # no BOS for a tokenizer that adds none
    if n < start + 1 or (start and (tokens[0] != tokenizer.bos_id or weights[0] != 0 or vision[0])):
        raise Rejection("not_representable", "LWM examples start with BOS of weight 0")
    if tokens[-1] != tokenizer.eos_id or weights[-1] != 1 or vision[-1]:
        raise Rejection("not_representable", "LWM examples end with EOS of weight 1")
    if not np.isin(weights, (0.0, 1.0)).all():
        raise Rejection("not_representable", "LWM loss weights are 0 or 1")
    text_ids = tokens[~np.asarray(vision, bool)]
    if text_ids.min() < 0 or text_ids.max() >= tokenizer.vocab_size:  # decode would raise
        raise Rejection("not_representable", "text ids outside the tokenizer's vocabulary")
    record: dict[str, Any] = {}
    fields: list[FieldSpec] = []
    for run in _runs(tokens[start:-1], weights[start:-1], vision[start:-1], tokenizer, processor, offset=start):
        piece = tokens[run.start : run.end]
        if run.kind in ("bos", "eos"):
            fields.append(FieldSpec(BOS_FIELD if run.kind == "bos" else EOS_FIELD, run.weight))
        elif run.kind == "vision":
            key = f"vision_{len(fields)}"
            record[key] = _vision_block_codes(piece, processor)
            fields.append(FieldSpec(key, run.weight))
        else:
            for text in _texts_of(piece, tokenizer):
                key = f"text_{len(fields)}"
                record[key] = text
                fields.append(FieldSpec(key, run.weight))
    record[FIELDS_KEY] = format_field_spec(fields)
    got = processor(record, record[FIELDS_KEY])
    if not all(np.array_equal(a, b) for a, b in zip(got, (tokens, weights, vision))):
        raise Rejection("not_representable", "re-tokenizing the exported text does not give the same ids")
    return record


def _runs(tokens, weights, vision, tokenizer, processor: LwmProcessor, offset: int) -> list[_Run]:
    """Cut the interior of an example into text runs of one weight, single BOS/EOS ids and vision
    blocks (`<vision>` ids, codes, `</vision>` ids), vectorized: examples can be 1M tokens long."""
    n = len(tokens)
    kinds = np.zeros(n, np.int8)  # 0 text, 1 bos, 2 eos, 3 vision block
    cuts = np.zeros(n + 1, bool)
    cuts[[0, n]] = True
    for start, end in _vision_blocks(tokens, vision, processor):
        kinds[start:end] = 3
        cuts[[start, end]] = True
    if tokenizer.bos_id is not None:
        kinds[(kinds == 0) & (tokens == tokenizer.bos_id)] = 1
    kinds[(kinds == 0) & (tokens == tokenizer.eos_id)] = 2
    special = (kinds == 1) | (kinds == 2)
    cuts[:-1] |= special
    cuts[1:] |= special
    cuts[1:-1] |= (kinds[1:] != kinds[:-1]) | (weights[1:] != weights[:-1])
    names = {0: "text", 1: "bos", 2: "eos", 3: "vision"}
    bounds = np.flatnonzero(cuts)
    runs = [
        _Run(int(a) + offset, int(b) + offset, names[int(kinds[a])], float(weights[a]))
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    for run in runs:
        if run.kind == "vision" and not _is_whole_block(run, tokens, offset, processor):
            raise Rejection("not_representable", f"vision block at {run.start} has mixed loss weights")
    return runs


def _is_whole_block(run: _Run, tokens: np.ndarray, offset: int, processor: LwmProcessor) -> bool:
    piece = tokens[run.start - offset : run.end - offset]
    head, tail = processor.vision_start, processor.vision_end
    return np.array_equal(piece[: len(head)], head) and np.array_equal(piece[len(piece) - len(tail) :], tail)


def _vision_blocks(tokens, vision, processor: LwmProcessor) -> list[tuple[int, int]]:
    """(start, end) of every `<vision> codes </vision>` block; vision ids elsewhere are an error."""
    head, tail = processor.vision_start, processor.vision_end
    edges = np.flatnonzero(np.diff(np.concatenate([[False], vision, [False]]).astype(np.int8)))
    blocks = []
    for first, last in zip(edges[::2], edges[1::2]):
        start, end = first - len(head), last + len(tail)
        if start < 0 or not np.array_equal(tokens[start:first], head) or vision[start:first].any():
            raise Rejection("not_representable", f"vision ids at {first} not preceded by {VISION_START}")
        if not np.array_equal(tokens[last:end], tail) or vision[last:end].any():
            raise Rejection("not_representable", f"vision ids ending at {last} not followed by {VISION_END}")
        blocks.append((int(start), int(end)))
    return blocks


def _vision_block_codes(block: np.ndarray, processor: LwmProcessor) -> list[int]:
    codes = block[len(processor.vision_start) : len(block) - len(processor.vision_end)]
    per_frame = processor.config.n_tokens_per_frame + 1
    if len(codes) % per_frame:
        raise Rejection("not_representable", "a vision block that is not whole frames")
    frames = codes.reshape(-1, per_frame)
    expected_ends = np.full(len(frames), processor.config.eof_token)
    expected_ends[-1] = processor.config.eov_token
    if not np.array_equal(frames[:, -1], expected_ends):
        raise Rejection("not_representable", "frames must end with end-of-frame, the last with end-of-vision")
    return frames[:, :-1].reshape(-1).tolist()


def _texts_of(ids: np.ndarray, tokenizer) -> list[str]:
    """Texts that, each tokenized on its own, give `ids` in order: one text when one does (the rule),
    else the run is cut at a word start near its middle and each half treated alike. Cuts are needed
    where a run joins pieces that were tokenized apart, e.g. a field of spaces before a word."""
    text = _text_of(ids, tokenizer)
    if tokenizer.encode(text) == ids.tolist():
        return [text]
    starts, spaces = _word_starts(tokenizer)
    word_start = starts[ids]
    # a lone space before a word ends the text before it (a field ending in a space), not the next one
    trailing_space = spaces[ids[:-1]] & word_start[1:]
    cuts = np.flatnonzero(word_start[1:] & ~np.r_[trailing_space[1:], False]) + 1
    if not len(cuts):
        raise Rejection("not_representable", f"no text tokenizes to ids {ids[:20].tolist()}...")
    cut = int(cuts[np.argmin(np.abs(cuts - len(ids) // 2))])
    return _texts_of(ids[:cut], tokenizer) + _texts_of(ids[cut:], tokenizer)


@lru_cache(maxsize=4)
def _word_starts(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """For every id: whether its piece starts with a space (where a separately tokenized text may
    begin), and whether it is a lone space."""
    probe = tokenizer.encode("a")
    skip = len(tokenizer.decode(probe))
    pieces = [tokenizer.decode(probe + [i])[skip:] for i in range(tokenizer.vocab_size)]
    return np.array([p.startswith(" ") for p in pieces]), np.array([p == " " for p in pieces])


def _text_of(ids: np.ndarray, tokenizer) -> str:
    """The text whose encoding is `ids`: the pieces' own text, less the one leading space that the
    tokenizer's dummy prefix puts back. Decoding after a probe token keeps a leading space or newline
    that `decode` alone would drop."""
    probe = tokenizer.encode("a")
    raw = tokenizer.decode(list(probe) + ids.tolist())
    text = raw[len(tokenizer.decode(probe)) :]
    return text[1:] if text.startswith(" ") else text
