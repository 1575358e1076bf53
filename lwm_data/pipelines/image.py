"""`lwm-data image`: images -> VQ-GAN codes -> examples in LWM's vision layout: the video stage with one
frame per item, refusing videos (dead letter `not_an_image`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lwm_data.pipelines.media import FrameSampling, MediaJobConfig
from lwm_data.pipelines.video import run_media

STAGE = "image"


@dataclass(frozen=True)
class ImageConfig(MediaJobConfig):
    @property
    def frames(self) -> FrameSampling:
        return FrameSampling(max_frames=1)


def run(config: ImageConfig, beam_args: list[str] | None = None) -> dict:
    return run_media(STAGE, config, beam_args, images_only=True)
