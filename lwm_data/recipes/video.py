"""`run video`: media to packed rows in ONE Beam pipeline:

    media --(the media chain: lwm_data.pipelines.media)--> CodedItems --Sequences--> examples --Pack

The video stage's output (or, without --keep-intermediate, only what pack reads) and pack's, each
with its balanced manifest; pack's records both stages' counts.
"""

from __future__ import annotations

from typing import Any

from lwm_data.pipelines import pack, video
from lwm_data.pipelines.common import Job
from lwm_data.pipelines.media import encode_media, media_examples, vqgan_section
from lwm_data.recipes.common import Upstream, finish_with_pack
from lwm_data.schemas import EXAMPLE_SCHEMA

STAGES = (video.STAGE, pack.STAGE)  # in order: the TOML tables


def wiring(outputs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each stage's input options, from the other stages' output directories."""
    return {pack.STAGE: {"input": [outputs[video.STAGE]]}}


def job(configs: dict[str, Any], beam_args: list[str] | None = None, keep_intermediate: bool = True) -> Job:
    """The whole video pipeline as one job; `.run()` it for the manifests (pack's last, with every
    stage's counts)."""
    config = configs[video.STAGE]
    encoded = encode_media(config.media, config.frames, config.vqgan, video.STAGE, beam_args)
    examples, tokenizer = media_examples(encoded, config, video.STAGE)
    upstream = [Upstream(video.STAGE, config, examples, EXAMPLE_SCHEMA, vqgan_section(encoded.vqgan))]
    return finish_with_pack(
        encoded.job, "video", upstream, {video.STAGE}, configs[pack.STAGE], tokenizer, keep_intermediate
    )
