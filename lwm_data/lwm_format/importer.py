"""Import: one LWM JSONL line -> an Example, tokenized by LWM's processor (lwm_data.lwm_format.processor),
with the kind its fields make (`record_kind`) and a readable rendering.
"""

from __future__ import annotations

from collections.abc import Sequence

from lwm_data.errors import Rejection
from lwm_data.examples import Example
from lwm_data.lwm_format.grammar import FIELDS_KEY, choose_field_spec
from lwm_data.lwm_format.processor import LwmProcessor, record_kind, render_text
from lwm_data.reading import json_object


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
