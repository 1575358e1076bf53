"""LWM JSONL datasets -> unpacked examples (EXAMPLE_SCHEMA), tokenized exactly as LWM's processors do.

    files --ReadLwmLines--> numbered lines (+ dead letters)                               [read]
    lines --Reshuffle--> ProcessLines --BatchElements--> ToTable --> EXAMPLE tables       [ImportLwm]

Line numbers are kept because LWM seeds the choice among list-valued field specs by the 0-based line
index within the file (see lwm_data.lwm_format.grammar). Blank lines are not records (LWM skips them too, but
they still advance its line index, and here as well).

Counts: `in` = non-blank lines (and unreadable files), `out` = examples written; dead-lettered:
record_too_large, unreadable_file, invalid_utf8, invalid_json, missing_field_spec, bad_field_spec,
missing_field, field_not_text, vision_not_int_list, vision_length, vision_code_range. Stats: tokens,
vision_tokens, loss_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import apache_beam as beam

from lwm_data.config import nested, setting
from lwm_data.errors import Rejection
from lwm_data.examples import Example, examples_to_table
from lwm_data.lwm_format.grammar import FIELDS_KEY
from lwm_data.lwm_format.importer import example_from_line
from lwm_data.lwm_format.processor import LwmProcessor, ProcessorConfig
from lwm_data.outputs import DeadLetterPolicy
from lwm_data.pipelines.common import (
    ERRORS,
    Counters,
    ReadFiles,
    StageOutput,
    TokenizerStep,
    merge_errors,
    route,
    run_stage,
)
from lwm_data.reading import DEFAULT_MAX_RECORD_BYTES, read_lines
from lwm_data.schemas import EXAMPLE_SCHEMA
from lwm_data.tokenizers import load_tokenizer, resolve_tokenizer

STAGE = "import-lwm"


@dataclass(frozen=True)
class ImportConfig:
    input: str = setting(help="Glob of LWM JSONL files (.gz/.zst too), any Beam filesystem.")
    output: str = setting(help="Output directory.")
    fields: tuple[str, ...] = setting(
        (), "Dataset-wide field spec; repeat for a list (one chosen per line). Default: each line's.", repeat=True
    )
    fields_key: str = setting(FIELDS_KEY, "Key of a line's own field spec.")
    tokenizer: str | None = setting(None, "SentencePiece .model or tokenizer dir (default: embedded).")
    seed: int = setting(0, "0 picks list-valued specs exactly as LWM does (by line number).")
    max_record_bytes: int = setting(DEFAULT_MAX_RECORD_BYTES, "Dead-letter lines larger than this.")
    batch_tokens: int = setting(4_000_000, "Examples are written in tables of about this many tokens.")
    processor: ProcessorConfig = nested(ProcessorConfig)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)

    @property
    def spec(self) -> str | tuple[str, ...] | None:
        if not self.fields:
            return None
        return self.fields[0] if len(self.fields) == 1 else self.fields


class LineReader:
    """Step: one file -> (path, 0-based line index, line) per non-blank line, each an input record."""

    def __init__(self, stage: str, max_record_bytes: int):
        self.count = Counters(stage)
        self.max_record_bytes = max_record_bytes

    def __call__(self, path: str) -> Iterable[tuple[str, int, bytes] | Rejection]:
        for item in read_lines(path, self.max_record_bytes):
            self.count("in")
            yield item if isinstance(item, Rejection) else (path, item[0] - 1, item[1])


def read_lwm_files(pattern: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, stage: str = STAGE) -> ReadFiles:
    """The import stage's input: numbered lines of the files matching a glob, and rejected ones."""
    return ReadFiles(pattern, stage, LineReader(stage, max_record_bytes), "LWM JSONL files")


class ProcessLines(TokenizerStep):
    """Step: one numbered line -> its Example, or why LWM's processors would refuse it."""

    def __init__(self, stage: str, config: ImportConfig, tokenizer: dict):
        super().__init__(tokenizer)
        self.count = Counters(stage)
        self.config = config

    def setup(self) -> None:
        super().setup()
        self.processor = LwmProcessor(self.tokenizer, self.config.processor)

    def __call__(self, numbered: tuple[str, int, bytes]) -> Iterable[Example | Rejection]:
        path, line_index, line = numbered
        config = self.config
        try:  # the full path as source: example ids stay unique across folders with same-named files
            example = example_from_line(
                line, path, line_index, self.processor, config.spec, config.fields_key, config.seed
            )
        except Rejection as rejection:
            yield rejection.at(path, f"line {line_index + 1}", line)
            return
        self.count("out")
        self.count("tokens", example.num_tokens)
        self.count("vision_tokens", int(example.vision_mask.sum()))
        self.count("loss_tokens", int((example.loss_weights > 0).sum()))
        yield example


class ImportLwm(beam.PTransform):
    """Numbered LWM JSONL lines -> EXAMPLE_SCHEMA tables."""

    def __init__(self, config: ImportConfig, tokenizer: dict, stage: str = STAGE):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.stage = stage
        LwmProcessor(resolve_tokenizer(tokenizer), config.processor)  # refuses its settings here, not on workers

    def expand(self, lines: beam.PCollection) -> StageOutput:
        processed = (
            lines
            | "SpreadLines" >> beam.Reshuffle()
            | "ProcessLines" >> route(self.stage, ProcessLines(self.stage, self.config, self.tokenizer))
        )
        tables = (
            processed.out
            | "Batch"
            >> beam.BatchElements(
                min_batch_size=1, max_batch_size=self.config.batch_tokens, element_size_fn=lambda e: e.num_tokens
            )
            | "ToTable" >> beam.Map(examples_to_table)
        )
        return StageOutput(tables, processed[ERRORS])


def run(config: ImportConfig, beam_args: list[str] | None = None) -> dict:
    """The stand-alone import job: ReadLwmLines | ImportLwm | write; returns its manifest."""
    tokenizer = load_tokenizer(config.tokenizer).entry

    def build(pipeline: beam.Pipeline) -> StageOutput:
        lines = pipeline | "ReadLines" >> read_lwm_files(config.input, config.max_record_bytes)
        examples = lines.records | "Import" >> ImportLwm(config, tokenizer)
        return StageOutput(examples.rows, merge_errors(lines.errors, examples.errors))

    return run_stage(STAGE, config, build, EXAMPLE_SCHEMA, beam_args, tokenizer)
