"""LWM's JSONL dataset format: its field-spec grammar, its processors, and export to it.

A line is a JSON object; a field spec (the line's `fields` key, or one spec for the whole file) is a
comma-separated list turned into tokens left to right (see docs/lwm-format.md):

    name          the text of key `name`, tokenized on its own, loss weight 1
    a+b           the texts of keys a and b joined by the separator (one space), tokenized as one string
    [field]       the same with loss weight 0 (a prompt)
    <|bos|>       id BOS;  <|eos|>: id EOS
    *vision*      a key whose name contains "vision": a flat list of VQ codes, n_frames x 256, turned
                  into `<vision>` frame codes + 8192 (end of frame) ... + 8193 (end of vision) `</vision>`;
                  every token of the block takes the field's weight, vision_mask is true on the codes
                  and their 8192/8193

The example starts with BOS (weight 0) and ends with EOS (weight 1); `prepend_text` goes before the
first field's text when the first field is text. A list of specs is resolved per line the way LWM
does it, `random.Random(line_index).choice(specs)` (0-based line index); a nonzero `seed` moves every
line to another stream, `random.Random(seed * 2**32 + line_index)`.

`LwmProcessor` reproduces LWM's TextProcessor/VisionTextProcessor token for token, with the
tokenizer's original behaviour (no BOS added by `encode`). Bad records raise a `Rejection` with a
short reason instead of LWM's asserts, so a job can dead-letter them.

Export goes the other way: `to_lwm_record` cuts an example into text fields (runs of one loss weight,
rendered so that re-tokenizing gives the same ids), `<|bos|>`/`<|eos|>` fields and vision fields,
and checks the result with `LwmProcessor` before it is written.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np

from lwm_data.config import setting
from lwm_data.errors import Rejection
from lwm_data.examples import CHAT, IMAGE_TEXT, TEXT, VIDEO_TEXT, Example
from lwm_data.reading import is_unicode, json_object
from lwm_data.tokenizers import TextTokenizer

BOS_FIELD, EOS_FIELD = "<|bos|>", "<|eos|>"
VISION_START, VISION_END = "<vision>", "</vision>"
END_OF_FRAME, END_OF_VISION = 8192, 8193
TOKENS_PER_FRAME = 256
VISION_CODEBOOK = 8192
FIELDS_KEY = "fields"


# ---- the field-spec grammar ----


@dataclass(frozen=True)
class FieldSpec:
    """One comma-separated item of a field spec."""

    name: str  # without brackets: "a+b", "vision", "<|bos|>"
    loss_weight: float  # 0.0 for [bracketed] fields

    @property
    def special(self) -> bool:
        return self.name in (BOS_FIELD, EOS_FIELD)

    @property
    def vision(self) -> bool:
        return not self.special and "vision" in self.name

    @property
    def keys(self) -> list[str]:
        return self.name.split("+")

    def __str__(self) -> str:
        return f"[{self.name}]" if self.loss_weight == 0.0 else self.name


def parse_field_spec(spec: str) -> list[FieldSpec]:
    """`"[question],vision,answer"` -> FieldSpecs, exactly as LWM splits it (no whitespace trimming)."""
    if not isinstance(spec, str) or not spec:
        raise Rejection("bad_field_spec", f"expected a non-empty string, got {spec!r}")
    fields = []
    for item in spec.split(","):
        if item.startswith("[") and item.endswith("]"):
            fields.append(FieldSpec(item[1:-1], 0.0))
        else:
            fields.append(FieldSpec(item, 1.0))
    return fields


def format_field_spec(fields: Iterable[FieldSpec]) -> str:
    return ",".join(str(f) for f in fields)


def choose_field_spec(spec: str | Sequence[str], line_index: int, seed: int = 0) -> str:
    """A line's spec: itself, or for a list the choice LWM makes for that (0-based) line."""
    if isinstance(spec, str):
        return spec
    if not isinstance(spec, (list, tuple)) or not spec or not all(isinstance(s, str) for s in spec):
        raise Rejection("bad_field_spec", f"expected a string or a list of strings, got {spec!r}")
    return random.Random(seed * 2**32 + line_index).choice(list(spec))


# ---- LWM's processors ----


@dataclass(frozen=True)
class ProcessorConfig:
    """LWM's processor settings (its `vision_text_processor` config keys, same defaults)."""

    subfield_separator: str = setting(" ", "LWM's subfield_separator: joins the keys of an `a+b` field.")
    prepend_text: str = setting("", "LWM's prepend_text, put before the first text field.")
    add_bos_token: bool = setting(True, "Start every example with BOS (weight 0).")
    add_eos_token: bool = setting(True, "End every example with EOS (weight 1).")
    n_tokens_per_frame: int = setting(TOKENS_PER_FRAME, "Vision codes per frame.")
    max_n_frames: int = setting(-1, "LWM's max_n_frames: keep this many frames, uniformly (-1: all).", flags=("--max-frames",))
    eof_token: int = setting(END_OF_FRAME, "Vision id after every frame but the last.")
    eov_token: int = setting(END_OF_VISION, "Vision id after the last frame.")


class _Buffers:
    def __init__(self):
        self.tokens: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.vision: list[np.ndarray] = []

    def add(self, ids: Sequence[int] | np.ndarray, weight: float, vision: bool | np.ndarray = False) -> None:
        ids = np.asarray(ids, dtype=np.int32)
        self.tokens.append(ids)
        self.weights.append(np.full(len(ids), weight, np.float32))
        self.vision.append(np.broadcast_to(np.asarray(vision, bool), ids.shape))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.concatenate(self.tokens), np.concatenate(self.weights), np.concatenate(self.vision)


class LwmProcessor:
    """LWM's VisionTextProcessor (which gives the same result as its TextProcessor on text fields)."""

    def __init__(self, tokenizer: TextTokenizer, config: ProcessorConfig = ProcessorConfig()):
        self.tokenizer = tokenizer
        self.config = config
        self.vision_start = np.asarray(tokenizer.encode(VISION_START), np.int32)
        self.vision_end = np.asarray(tokenizer.encode(VISION_END), np.int32)

    def __call__(self, record: dict[str, Any], spec: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens int32, loss_weights float32, vision_mask bool) for one record under one spec."""
        out = _Buffers()
        if self.config.add_bos_token:
            out.add([self.tokenizer.bos_id], 0.0)
        for i, spec_field in enumerate(parse_field_spec(spec)):
            if spec_field.name == BOS_FIELD:
                out.add([self.tokenizer.bos_id], spec_field.loss_weight)
            elif spec_field.name == EOS_FIELD:
                out.add([self.tokenizer.eos_id], spec_field.loss_weight)
            elif spec_field.vision:
                self._add_vision(out, self.vision_codes(record, spec_field.name), spec_field.loss_weight)
            else:
                text = self.field_text(record, spec_field)
                if i == 0:
                    text = self.config.prepend_text + text
                out.add(self.tokenizer.encode(text), spec_field.loss_weight)
        if self.config.add_eos_token:
            out.add([self.tokenizer.eos_id], 1.0)
        return out.arrays()

    def field_text(self, record: dict[str, Any], spec_field: FieldSpec) -> str:
        parts = []
        for key in spec_field.keys:
            if key not in record:
                raise Rejection("missing_field", f"no key {key!r} (field {spec_field})")
            if not isinstance(record[key], str):
                raise Rejection("field_not_text", f"key {key!r} holds {type(record[key]).__name__}")
            if not record[key].isascii() and not is_unicode(record[key]):
                # JSON may escape a lone surrogate (\ud800), which no tokenizer accepts
                raise Rejection("invalid_utf8", f"key {key!r} holds a lone surrogate")
            parts.append(record[key])
        return self.config.subfield_separator.join(parts)

    def vision_codes(self, record: dict[str, Any], key: str) -> np.ndarray:
        """The key's codes as (frames, n_tokens_per_frame), frames subsampled as LWM does."""
        if key not in record:
            raise Rejection("missing_field", f"no vision key {key!r}")
        value = record[key]
        if isinstance(value, np.ndarray) and value.dtype.kind in "iu":  # codes made in-process (lwm_data.vision)
            value = value.reshape(-1)
        elif not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
            raise Rejection("vision_not_int_list", f"key {key!r} must hold a flat list of ints")
        per_frame = self.config.n_tokens_per_frame
        if len(value) == 0 or len(value) % per_frame:
            raise Rejection("vision_length", f"{len(value)} codes is not a positive multiple of {per_frame}")
        try:
            codes = np.asarray(value, dtype=np.int64).reshape(-1, per_frame)
        except OverflowError:  # an int beyond int64
            codes = None
        if codes is None or codes.min() < 0 or codes.max() >= VISION_CODEBOOK:
            raise Rejection("vision_code_range", f"codes must lie in [0, {VISION_CODEBOOK})")
        max_frames = self.config.max_n_frames
        if 0 < max_frames < len(codes):
            codes = codes[np.linspace(0, len(codes) - 1, max_frames).astype(int)]
        return codes.astype(np.int32)

    def _add_vision(self, out: _Buffers, frames: np.ndarray, weight: float) -> None:
        ends = np.full((len(frames), 1), self.config.eof_token, np.int32)
        ends[-1] = self.config.eov_token
        out.add(self.vision_start, weight)
        out.add(np.concatenate([frames, ends], axis=1).reshape(-1), weight, True)
        out.add(self.vision_end, weight)


def record_kind(record: dict[str, Any], spec: str, processor: LwmProcessor) -> str:
    """`image_text` (every vision field one frame), `video_text`, `chat` (text with a prompt field,
    such as `[question],answer`) or `text` (plain text, which packing may split)."""
    fields = parse_field_spec(spec)
    frames = [len(processor.vision_codes(record, f.name)) for f in fields if f.vision]
    if frames:
        return IMAGE_TEXT if max(frames) == 1 else VIDEO_TEXT
    has_prompt = any(f.loss_weight == 0.0 for f in fields if not f.special)
    return CHAT if has_prompt else TEXT


def render_text(record: dict[str, Any], spec: str, processor: LwmProcessor) -> str:
    """A readable rendering of what a record tokenizes to, for the `text` column."""
    parts = ["<s>"]
    for i, spec_field in enumerate(parse_field_spec(spec)):
        if spec_field.special:
            parts.append("<s>" if spec_field.name == BOS_FIELD else "</s>")
        elif spec_field.vision:
            frames = len(record[spec_field.name]) // processor.config.n_tokens_per_frame
            parts.append(f"{VISION_START}[{frames} frames]{VISION_END}")
        else:
            text = processor.field_text(record, spec_field)
            parts.append((processor.config.prepend_text if i == 0 else "") + text)
    return " ".join(parts) + " </s>"


# ---- export: Example -> LWM record ----


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
    n = len(tokens)
    if n < 2 or tokens[0] != tokenizer.bos_id or weights[0] != 0 or vision[0]:
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
    for run in _runs(tokens[1:-1], weights[1:-1], vision[1:-1], tokenizer, processor, offset=1):
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


# ---- import: LWM JSONL line -> Example ----


def example_from_line(
    line: bytes | str,
    source: str,
    line_index: int,
    processor: LwmProcessor,
    fields: str | Sequence[str] | None = None,
    fields_key: str = FIELDS_KEY,
    seed: int = 0,
) -> Example:
    """One LWM JSONL line (0-based `line_index`, which seeds list-valued specs) as an Example; raises
    a Rejection for a line LWM's processors would refuse.

    `fields` is the dataset-wide spec; without it each line's `fields_key` holds its own.
    """
    record = json_object(line)
    if fields is None and fields_key not in record:
        raise Rejection("missing_field_spec", f"no {fields_key!r} key and no dataset-wide field spec")
    spec = choose_field_spec(fields if fields is not None else record[fields_key], line_index, seed)
    tokens, weights, vision = processor(record, spec)
    return Example(
        example_id=f"{source}#L{line_index + 1}",
        kind=record_kind(record, spec, processor),
        source=source,
        tokens=tokens,
        loss_weights=weights,
        vision_mask=vision,
        text=render_text(record, spec, processor),
        meta={"line": line_index + 1, "fields": spec},
    )
