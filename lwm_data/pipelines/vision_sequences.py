"""`lwm-data vision-sequences`: frame-level codes -> vision examples (EXAMPLE_SCHEMA), in any template or
direction, without re-encoding; and the `Sequences` transform every vision stage ends with.

    CodedItems --BuildSequences--> Examples --BatchElements--> EXAMPLE tables       [Sequences]

Counts (`in` = coded items): `out` = items turned into examples; dead-lettered: bad_conversation
(and what lwm_data.vision.sequences refuses). Stats: examples, tokens, vision_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa

from lwm_data import outputs
from lwm_data.config import nested, setting
from lwm_data.errors import Rejection
from lwm_data.examples import Example, examples_to_table
from lwm_data.lwm_format.processor import LwmProcessor
from lwm_data.outputs import DeadLetterPolicy
from lwm_data.pipelines.common import ERRORS, Counters, Job, ReadStage, StageOutput, TokenizerStep, route
from lwm_data.schemas import EXAMPLE_SCHEMA
from lwm_data.tokenizers import load_tokenizer, resolve_tokenizer
from lwm_data.vision.sequences import CodedItem, SequenceSettings, vision_examples

STAGE = "vision-sequences"


@dataclass(frozen=True)
class SequencesConfig:
    input: str = setting(help="Output directory of `lwm-data vision-codes` (or a --keep-codes directory).")
    output: str = setting(help="Output directory (EXAMPLE_SCHEMA).")
    tokenizer: str | None = setting(None, "SentencePiece .model or tokenizer dir (default: embedded).")
    batch_tokens: int = setting(4_000_000, "Examples are written in tables of about this many tokens.")
    sequences: SequenceSettings = nested(SequenceSettings)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)


class BuildSequences(TokenizerStep):
    """Step: a CodedItem -> its examples (one item counted `out`)."""

    def __init__(self, stage: str, settings: SequenceSettings, tokenizer: dict):
        super().__init__(tokenizer)
        self.count = Counters(stage)
        self.settings = settings

    def setup(self) -> None:
        super().setup()
        self.processor = LwmProcessor(self.tokenizer)

    def __call__(self, item: CodedItem) -> Iterable[Example | Rejection]:
        try:
            examples = vision_examples(item, self.processor, self.settings)
        except Rejection as rejection:
            yield rejection.at(item.source, item.item_id)
            return
        self.count("out")
        for example in examples:
            self.count("examples")
            self.count("tokens", example.num_tokens)
            self.count("vision_tokens", int(example.vision_mask.sum()))
            yield example


class Sequences(beam.PTransform):
    """CodedItems -> EXAMPLE_SCHEMA tables (+ dead letters)."""

    def __init__(self, settings: SequenceSettings, tokenizer: dict, batch_tokens: int, stage: str):
        super().__init__()
        self.settings = settings
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.stage = stage
        LwmProcessor(resolve_tokenizer(tokenizer))  # refuses a tokenizer without EOS here, not on workers

    def expand(self, coded: beam.PCollection) -> StageOutput:
        built = coded | "BuildSequences" >> route(self.stage, BuildSequences(self.stage, self.settings, self.tokenizer))
        tables = (
            built.out
            | "Batch"
            >> beam.BatchElements(
                min_batch_size=1, max_batch_size=self.batch_tokens, element_size_fn=lambda e: e.num_tokens
            )
            | "ToTable" >> beam.Map(examples_to_table)
        )
        return StageOutput(tables, built[ERRORS])


def run(config: SequencesConfig, beam_args: list[str] | None = None) -> dict:
    """The `vision-sequences` job: codes | Sequences | write; `in` = coded items."""
    tokenizer = load_tokenizer(config.tokenizer).entry
    from lwm_data.pipelines import vision_codes  # not at the top: it imports media, which imports this module

    vqgan = outputs.read_manifest(config.input, (vision_codes.STAGE,), STAGE).get("vqgan")
    count = Counters(STAGE)

    def rows(table: pa.Table) -> Iterable[CodedItem]:
        for row in table.to_pylist():
            count("in")
            yield CodedItem.from_row(row)

    job = Job(beam_args)
    coded = job.pipeline | "ReadCodes" >> ReadStage(config.input) | "Items" >> beam.FlatMap(rows)
    examples = coded | "Sequences" >> Sequences(config.sequences, tokenizer, config.batch_tokens, STAGE)
    job.write(STAGE, config, examples, EXAMPLE_SCHEMA, tokenizer, summary=lambda manifest: {"vqgan": vqgan})
    (manifest,) = job.run()
    return manifest
