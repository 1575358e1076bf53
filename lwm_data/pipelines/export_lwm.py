"""Unpacked examples (any EXAMPLE_SCHEMA stage) -> one LWM JSONL file for LWM's own JAX loaders.

Plain Python, one pass over the input's shards: each example becomes a record that LWM's processor
turns back into exactly its tokens, loss weights and vision mask (lwm_data.lwm_format.exporter.to_lwm_record,
checked before it is written). An example no record can reproduce is not written; its dead letter
goes to `<output>.errors.jsonl`.
"""

from __future__ import annotations

import json

import pyarrow as pa

from lwm_data import files, outputs
from lwm_data.errors import Rejection
from lwm_data.examples import examples_from_table
from lwm_data.lwm_format.exporter import to_lwm_record
from lwm_data.lwm_format.processor import LwmProcessor
from lwm_data.outputs import Counts
from lwm_data.pipelines.pack import example_shards
from lwm_data.tokenizers import resolve_tokenizer

STAGE = "export-lwm"
ERRORS_SUFFIX = ".errors.jsonl"


def export(input_dir: str, output: str, tokenizer_path: str | None = None) -> Counts:
    """Write a stage's examples as LWM JSONL at `output` (one record per example, with its `id`).

    The tokenizer is the one the input's manifest names (`tokenizer_path`: a copy of it).
    """
    example_shards([input_dir])  # refuses an output that holds no examples, saying what to do
    tokenizer = resolve_tokenizer(outputs.read_manifest(input_dir).get("tokenizer"), tokenizer_path)
    processor = LwmProcessor(tokenizer)
    counts = Counts()
    with files.create(output) as out, files.create(output + ERRORS_SUFFIX) as errors:
        for batch in outputs.iter_batches(input_dir, batch_size=64):
            for example in examples_from_table(pa.Table.from_batches([batch])):
                counts.input += 1
                try:
                    record = {"id": example.example_id, **to_lwm_record(example, tokenizer, processor)}
                except Rejection as rejection:
                    counts.dead_lettered[rejection.reason] = counts.dead_lettered.get(rejection.reason, 0) + 1
                    letter = rejection.at(input_dir, example.example_id).dead_letter(STAGE)
                    errors.write(letter.to_json().encode() + b"\n")
                    continue
                out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
                counts.output += 1
    return counts
