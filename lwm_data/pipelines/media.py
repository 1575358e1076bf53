"""The media chain every vision stage shares: media inputs -> frame batches -> VQ-GAN codes.

    media inputs --ReadMedia--> MediaItems (+ dead letters)                         [read]
    items --Reshuffle--> DecodeFrames --> frame batches (+ one header per item)     [EncodeMedia]
          frame batches --RunInference(VQGANHandler)--> codes per batch
          headers + codes --CoGroupByKey--> Assemble --> CodedItems

`encode_media` starts every media job the same way (the launch check, the VQ-GAN's manifest entry,
a Beam job, and the chain above in it), and `media_examples` turns its CodedItems into examples in
LWM's layout (lwm_data.pipelines.vision_sequences). The stages built on it: `video` and `image`
(media -> examples; `image` refuses videos), `vision-codes` (media -> frame-level codes), and the
whole `run video` pipeline (lwm_data.recipes.video).

Decoding runs in a DoFn, a video's frames in batches of `--batch-size` read by a background thread
(lwm_data.vision.frames.prefetched), so decoding the next batch overlaps with encoding this one; an
item's frames never all sit in memory at once, only its codes (uint16) are gathered. The VQ-GAN runs
behind `RunInference` with `VQGANHandler`: batches of up to `--batch-size` frames across items, one
model per worker process (Beam's shared handle); on Dataflow `--accelerator` puts the step on GPU
workers as a Beam resource hint.

Counts (`in` = media items): `out` = items turned into examples (or codes); dead-lettered: the
reader's (missing_media_path, unsupported_media_type, missing_caption, bad_conversation,
invalid_utf8, unreadable_file, invalid_json, too_large), the decoders' (missing_file, empty_file,
too_large, too_many_pixels, not_a_video, unsupported_codec, undecodable_video, undecodable_image),
not_an_image (a video given to `image`). too_large and too_many_pixels (`--max-media-bytes`,
`--max-pixels`: lwm_data.vision.frames.MediaLimits) are decided before anything is decoded.
Stats: frames, examples, tokens, vision_tokens, items by reader (reader.decord, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection
from lwm_data.lwm_format.layout import TOKENS_PER_FRAME
from lwm_data.outputs import DeadLetterPolicy
from lwm_data.pipelines.common import (
    ERRORS,
    LOCAL_RUNNERS,
    Counters,
    Job,
    ReadFiles,
    StageOutput,
    Stages,
    merge_errors,
    route,
    runner_key,
)
from lwm_data.pipelines.vision_sequences import Sequences
from lwm_data.reading import is_unicode
from lwm_data.tokenizers import load_tokenizer
from lwm_data.tokenizers.vision import VQGAN, VQGANSettings, describe
from lwm_data.vision.frames import MediaLimits, image_frame, prefetched, video_frames
from lwm_data.vision.media import MediaItem, MediaReader, MediaSettings
from lwm_data.vision.sequences import CodedItem, SequenceSettings, conversation_turns

HEADERS = "headers"
_PLACEHOLDER_CODES = np.zeros((1, TOKENS_PER_FRAME), np.int32)


@dataclass(frozen=True)
class FrameSampling:
    max_frames: int = setting(
        30, "Frames per video, sampled as LWM does (linspace); 0: all. 30 frames fit an 8K context."
    )
    fps: float | None = setting(None, "Sample at this rate first (by presentation time), then cap at --max-frames.")

    def __post_init__(self):
        if self.max_frames < 0 or (self.fps is not None and self.fps <= 0):
            raise ConfigError("--max-frames must be >= 0 and --fps > 0")


@dataclass(frozen=True)
class MediaJobConfig:
    """What the `video` and `image` stages share."""

    output: str = setting(help="Output directory (EXAMPLE_SCHEMA).")
    keep_codes: str | None = setting(None, "Also write the frame-level codes (CODES_SCHEMA) into this directory.")
    tokenizer: str | None = setting(None, "SentencePiece .model or tokenizer dir (default: embedded).")
    batch_tokens: int = setting(4_000_000, "Examples are written in tables of about this many tokens.")
    media: MediaSettings = nested(MediaSettings)
    vqgan: VQGANSettings = nested(VQGANSettings)
    sequences: SequenceSettings = nested(SequenceSettings)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)


# ---- steps ----


@dataclass
class FrameBatch:
    """Consecutive selected frames of one item, `index`-th of its batches."""

    item_id: str
    index: int
    frames: np.ndarray  # (b, 256, 256, 3) uint8


@dataclass
class ItemHeader:
    """What an item's codes are assembled with: everything but its media and frames."""

    item: MediaItem
    num_batches: int
    frame_indices: np.ndarray
    meta: dict[str, Any]


class DecodeFrames:
    """Step: a MediaItem -> its frame batches, then its header (tagged HEADERS); a Rejection for bad
    text (checked first, so no frame of a bad record is decoded) or bad media."""

    def __init__(
        self,
        stage: Stages,
        frames: FrameSampling,
        batch_size: int,
        images_only: bool,
        path: str = "lwm",
        limits: MediaLimits = MediaLimits(),
    ):
        self.count = Counters(stage)
        self.frames = frames
        self.batch_size = batch_size
        self.images_only = images_only
        self.path = path
        self.limits = limits

    def __call__(self, item: MediaItem) -> Iterable[FrameBatch | beam.pvalue.TaggedOutput | Rejection]:
        try:
            check_text(item)
            if item.media_type == "image":
                frame = image_frame(item.media, self.path, self.limits)
                yield from self._emit(item, [frame], np.zeros(1, np.int32), {"reader": "pil"})
            elif self.images_only:
                raise Rejection("not_an_image", "a video: `lwm-data video` reads videos")
            else:
                sampling = self.frames
                with video_frames(
                    item.media, sampling.max_frames, sampling.fps, self.batch_size, self.path, self.limits
                ) as video:
                    yield from self._emit(item, prefetched(video.batches()), video.indices, video.meta)
        except Rejection as rejection:
            yield rejection.at(item.source, item.item_id)

    def _emit(self, item: MediaItem, batches: Iterable[np.ndarray], indices: np.ndarray, meta: dict) -> Iterable:
        count = 0
        for count, frames in enumerate(batches, 1):
            self.count("frames", len(frames))
            yield FrameBatch(item.item_id, count - 1, frames)
        self.count(f"reader.{meta['reader']}")
        header = ItemHeader(_without_media(item), count, indices.astype(np.int32), {**item.meta, **meta})
        yield beam.pvalue.TaggedOutput(HEADERS, (item.item_id, header))


def check_text(item: MediaItem) -> None:
    """Refuse, before any decoding, text that could not become an example."""
    texts = [item.caption] if item.caption is not None else []
    if item.conversations is not None:
        conversation_turns(item.conversations, _PLACEHOLDER_CODES)
        texts += [turn["value"] for turn in item.conversations]
    for text in texts:
        if not text.isascii() and not is_unicode(text):
            raise Rejection("invalid_utf8", "a caption or turn holds a lone surrogate")


def _without_media(item: MediaItem) -> MediaItem:
    return MediaItem(
        item.item_id, item.source, item.source, item.media_type, item.caption, item.conversations, item.meta
    )


class VQGANHandler(ModelHandler[FrameBatch, np.ndarray, VQGAN]):
    """RunInference handler: batches of up to `batch_size` frames, gathered across items."""

    def __init__(self, settings: VQGANSettings):
        # with an element_size_fn, Beam's batch sizes are weights: here, frames
        super().__init__(min_batch_size=1, max_batch_size=settings.batch_size, element_size_fn=_frame_count)
        self.settings = settings

    def load_model(self) -> VQGAN:
        return VQGAN.from_settings(self.settings)

    def run_inference(
        self, batch: Sequence[FrameBatch], model: VQGAN, inference_args: dict | None = None
    ) -> Iterable[PredictionResult]:
        if not batch:
            return []
        frames = np.concatenate([b.frames for b in batch])
        size = self.settings.batch_size
        codes = np.concatenate([model.encode(frames[i : i + size]) for i in range(0, len(frames), size)])
        codes = codes.reshape(len(frames), -1).astype(np.uint16)
        bounds = np.cumsum([0] + [len(b.frames) for b in batch])
        return [PredictionResult((b.item_id, b.index), codes[s:e]) for b, s, e in zip(batch, bounds[:-1], bounds[1:])]


def _frame_count(batch: FrameBatch) -> int:
    return len(batch.frames)


def assemble(grouped: tuple[str, dict[str, list]]) -> Iterable[CodedItem]:
    """An item's header and its batches' codes -> one CodedItem. An item without a header failed
    while decoding and is already dead-lettered: its partial codes are dropped."""
    _, parts = grouped
    if not parts[HEADERS]:
        return
    (header,) = parts[HEADERS]
    batches = sorted(parts["codes"], key=lambda indexed: indexed[0])
    codes = np.concatenate([c for _, c in batches]).astype(np.int32)
    item = header.item
    yield CodedItem(
        item.item_id,
        item.source,
        item.media_type,
        codes,
        header.frame_indices,
        item.caption,
        item.conversations,
        header.meta,
    )


# ---- the chain ----


class EncodeMedia(beam.PTransform):
    """MediaItems -> CodedItems: decode, VQ-GAN, assemble. Returns (coded items, dead letters)."""

    def __init__(
        self,
        frames: FrameSampling,
        vqgan: VQGANSettings,
        stage: Stages,
        images_only: bool = False,
        path: str = "lwm",
        limits: MediaLimits = MediaLimits(),
    ):
        super().__init__()
        self.frames = frames
        self.vqgan = vqgan
        self.stage = stage
        self.images_only = images_only
        self.path = path
        self.limits = limits

    def expand(self, items: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        decoded = (
            items
            | "SpreadItems" >> beam.Reshuffle()
            | "DecodeFrames"
            >> route(
                self.stage,
                DecodeFrames(self.stage, self.frames, self.vqgan.batch_size, self.images_only, self.path, self.limits),
                HEADERS,
            )
        )
        encode = RunInference(VQGANHandler(self.vqgan))
        if self.vqgan.accelerator:
            encode = encode.with_resource_hints(accelerator=self.vqgan.accelerator)
        codes = (
            decoded.out
            | "VQGAN" >> encode
            | "KeyCodes" >> beam.Map(lambda result: (result.example[0], (result.example[1], result.inference)))
        )
        coded = (
            {HEADERS: decoded[HEADERS], "codes": codes}
            | "GroupByItem" >> beam.CoGroupByKey()
            | "Assemble" >> beam.FlatMap(assemble)
        )
        return coded, decoded[ERRORS]


def read_media(settings: MediaSettings, stage: Stages) -> ReadFiles:
    reads = "media (a manifest, WebDataset .tar shards, or a folder of images and videos)"
    return ReadFiles(settings.pattern, stage, MediaReader(settings, Counters(stage)), reads)


def check_launch(vqgan: VQGANSettings, beam_args: list[str] | None) -> None:
    """What can be known wrong before a media job starts: `--device cuda` on a local run without a GPU."""
    if runner_key(beam_args) in LOCAL_RUNNERS:
        vqgan.check_device()


def vqgan_section(entry: dict | None):
    """The manifest's `vqgan` section (for `Job.write`'s summary): which weights made the codes."""
    return lambda manifest: {"vqgan": entry}


@dataclass
class EncodedMedia:
    """A media job as every vision stage starts it: a Beam job holding the chain, its CodedItems, the
    reader's and decoders' dead letters, and the VQ-GAN's manifest entry."""

    job: Job
    coded: beam.PCollection  # CodedItems
    errors: beam.PCollection  # dead letters of reading and decoding
    vqgan: dict  # the VQ-GAN's manifest entry


def encode_media(
    media: MediaSettings,
    frames: FrameSampling,
    vqgan: VQGANSettings,
    stages: Stages,
    beam_args: list[str] | None = None,
    images_only: bool = False,
) -> EncodedMedia:
    """Check the launch, describe the VQ-GAN (loudly, for random weights), and build read -> decode ->
    VQ-GAN -> assemble in a new job; `stages` count the items (several, when one job writes several
    outputs from the same items)."""
    check_launch(vqgan, beam_args)
    entry = describe(vqgan)
    job = Job(beam_args)
    items = job.pipeline | "ReadMedia" >> read_media(media, stages)
    encode = EncodeMedia(frames, vqgan, stages, images_only, media.frames, media.limits)
    coded, decode_errors = items.records | "Encode" >> encode
    return EncodedMedia(job, coded, merge_errors(items.errors, decode_errors, label="MediaErrors"), entry)


def media_examples(encoded: EncodedMedia, config: MediaJobConfig, stage: str) -> tuple[StageOutput, dict]:
    """The chain's items as examples in LWM's layout, with every dead letter so far; and the text
    tokenizer's manifest entry (loaded here, so a bad path fails before the job runs)."""
    tokenizer = load_tokenizer(config.tokenizer).entry
    examples = encoded.coded | "Sequences" >> Sequences(config.sequences, tokenizer, config.batch_tokens, stage)
    return StageOutput(examples.rows, merge_errors(encoded.errors, examples.errors)), tokenizer
