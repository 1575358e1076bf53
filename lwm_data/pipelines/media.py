"""Images and videos -> VQ-GAN codes -> examples in LWM's vision layout (EXAMPLE_SCHEMA).

    media inputs --ReadMedia--> MediaItems (+ dead letters)                         [read]
    items --Reshuffle--> DecodeFrames --> frame batches (+ one header per item)     [EncodeMedia]
          frame batches --RunInference(VQGANHandler)--> codes per batch
          headers + codes --CoGroupByKey--> Assemble --> CodedItems
    CodedItems --BuildSequences--> Examples --BatchElements--> EXAMPLE tables       [Sequences]
    CodedItems --BatchElements--> CODES tables (`vision-codes`, or `--keep-codes`)  [CodesTables]

Stages: `video` and `image` (media -> examples; `image` refuses videos), `vision-codes` (media ->
frame-level codes, CODES_SCHEMA) and `vision-sequences` (codes -> examples, with any template or
direction, without re-encoding).

Decoding runs in a DoFn, a video's frames in batches of `--batch-size` read by a background thread
(lwm_data.vision.frames.prefetched), so decoding the next batch overlaps with encoding this one; an
item's frames never all sit in memory at once, only its codes (uint16) are gathered. The VQ-GAN runs
behind `RunInference` with `VQGANHandler`: batches of up to `--batch-size` frames across items, one
model per worker process (Beam's shared handle); on Dataflow `--accelerator` puts the step on GPU
workers as a Beam resource hint.

Counts (`in` = media items): `out` = items turned into examples (or codes); dead-lettered: the
reader's (missing_media_path, unsupported_media_type, missing_caption, bad_conversation,
invalid_utf8, unreadable_file, invalid_json), the decoders' (missing_file, empty_file, not_a_video,
unsupported_codec, undecodable_video, undecodable_image), not_an_image (a video given to `image`).
Stats: frames, examples, tokens, vision_tokens, items by reader (reader.decord, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection
from lwm_data.examples import Example, examples_to_table
from lwm_data.lwm_format.processor import LwmProcessor
from lwm_data.pipelines.common import (
    ERRORS,
    LOCAL_RUNNERS,
    Counters,
    Job,
    ReadFiles,
    ReadStage,
    StageOutput,
    Stages,
    merge_errors,
    route,
)
from lwm_data.reading import is_unicode
from lwm_data.schemas import CODES_SCHEMA, EXAMPLE_SCHEMA
from lwm_data.tokenizers import load_tokenizer, resolve_tokenizer
from lwm_data.tokenizers.vision import VQGAN, VQGANSettings, describe
from lwm_data.vision.frames import image_frame, prefetched, video_frames
from lwm_data.vision.media import MediaItem, MediaReader, MediaSettings
from lwm_data.vision.sequences import CodedItem, SequenceSettings, conversation_turns, vision_examples

VIDEO, IMAGE, CODES, SEQUENCES = "video", "image", "vision-codes", "vision-sequences"
HEADERS = "headers"
_PLACEHOLDER_CODES = np.zeros((1, 256), np.int32)


@dataclass(frozen=True)
class FrameSampling:
    max_frames: int = setting(30, "Frames per video, sampled as LWM does (linspace); 0: all. 30 frames fit an 8K context.")
    fps: float | None = setting(None, "Sample at this rate first (by presentation time), then cap at --max-frames.")

    def __post_init__(self):
        if self.max_frames < 0 or (self.fps is not None and self.fps <= 0):
            raise ConfigError("--max-frames must be >= 0 and --fps > 0")


@dataclass(frozen=True)
class VisionCodesConfig:
    output: str = setting(help="Output directory (CODES_SCHEMA).")
    media: MediaSettings = nested(MediaSettings)
    frames: FrameSampling = nested(FrameSampling)
    vqgan: VQGANSettings = nested(VQGANSettings)


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


@dataclass(frozen=True)
class VideoConfig(MediaJobConfig):
    frames: FrameSampling = nested(FrameSampling)


@dataclass(frozen=True)
class ImageConfig(MediaJobConfig):
    @property
    def frames(self) -> FrameSampling:
        return FrameSampling(max_frames=1)


@dataclass(frozen=True)
class SequencesConfig:
    input: str = setting(help="Output directory of `lwm-data vision-codes` (or a --keep-codes directory).")
    output: str = setting(help="Output directory (EXAMPLE_SCHEMA).")
    tokenizer: str | None = setting(None, "SentencePiece .model or tokenizer dir (default: embedded).")
    batch_tokens: int = setting(4_000_000, "Examples are written in tables of about this many tokens.")
    sequences: SequenceSettings = nested(SequenceSettings)


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

    def __init__(self, stage: Stages, frames: FrameSampling, batch_size: int, images_only: bool):
        self.count = Counters(stage)
        self.frames = frames
        self.batch_size = batch_size
        self.images_only = images_only

    def __call__(self, item: MediaItem) -> Iterable[FrameBatch | beam.pvalue.TaggedOutput | Rejection]:
        try:
            check_text(item)
            if item.media_type == "image":
                batches, indices, meta = [image_frame(item.media)], np.zeros(1, np.int32), {"reader": "pil"}
                yield from self._emit(item, batches, indices, meta)
            elif self.images_only:
                raise Rejection("not_an_image", "a video: `lwm-data video` reads videos")
            else:
                with video_frames(item.media, self.frames.max_frames, self.frames.fps, self.batch_size) as video:
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
    return MediaItem(item.item_id, item.source, item.source, item.media_type, item.caption, item.conversations, item.meta)


class VQGANHandler(ModelHandler[FrameBatch, np.ndarray, VQGAN]):
    """RunInference handler: batches of up to `batch_size` frames, gathered across items."""

    def __init__(self, settings: VQGANSettings):
        # with an element_size_fn, Beam's batch sizes are weights: here, frames
        super().__init__(min_batch_size=1, max_batch_size=settings.batch_size, element_size_fn=_frame_count)
        self.settings = settings

    def load_model(self) -> VQGAN:
        return VQGAN.from_settings(self.settings)

    def run_inference(self, batch: Sequence[FrameBatch], model: VQGAN, inference_args: dict | None = None) -> Iterable[PredictionResult]:
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
    yield CodedItem(item.item_id, item.source, item.media_type, codes, header.frame_indices,
                    item.caption, item.conversations, header.meta)


class BuildSequences:
    """Step: a CodedItem -> its examples (one item counted `out`)."""

    def __init__(self, stage: str, settings: SequenceSettings, tokenizer: dict):
        self.count = Counters(stage)
        self.settings = settings
        self.tokenizer_entry = tokenizer

    def setup(self) -> None:
        self.processor = LwmProcessor(resolve_tokenizer(self.tokenizer_entry))

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


# ---- transforms ----


class EncodeMedia(beam.PTransform):
    """MediaItems -> CodedItems: decode, VQ-GAN, assemble. Returns (coded items, dead letters)."""

    def __init__(self, frames: FrameSampling, vqgan: VQGANSettings, stage: Stages, images_only: bool = False):
        super().__init__()
        self.frames = frames
        self.vqgan = vqgan
        self.stage = stage
        self.images_only = images_only

    def expand(self, items: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        decoded = (
            items
            | "SpreadItems" >> beam.Reshuffle()
            | "DecodeFrames" >> route(self.stage, DecodeFrames(self.stage, self.frames, self.vqgan.batch_size, self.images_only), HEADERS)
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


class Sequences(beam.PTransform):
    """CodedItems -> EXAMPLE_SCHEMA tables (+ dead letters)."""

    def __init__(self, settings: SequenceSettings, tokenizer: dict, batch_tokens: int, stage: str):
        super().__init__()
        self.settings = settings
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.stage = stage

    def expand(self, coded: beam.PCollection) -> StageOutput:
        built = coded | "BuildSequences" >> route(self.stage, BuildSequences(self.stage, self.settings, self.tokenizer))
        tables = (
            built.out
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_tokens, element_size_fn=lambda e: e.num_tokens)
            | "ToTable" >> beam.Map(examples_to_table)
        )
        return StageOutput(tables, built[ERRORS])


class CodesTables(beam.PTransform):
    """CodedItems -> CODES_SCHEMA tables, each item counted `out` of `stage`."""

    def __init__(self, stage: str = CODES):
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


def read_media(settings: MediaSettings, stage: Stages) -> ReadFiles:
    return ReadFiles(settings.pattern, stage, MediaReader(settings, Counters(stage)))


# ---- jobs ----


def _check_launch(vqgan: VQGANSettings, beam_args: list[str] | None) -> None:
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    if PipelineOptions(beam_args or []).view_as(StandardOptions).runner in LOCAL_RUNNERS:
        vqgan.check_device()


def _vqgan_section(entry: dict):
    return lambda manifest: {"vqgan": entry}


def run_media(stage: str, config: MediaJobConfig, beam_args: list[str] | None = None) -> dict:
    """The `video` / `image` job: read | EncodeMedia | Sequences | write (and the codes, if kept)."""
    _check_launch(config.vqgan, beam_args)
    tokenizer = load_tokenizer(config.tokenizer).entry
    vqgan = describe(config.vqgan)
    stages = (stage, CODES) if config.keep_codes else stage
    job = Job(beam_args)
    items = job.pipeline | "ReadMedia" >> read_media(config.media, stages)
    coded, decode_errors = items.records | "Encode" >> EncodeMedia(config.frames, config.vqgan, stages, stage == IMAGE)
    examples = coded | "Sequences" >> Sequences(config.sequences, tokenizer, config.batch_tokens, stage)
    errors = merge_errors(items.errors, decode_errors, examples.errors)
    job.write(stage, config, StageOutput(examples.rows, errors), EXAMPLE_SCHEMA, tokenizer, summary=_vqgan_section(vqgan))
    if config.keep_codes:
        codes_config = VisionCodesConfig(config.keep_codes, config.media, config.frames, config.vqgan)
        codes = StageOutput(coded | "Codes" >> CodesTables(), merge_errors(items.errors, decode_errors, label="CodesErrors"))
        job.write(CODES, codes_config, codes, CODES_SCHEMA, summary=_vqgan_section(vqgan))
    return job.run()[0]


def run_video(config: VideoConfig, beam_args: list[str] | None = None) -> dict:
    return run_media(VIDEO, config, beam_args)


def run_image(config: ImageConfig, beam_args: list[str] | None = None) -> dict:
    return run_media(IMAGE, config, beam_args)


def run_codes(config: VisionCodesConfig, beam_args: list[str] | None = None) -> dict:
    """The `vision-codes` job: read | EncodeMedia | write codes."""
    _check_launch(config.vqgan, beam_args)
    vqgan = describe(config.vqgan)
    job = Job(beam_args)
    items = job.pipeline | "ReadMedia" >> read_media(config.media, CODES)
    coded, decode_errors = items.records | "Encode" >> EncodeMedia(config.frames, config.vqgan, CODES)
    codes = StageOutput(coded | "Codes" >> CodesTables(), merge_errors(items.errors, decode_errors))
    job.write(CODES, config, codes, CODES_SCHEMA, summary=_vqgan_section(vqgan))
    (manifest,) = job.run()
    return manifest


def run_sequences(config: SequencesConfig, beam_args: list[str] | None = None) -> dict:
    """The `vision-sequences` job: codes | Sequences | write; `in` = coded items."""
    from lwm_data import outputs

    tokenizer = load_tokenizer(config.tokenizer).entry
    vqgan = outputs.read_manifest(config.input).get("vqgan")
    count = Counters(SEQUENCES)

    def rows(table: pa.Table) -> Iterable[CodedItem]:
        for row in table.to_pylist():
            count("in")
            yield CodedItem.from_row(row)

    job = Job(beam_args)
    coded = job.pipeline | "ReadCodes" >> ReadStage(config.input) | "Items" >> beam.FlatMap(rows)
    examples = coded | "Sequences" >> Sequences(config.sequences, tokenizer, config.batch_tokens, SEQUENCES)
    job.write(SEQUENCES, config, examples, EXAMPLE_SCHEMA, tokenizer, summary=_vqgan_section(vqgan))
    (manifest,) = job.run()
    return manifest


def video_job(video: VideoConfig, pack_config, beam_args: list[str] | None = None, keep_intermediate: bool = True) -> Job:
    """Media to packed rows in ONE Beam pipeline: read | EncodeMedia | Sequences | Pack; `.run()` it
    for the manifests (pack's last, with every stage's counts)."""
    from lwm_data.pipelines import pack

    _check_launch(video.vqgan, beam_args)
    tokenizer = load_tokenizer(video.tokenizer).entry
    vqgan = describe(video.vqgan)
    job = Job(beam_args)
    items = job.pipeline | "ReadMedia" >> read_media(video.media, VIDEO)
    coded, decode_errors = items.records | "Encode" >> EncodeMedia(video.frames, video.vqgan, VIDEO)
    examples = coded | "Sequences" >> Sequences(video.sequences, tokenizer, video.batch_tokens, VIDEO)
    errors = merge_errors(items.errors, decode_errors, examples.errors)
    upstream = [pack.Upstream(VIDEO, video, StageOutput(examples.rows, errors), EXAMPLE_SCHEMA, _vqgan_section(vqgan))]
    return pack.finish_with_pack(job, "video", upstream, {VIDEO}, pack_config, tokenizer, keep_intermediate)

