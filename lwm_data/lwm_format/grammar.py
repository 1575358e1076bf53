"""LWM's JSONL field-spec grammar (docs/lwm-format.md).

A line is a JSON object; a field spec (the line's `fields` key, or one spec for the whole file) is a
comma-separated list turned into tokens left to right by LWM's processor (lwm_data.lwm_format.processor):

    name          the text of key `name`, tokenized on its own, loss weight 1
    a+b           the texts of keys a and b joined by the separator (one space), tokenized as one string
    [field]       the same with loss weight 0 (a prompt)
    <|bos|>       id BOS;  <|eos|>: id EOS
    *vision*      a key whose name contains "vision": a flat list of VQ codes, n_frames x 256

A list of specs is resolved per line the way LWM does it, `random.Random(line_index).choice(specs)`
(0-based line index); a nonzero `seed` moves every line to another stream,
`random.Random(seed * 2**32 + line_index)`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lwm_data.errors import Rejection

BOS_FIELD, EOS_FIELD = "<|bos|>", "<|eos|>"
FIELDS_KEY = "fields"


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
