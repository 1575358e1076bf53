"""LWM JSONL datasets -> unpacked examples (EXAMPLE_SCHEMA), tokenized exactly as LWM's processors
do; and back: `export` writes any stage's examples as LWM JSONL.

    files --MatchFiles--> paths --ReadLines (numbered)--> lines --Reshuffle--> ProcessLines
          --BatchElements--> ToTable --> Parquet shards

Line numbers are kept because LWM seeds the choice among list-valued field specs by the 0-based line
index within the file (see lwm_data.lwm_format). Blank lines are not records (LWM skips them too, but
they still advance its line index, and here as well).

Counts: `in` = non-blank lines, `out` = examples written; dead-lettered: record_too_large,
invalid_utf8, invalid_json, missing_field_spec, bad_field_spec, missing_field, field_not_text,
vision_not_int_list, vision_length, vision_code_range, unreadable_file. Stats: tokens,
vision_tokens, loss_tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable

import apache_beam as beam
import pyarrow as pa
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from lwm_data import io
from lwm_data.books import DEFAULT_MAX_RECORD_BYTES, iter_lines
from lwm_data.io import Counts, DeadLetter
from lwm_data.lwm_format import (
    FIELDS_KEY,
    LwmFormatError,
    LwmProcessor,
    ProcessorConfig,
    example_from_line,
    examples_from_table,
    examples_to_table,
    to_lwm_record,
)
from lwm_data.pipelines.common import (
    ERRORS,
    StageOutputs,
    count,
    dead_letter,
    run_stage,
)
from lwm_data.schemas import EXAMPLE_SCHEMA
from lwm_data.tokenizers import load_tokenizer

STAGE = "import-lwm"
EXPORT_ERRORS_SUFFIX = ".errors.jsonl"


@dataclass(frozen=True)
class ImportConfig:
    input: str
    output: str
    fields: tuple[str, ...] = ()  # dataset-wide spec(s); empty: each line's `fields_key`
    fields_key: str = FIELDS_KEY
    tokenizer: str | None = None
    seed: int = 0
    prepend_text: str = ""
    max_frames: int = -1
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    batch_tokens: int = 4_000_000

    @property
    def spec(self) -> str | tuple[str, ...] | None:
        if not self.fields:
            return None
        return self.fields[0] if len(self.fields) == 1 else self.fields


class ReadLines(beam.DoFn):
    def __init__(self, max_record_bytes: int):
        self.max_record_bytes = max_record_bytes

    def process(self, path: str) -> Iterable:
        try:
            with FileSystems.open(path) as f:
                for line_number, line in iter_lines(f, self.max_record_bytes):
                    if line is None:
                        count("in")
                        yield dead_letter(
                            STAGE,
                            "record_too_large",
                            path,
                            f"line {line_number}",
                            f"over {self.max_record_bytes} bytes",
                        )
                    elif line.strip():
                        count("in")
                        yield path, line_number - 1, line
        except OSError as e:
            count("in")
            yield dead_letter(STAGE, "unreadable_file", path, "", f"{type(e).__name__}: {e}")


class ProcessLines(beam.DoFn):
    def __init__(self, config: ImportConfig):
        self.config = config

    def setup(self) -> None:
        processor_config = ProcessorConfig(prepend_text=self.config.prepend_text, max_n_frames=self.config.max_frames)
        self.processor = LwmProcessor(load_tokenizer(self.config.tokenizer), processor_config)

    def process(self, numbered: tuple[str, int, bytes]) -> Iterable:
        path, line_index, line = numbered
        try:
            example = example_from_line(
                line,
                path,  # the full path: example ids stay unique across folders with same-named files
                line_index,
                self.processor,
                self.config.spec,
                self.config.fields_key,
                self.config.seed,
            )
        except LwmFormatError as e:
            yield dead_letter(
                STAGE, e.reason, path, f"line {line_index + 1}", e.detail, line[:1000].decode("utf-8", "replace")
            )
            return
        count("out")
        count("tokens", example.num_tokens)
        count("vision_tokens", int(example.vision_mask.sum()))
        count("loss_tokens", int((example.loss_weights > 0).sum()))
        yield example


def build(pipeline: beam.Pipeline, config: ImportConfig) -> StageOutputs:
    lines = (
        pipeline
        | "Match" >> fileio.MatchFiles(config.input)
        | "Paths" >> beam.Map(lambda m: m.path)
        | "ReadLines" >> beam.ParDo(ReadLines(config.max_record_bytes)).with_outputs(ERRORS, main="lines")
    )
    processed = (
        lines.lines
        | "SpreadLines" >> beam.Reshuffle()
        | "ProcessLines" >> beam.ParDo(ProcessLines(config)).with_outputs(ERRORS, main="examples")
    )
    tables = (
        processed.examples
        | "Batch"
        >> beam.BatchElements(
            min_batch_size=1, max_batch_size=config.batch_tokens, element_size_fn=lambda e: e.num_tokens
        )
        | "ToTable" >> beam.Map(examples_to_table)
    )
    return StageOutputs(tables, [lines[ERRORS], processed[ERRORS]])


def run(config: ImportConfig, beam_args: list[str] | None = None) -> dict:
    """Run the import job; returns its manifest."""
    tokenizer = load_tokenizer(config.tokenizer)
    return run_stage(
        STAGE, config.output, EXAMPLE_SCHEMA, lambda p: build(p, config), asdict(config), beam_args, tokenizer
    )


# ---- export (plain Python: one pass over a stage's shards) ----


def export(input_dir: str, output: str, tokenizer_path: str | None = None) -> Counts:
    """Write a stage's examples as LWM JSONL at `output` (one record per example, with its `id`).

    The tokenizer defaults to the one in the input's manifest. An example that no LWM record can
    reproduce exactly is not written; it goes to `<output>.errors.jsonl` with its reason.
    """
    if tokenizer_path is None:
        tokenizer_path = (io.read_manifest(input_dir).get("tokenizer") or {}).get("path")
    tokenizer = load_tokenizer(tokenizer_path)
    processor = LwmProcessor(tokenizer)
    counts = Counts()
    with FileSystems.create(output) as out, FileSystems.create(output + EXPORT_ERRORS_SUFFIX) as errors:
        for batch in io.iter_batches(input_dir, batch_size=64):
            for example in examples_from_table(pa.Table.from_batches([batch])):
                counts.input += 1
                try:
                    record = {"id": example.example_id, **to_lwm_record(example, tokenizer, processor)}
                except LwmFormatError as e:
                    counts.dead_lettered[e.reason] = counts.dead_lettered.get(e.reason, 0) + 1
                    errors.write(
                        DeadLetter("export-lwm", e.reason, input_dir, example.example_id, e.detail).to_json().encode()
                        + b"\n"
                    )
                    continue
                out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
                counts.output += 1
    return counts
