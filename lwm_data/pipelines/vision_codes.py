"""`lwm-data vision-codes`: images and videos -> frame-level VQ-GAN codes (CODES_SCHEMA), to assemble
sequences from later (lwm_data.pipelines.vision_sequences) in any template, without re-encoding.

    media --(the media chain: lwm_data.pipelines.media)--> CodedItems --BatchElements--> CODES tables

Counts are the media chain's (`out` = items coded).
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa

from lwm_data.config import nested, setting
from lwm_data.outputs import DeadLetterPolicy
from lwm_data.pipelines.common import Counters, StageOutput
from lwm_data.pipelines.media import FrameSampling, encode_media, vqgan_section
from lwm_data.schemas import CODES_SCHEMA
from lwm_data.tokenizers.vision import VQGANSettings
from lwm_data.vision.media import MediaSettings
from lwm_data.vision.sequences import CodedItem

STAGE = "vision-codes"


@dataclass(frozen=True)
class VisionCodesConfig:
    output: str = setting(help="Output directory (CODES_SCHEMA).")
    media: MediaSettings = nested(MediaSettings)
    frames: FrameSampling = nested(FrameSampling)
    vqgan: VQGANSettings = nested(VQGANSettings)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)


class CodesTables(beam.PTransform):
    """CodedItems -> CODES_SCHEMA tables, each item counted `out` of `stage`."""

    def __init__(self, stage: str = STAGE):
        super().__init__()
        self.stage = stage

    def expand(self, coded: beam.PCollection) -> beam.PCollection:
        count = Counters(self.stage)

        def counted(item: CodedItem) -> dict:
            count("out")
            return item.to_row()

        return (
            coded
            | "ToRow" >> beam.Map(counted)
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=256)
            | "ToTable" >> beam.Map(lambda rows: pa.Table.from_pylist(rows, schema=CODES_SCHEMA))
        )


def run(config: VisionCodesConfig, beam_args: list[str] | None = None) -> dict:
    """The `vision-codes` job: the media chain | CodesTables | write."""
    encoded = encode_media(config.media, config.frames, config.vqgan, STAGE, beam_args)
    codes = StageOutput(encoded.coded | "Codes" >> CodesTables(), encoded.errors)
    encoded.job.write(STAGE, config, codes, CODES_SCHEMA, summary=vqgan_section(encoded.vqgan))
    (manifest,) = encoded.job.run()
    return manifest
