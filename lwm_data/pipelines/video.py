"""`lwm-data video`: videos (and images) -> VQ-GAN codes -> examples in LWM's vision layout (EXAMPLE_SCHEMA),
captioned or as LLaVA conversations; with `--keep-codes`, the frame-level codes as well, from the
same decoding.

    media --(the media chain: lwm_data.pipelines.media)--> CodedItems --Sequences--> EXAMPLE tables
                                                                    +--CodesTables--> CODES tables

Counts: the media chain's (lwm_data.pipelines.media).
"""

from __future__ import annotations

from dataclasses import dataclass

from lwm_data.config import nested
from lwm_data.pipelines import vision_codes
from lwm_data.pipelines.common import StageOutput
from lwm_data.pipelines.media import FrameSampling, MediaJobConfig, encode_media, media_examples, vqgan_section
from lwm_data.schemas import CODES_SCHEMA, EXAMPLE_SCHEMA

STAGE = "video"


@dataclass(frozen=True)
class VideoConfig(MediaJobConfig):
    frames: FrameSampling = nested(FrameSampling)


def run_media(
    stage: str, config: MediaJobConfig, beam_args: list[str] | None = None, images_only: bool = False
) -> dict:
    """A media -> examples job (`video`, `image`): the media chain | Sequences | write, and the codes
    when they are kept (counted in both stages' namespaces)."""
    stages = (stage, vision_codes.STAGE) if config.keep_codes else stage
    encoded = encode_media(config.media, config.frames, config.vqgan, stages, beam_args, images_only)
    examples, tokenizer = media_examples(encoded, config, stage)
    encoded.job.write(stage, config, examples, EXAMPLE_SCHEMA, tokenizer, summary=vqgan_section(encoded.vqgan))
    if config.keep_codes:
        codes_config = vision_codes.VisionCodesConfig(
            config.keep_codes, config.media, config.frames, config.vqgan, policy=config.policy
        )
        codes = StageOutput(encoded.coded | "Codes" >> vision_codes.CodesTables(), encoded.errors)
        encoded.job.write(vision_codes.STAGE, codes_config, codes, CODES_SCHEMA, summary=vqgan_section(encoded.vqgan))
    return encoded.job.run()[0]


def run(config: VideoConfig, beam_args: list[str] | None = None) -> dict:
    return run_media(STAGE, config, beam_args)
