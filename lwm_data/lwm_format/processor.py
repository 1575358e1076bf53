"""LWM's processors: a JSONL record under a field spec (lwm_data.lwm_format.grammar) -> token ids, loss
weights and vision mask, token for token as LWM's TextProcessor/VisionTextProcessor make them.

The example starts with BOS (weight 0; nothing for a tokenizer that adds no BOS, as LWM's code,
which asks its tokenizer for `bos_token_id`, cannot show) and ends with EOS (weight 1); `prepend_text` goes before the
first field's text when the first field is text. A vision field becomes `<vision>`, then per frame
its codes and <eof> (the last frame: <eov>), then `</vision>` (lwm_data.lwm_format.layout); every
token of the block takes the field's weight, vision_mask is true on the codes and their <eof>/<eov>.
The tokenizer keeps its original behaviour (no BOS added by `encode`). Bad records raise a
`Rejection` with a short reason instead of LWM's asserts, so a job can dead-letter them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lwm_data.config import setting
from lwm_data.errors import Rejection
from lwm_data.examples import CHAT, IMAGE_TEXT, TEXT, VIDEO_TEXT
from lwm_data.lwm_format.grammar import BOS_FIELD, EOS_FIELD, FieldSpec, parse_field_spec
from lwm_data.lwm_format.layout import (
    CODEBOOK_SIZE,
    END_OF_FRAME,
    END_OF_VISION,
    TOKENS_PER_FRAME,
    VISION_END,
    VISION_START,
)
from lwm_data.reading import is_unicode
from lwm_data.tokenizers import TextTokenizer, bos_prefix, require_eos


@dataclass(frozen=True)
class ProcessorConfig:
    """LWM's processor settings (its `vision_text_processor` config keys, same defaults)."""

    subfield_separator: str = setting(" ", "LWM's subfield_separator: joins the keys of an `a+b` field.")
    prepend_text: str = setting("", "LWM's prepend_text, put before the first text field.")
    add_bos_token: bool = setting(True, "Start every example with BOS (weight 0).")
    add_eos_token: bool = setting(True, "End every example with EOS (weight 1).")
    n_tokens_per_frame: int = setting(TOKENS_PER_FRAME, "Vision codes per frame.")
    max_n_frames: int = setting(
        -1, "LWM's max_n_frames: keep this many frames, uniformly (-1: all).", flags=("--max-frames",)
    )
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
        self.bos = bos_prefix(tokenizer)
        self.eos = [require_eos(tokenizer, "LWM's add_eos_token")] if config.add_eos_token else None
        self.vision_start = np.asarray(tokenizer.encode(VISION_START), np.int32)
        self.vision_end = np.asarray(tokenizer.encode(VISION_END), np.int32)

    def __call__(self, record: dict[str, Any], spec: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens int32, loss_weights float32, vision_mask bool) for one record under one spec."""
        out = _Buffers()
        if self.config.add_bos_token:
            out.add(self.bos, 0.0)
        for i, spec_field in enumerate(parse_field_spec(spec)):
            if spec_field.name == BOS_FIELD:
                out.add(self.bos, spec_field.loss_weight)
            elif spec_field.name == EOS_FIELD:
                out.add([self._eos_field()], spec_field.loss_weight)
            elif spec_field.vision:
                self._add_vision(out, self.vision_codes(record, spec_field.name), spec_field.loss_weight)
            else:
                text = self.field_text(record, spec_field)
                if i == 0:
                    text = self.config.prepend_text + text
                out.add(self.tokenizer.encode(text), spec_field.loss_weight)
        if self.eos is not None:
            out.add(self.eos, 1.0)
        return out.arrays()

    def _eos_field(self) -> int:
        if self.tokenizer.eos_id is None:
            raise Rejection("no_eos_token", "the field spec asks for EOS; the tokenizer names none")
        return self.tokenizer.eos_id

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
        if codes is None or codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
            raise Rejection("vision_code_range", f"codes must lie in [0, {CODEBOOK_SIZE})")
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
