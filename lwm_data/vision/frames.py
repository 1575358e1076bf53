"""Frames from images and videos: decoded, sampled as LWM samples them, resized to 256x256 RGB.

Every frame is resized so its short side is 256 (aspect kept), then center-cropped to 256x256
(docs/lwm-format.md). Videos are decoded with decord, which resizes inside the decoder (the cheap
place); what decord cannot open (a codec or container its bundled FFmpeg lacks) is decoded with PyAV.
`VideoFrames.reader` says which one produced a sequence. Images go through PIL, EXIF orientation
applied, palette/grayscale/alpha made RGB (transparency over white); a JPEG is decoded at the
smallest DCT scale that still covers 256 px, so huge photos cost little.

Sampling (`sample_indices`): all frames, or at `fps` (the frame shown at each 1/fps tick, by
presentation time, so variable-frame-rate videos sample evenly in time), then, when more than
`max_frames` remain, LWM's `numpy.linspace(0, n - 1, max_frames)` truncated to int.

Memory stays bounded: a video's selected frames come in batches of `batch_size` frames
(`VideoFrames.batches()`), each decoded and resized on its own, never the whole video at once.

Bad media raise a `Rejection`: missing_file, empty_file, not_a_video (no video stream, or not media
at all), unsupported_codec, undecodable_video (truncated or corrupt; both readers failed),
undecodable_image. (A file that no container reader accepts, a text file named `.mp4` or an MP4
cut before its index, is undecodable_video, with the reader's message.)
"""

from __future__ import annotations

import io
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from lwm_data import files
from lwm_data.errors import Rejection, excerpt
from lwm_data.lwm_format.layout import FRAME_PIXELS

Media = str | bytes  # a path on any Beam filesystem, or a file's bytes (a tar member)
T = TypeVar("T")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv"})


def media_type(name: str) -> str | None:
    """ "image", "video" or None (not a media file), from the name's extension."""
    extension = os.path.splitext(name)[1].lower()
    return "image" if extension in IMAGE_EXTENSIONS else "video" if extension in VIDEO_EXTENSIONS else None


# ---- geometry ----


def fitted_size(width: int, height: int, size: int = FRAME_PIXELS) -> tuple[int, int]:
    """(width, height) with the short side scaled to `size`, aspect ratio kept."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def center_crop(frames: np.ndarray, size: int = FRAME_PIXELS) -> np.ndarray:
    """The centered size x size window of (..., H, W, C) frames."""
    height, width = frames.shape[-3], frames.shape[-2]
    top, left = (height - size) // 2, (width - size) // 2
    return frames[..., top : top + size, left : left + size, :]


# ---- sampling ----


def sample_indices(timestamps: np.ndarray, max_frames: int = 0, fps: float | None = None) -> np.ndarray:
    """Indices of the frames to keep, for frames presented at `timestamps` (seconds, ascending).

    With `fps`, the frame on screen at each tick t0 + k / fps; then, if more than `max_frames` (> 0)
    remain, `linspace(0, n - 1, max_frames)` of them, truncated to int, as LWM samples."""
    indices = np.arange(len(timestamps))
    if fps and len(timestamps):
        timestamps = np.asarray(timestamps, np.float64)
        slack = 1e-3  # containers keep times to about a millisecond
        ticks = np.arange(timestamps[0], timestamps[-1] + slack, 1.0 / fps)
        indices = np.unique(np.clip(np.searchsorted(timestamps, ticks + slack, side="right") - 1, 0, None))
    if 0 < max_frames < len(indices):
        indices = indices[np.linspace(0, len(indices) - 1, max_frames).astype(int)]
    return indices


# ---- media access ----


@contextmanager
def opened(media: Media) -> Iterator[str | io.BytesIO]:
    """A local path or an in-memory file for `media`; files on other filesystems are copied to a
    temporary local file (decoders seek), removed afterwards."""
    if isinstance(media, bytes):
        if not media:
            raise Rejection("empty_file", "zero bytes")
        yield io.BytesIO(media)
        return
    if os.path.exists(media):
        if os.path.getsize(media) == 0:
            raise Rejection("empty_file", "zero bytes")
        yield media
        return
    if "://" not in media or not files.exists(media):
        raise Rejection("missing_file", f"no such file: {media}")
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(media)[1]) as local:
        with files.open(media) as source:
            shutil.copyfileobj(source, local, 1 << 24)
        local.flush()
        if local.tell() == 0:
            raise Rejection("empty_file", "zero bytes")
        yield local.name


def _rewound(source: str | io.BytesIO) -> str | io.BytesIO:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return source


# ---- images ----


def image_frame(media: Media) -> np.ndarray:
    """One image as a (1, 256, 256, 3) uint8 frame."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with opened(media) as source:
        try:
            with Image.open(source) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (FRAME_PIXELS, FRAME_PIXELS))  # decode at a reduced DCT scale >= 256 px
                image = ImageOps.exif_transpose(image)
                rgb = _as_rgb(image)
                rgb = rgb.resize(fitted_size(*rgb.size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            raise Rejection("undecodable_image", excerpt(str(error))) from None
    return center_crop(np.asarray(rgb, np.uint8))[None]


def _as_rgb(image):
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# ---- videos ----


@dataclass
class VideoFrames:
    """A video's selected frames, read batch by batch (`batches()`), and how they were read."""

    reader: str  # "decord" or "pyav"
    num_frames: int  # frames in the video
    fps: float  # average frame rate
    width: int  # native size
    height: int
    indices: np.ndarray  # selected frames
    _batches: Iterator[np.ndarray]

    def batches(self) -> Iterator[np.ndarray]:
        """(b, 256, 256, 3) uint8 batches of the selected frames, in order."""
        return self._batches

    @property
    def meta(self) -> dict:
        return {
            "reader": self.reader,
            "num_frames": self.num_frames,
            "fps": round(self.fps, 3),
            "width": self.width,
            "height": self.height,
        }


@contextmanager
def video_frames(
    media: Media, max_frames: int = 0, fps: float | None = None, batch_size: int = 16
) -> Iterator[VideoFrames]:
    """Open a video and plan its frames; read them with `.batches()` inside the `with`."""
    with opened(media) as source:
        width, height, codec_error = _probe(source)
        try:
            yield _decord_frames(_rewound(source), width, height, max_frames, fps, batch_size)
            return
        except _DecordFailed:
            pass
        if codec_error:
            raise Rejection("unsupported_codec", codec_error)
        yield _pyav_frames(_rewound(source), width, height, max_frames, fps, batch_size)


class _DecordFailed(Exception):
    pass


def _probe(source) -> tuple[int, int, str | None]:
    """Native (width, height) from the container header, and why no decoder exists for its video
    stream, if none does. What no container reader accepts (corrupt, truncated before its index, not
    media at all) is a Rejection."""
    import av

    try:
        with av.open(_rewound(source)) as container:
            if not container.streams.video:
                raise Rejection("not_a_video", "no video stream")
            stream = container.streams.video[0]
            context = stream.codec_context
            if context is None or context.codec is None:
                return 0, 0, "no decoder for the video stream's codec"
            return int(context.width), int(context.height), None
    except av.error.FFmpegError as error:
        raise Rejection("undecodable_video", excerpt(str(error))) from None


def _decord_frames(source, width, height, max_frames, fps, batch_size) -> VideoFrames:
    import decord

    try:
        if not width or not height:
            raise _DecordFailed("unknown size")
        out_width, out_height = fitted_size(width, height)
        reader = decord.VideoReader(source, width=out_width, height=out_height, num_threads=1)
        count = len(reader)
        rate = float(reader.get_avg_fps())
        # presentation times only matter for --fps; LWM's linspace needs just the count
        timestamps = (
            reader.get_frame_timestamp(np.arange(count))[:, 0] if fps and count else np.arange(count) / max(rate, 1e-9)
        )
    except (decord.DECORDError, RuntimeError, ValueError) as error:
        raise _DecordFailed(str(error)) from None
    if not count:
        raise _DecordFailed("no frames")
    indices = sample_indices(timestamps, max_frames, fps)

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(indices), batch_size):
            try:
                frames = reader.get_batch(indices[start : start + batch_size].tolist()).asnumpy()
            except (decord.DECORDError, RuntimeError) as error:
                raise Rejection("undecodable_video", f"decord: {excerpt(str(error))}") from None
            yield np.ascontiguousarray(center_crop(frames))

    return VideoFrames("decord", count, rate, width, height, indices, batches())


def _pyav_frames(source, width, height, max_frames, fps, batch_size) -> VideoFrames:
    """PyAV: frame times from the packets (no decoding), then one sequential decode that keeps the
    selected frames."""
    import av

    try:
        container = av.open(source)
        stream = container.streams.video[0]
        times = sorted(float(p.pts * p.time_base) for p in container.demux(stream) if p.pts is not None and p.size)
        rate = float(stream.average_rate or 0.0)
        container.close()
    except av.error.FFmpegError as error:
        raise Rejection("undecodable_video", f"PyAV: {excerpt(str(error))}") from None
    if not times:
        raise Rejection("undecodable_video", "no frames")
    timestamps = np.asarray(times) - times[0]
    indices = sample_indices(timestamps, max_frames, fps)
    out_width, out_height = fitted_size(width, height)

    def batches() -> Iterator[np.ndarray]:
        wanted = set(indices.tolist())
        batch, decoded = [], 0
        try:
            with av.open(_rewound(source)) as video:
                for ordinal, frame in enumerate(video.decode(video=0)):
                    decoded = ordinal + 1
                    if ordinal in wanted:
                        batch.append(frame.to_ndarray(format="rgb24", width=out_width, height=out_height))
                        if len(batch) == batch_size:
                            yield np.ascontiguousarray(center_crop(np.stack(batch)))
                            batch = []
        except av.error.FFmpegError as error:
            raise Rejection("undecodable_video", f"PyAV: {excerpt(str(error))}") from None
        if decoded <= indices[-1]:
            raise Rejection("undecodable_video", f"PyAV: ended after {decoded} of {len(timestamps)} frames")
        if batch:
            yield np.ascontiguousarray(center_crop(np.stack(batch)))

    return VideoFrames("pyav", len(timestamps), rate, width, height, indices, batches())


# ---- overlap ----


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead, so decoding the next batch
    overlaps with whatever the consumer does with this one (decoders and torch release the GIL).
    Exceptions are re-raised in the consumer; closing the generator stops the producer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry: tuple) -> bool:
        """Put unless the consumer has gone; False when it has."""
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
            offer((done, None))
        except BaseException as error:  # handed to the consumer
            offer((done, error))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
