"""Frames from images and videos: decoded, sampled as LWM samples them, resized to 256x256 RGB.

Every frame is resized so its short side is 256 (aspect kept), then center-cropped to 256x256
(docs/lwm-format.md). Two paths (`FRAME_PATHS`):

    lwm   LWM's own, pixel for pixel (its vision_chat.py `_read_process_vision`): images through
          `Image.open(f).convert("RGB")` (alpha dropped, EXIF orientation not applied), videos
          decoded at full resolution by decord; every frame then goes through `lwm_frame`: long
          side `int(256 * long / short)`, `image.resize` with Pillow's default filter (bicubic for
          RGB), and `Image.crop` of the float box `((w - 256) / 2, ...)`, whose edges Pillow rounds
          half to even. The default: these are the frames LWM's VQ-GAN was given.
    fast  scaled inside the decoder (decord's, PyAV's swscale), the long side rounded, a floor crop;
          JPEGs decoded at the smallest DCT scale that covers 256 px, EXIF orientation applied,
          transparency composited over white. Much cheaper on large media; NOT LWM's codes
          (benchmarks/bench_vision.py measures how many agree).

What decord cannot open (a codec or container its bundled FFmpeg lacks) is decoded with PyAV;
`VideoFrames.reader` says which one produced a sequence. A video's display rotation (its display
matrix) is applied in both paths, as decord applies it at full resolution: a portrait phone clip
stays portrait. In the lwm path, batches are decoded by one thread while the frames of the previous
batch are resized by two others (Pillow releases the GIL), which is where it gains on LWM's loop.

Sampling (`sample_indices`): all frames, or at `fps` (the frame shown at each 1/fps tick, by
presentation time, so variable-frame-rate videos sample evenly in time), then, when more than
`max_frames` remain, LWM's `numpy.linspace(0, n - 1, max_frames)` truncated to int.

Memory stays bounded: a video's selected frames come in batches of `batch_size` frames
(`VideoFrames.batches()`), each decoded and resized on its own, never the whole video at once.

Bounds (`MediaLimits`), checked before anything is decoded, since the lwm path decodes at full
resolution: a file of more than `max_media_bytes` (its size from the filesystem, before it is read or
copied) is `too_large`; an image or video whose frame has more than `max_pixels` (the size Pillow's
lazy `Image.open` or the container's stream header gives) is `too_many_pixels`, as is an image
Pillow itself refuses as a decompression bomb (its DecompressionBombError, or its warning when
warnings are errors). Defaults: 1 GiB holds any real clip (an hour of 1080p at 2 Mbit/s is 0.9 GB)
while bounding what a WebDataset member holds in memory (its bytes travel between steps); 2**26
pixels (8192 x 8192, 192 MiB as one RGB frame) admits 8K video (7680 x 4320) and 60 MP photos, and
sits under Pillow's own bomb limit (89.5 MP), so Pillow never refuses what the limit admits.

Bad media raise a `Rejection`: missing_file, empty_file, too_large, too_many_pixels, not_a_video (no
video stream, or not media at all), unsupported_codec, undecodable_video (truncated or corrupt; both
readers failed), undecodable_image. (A file that no container reader accepts, a text file named
`.mp4` or an MP4 cut before its index, is undecodable_video, with the reader's message.)
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
from lwm_data.config import setting
from lwm_data.errors import ConfigError, Rejection, excerpt
from lwm_data.lwm_format.layout import FRAME_PIXELS

FRAME_PATHS = ("lwm", "fast")
RESIZE_THREADS = 2  # frames of a batch resized at once (lwm path)

Media = str | bytes  # a path on any Beam filesystem, or a file's bytes (a tar member)
T = TypeVar("T")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv"})


def media_type(name: str) -> str | None:
    """ "image", "video" or None (not a media file), from the name's extension."""
    extension = os.path.splitext(name)[1].lower()
    return "image" if extension in IMAGE_EXTENSIONS else "video" if extension in VIDEO_EXTENSIONS else None


# ---- bounds ----


@dataclass(frozen=True)
class MediaLimits:
    """How large one item's media may be, checked before it is read or decoded."""

    max_media_bytes: int = setting(
        1 << 30,
        "Media files and WebDataset members larger than this many bytes are dead-lettered (too_large) "
        "before they are read. 1 GiB: any real clip, yet a bounded WebDataset member in memory.",
    )
    max_pixels: int = setting(
        1 << 26,
        "Images and videos whose frame has more pixels are dead-lettered (too_many_pixels) before decoding "
        "(the lwm path decodes at full resolution). 2**26 = 8192x8192: admits 8K video and 60 MP photos.",
    )

    def __post_init__(self):
        if self.max_media_bytes <= 0 or self.max_pixels <= 0:
            raise ConfigError("--max-media-bytes and --max-pixels must be > 0")

    def check_bytes(self, size: int) -> None:
        """Refuse media of more than `max_media_bytes` (too_large)."""
        if size > self.max_media_bytes:
            raise Rejection("too_large", f"{size:,} bytes, over --max-media-bytes {self.max_media_bytes:,}")

    def check_pixels(self, width: int, height: int) -> None:
        """Refuse a frame of more than `max_pixels` (too_many_pixels)."""
        if width * height > self.max_pixels:
            raise Rejection(
                "too_many_pixels",
                f"{width}x{height} = {width * height:,} pixels, over --max-pixels {self.max_pixels:,}",
            )


# ---- geometry ----


def fitted_size(width: int, height: int, size: int = FRAME_PIXELS) -> tuple[int, int]:
    """(width, height) with the short side scaled to `size`, aspect ratio kept."""
    if width <= height:
        return size, max(size, round(height * size / width))
    return max(size, round(width * size / height)), size


def lwm_frame(image, size: int = FRAME_PIXELS) -> np.ndarray:
    """LWM's `_process_frame` on a PIL image, as (size, size, 3) uint8 (the [-1, 1] scaling is the
    VQ-GAN's): the same calls, so the same pixels."""
    width, height = image.size
    if width < height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    image = image.resize((new_width, new_height))
    left, top = (new_width - size) / 2, (new_height - size) / 2
    right, bottom = (new_width + size) / 2, (new_height + size) / 2
    return np.asarray(image.crop((left, top, right, bottom)), np.uint8)


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
def opened(media: Media, limits: MediaLimits = MediaLimits()) -> Iterator[str | io.BytesIO]:
    """A local path or an in-memory file for `media`, its size checked first (`_check_size`); files on
    other filesystems are copied to a temporary local file (decoders seek), removed afterwards."""
    if isinstance(media, bytes):
        _check_size(len(media), limits)
        yield io.BytesIO(media)
        return
    if os.path.exists(media):
        _check_size(os.path.getsize(media), limits)
        yield media
        return
    if "://" not in media or not files.exists(media):
        raise Rejection("missing_file", f"no such file: {media}")
    _check_size(files.size(media), limits)
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(media)[1]) as local:
        with files.open(media) as source:
            shutil.copyfileobj(source, local, 1 << 24)
        local.flush()
        yield local.name


def _check_size(size: int, limits: MediaLimits) -> None:
    if size == 0:
        raise Rejection("empty_file", "zero bytes")
    limits.check_bytes(size)


def _rewound(source: str | io.BytesIO) -> str | io.BytesIO:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return source


# ---- images ----


def image_frame(media: Media, path: str = "lwm", limits: MediaLimits = MediaLimits()) -> np.ndarray:
    """One image as a (1, 256, 256, 3) uint8 frame, by the `path` asked for, within `limits`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with opened(media, limits) as source:
        try:
            with Image.open(source) as image:  # lazy: the header only
                limits.check_pixels(*image.size)
                if path == "lwm":
                    return lwm_frame(image.convert("RGB"))[None]
                if image.format == "JPEG":
                    image.draft("RGB", (FRAME_PIXELS, FRAME_PIXELS))  # decode at a reduced DCT scale >= 256 px
                image = ImageOps.exif_transpose(image)
                rgb = _as_rgb(image)
                rgb = rgb.resize(fitted_size(*rgb.size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise Rejection("too_many_pixels", f"Pillow: {excerpt(str(error))}") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
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
    width: int  # size as displayed (coded size, turned by the rotation)
    height: int
    rotation: int  # display rotation, degrees counterclockwise (0, 90, 180, -90)
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
            "rotation": self.rotation,
        }


@dataclass(frozen=True)
class Probe:
    """What the container header and the first frame say before any reader is chosen."""

    width: int  # as displayed
    height: int
    rotation: int  # degrees counterclockwise, from the display matrix
    codec_error: str | None  # why no decoder exists for the video stream, if none does


@contextmanager
def video_frames(
    media: Media,
    max_frames: int = 0,
    fps: float | None = None,
    batch_size: int = 16,
    path: str = "lwm",
    limits: MediaLimits = MediaLimits(),
) -> Iterator[VideoFrames]:
    """Open a video within `limits` and plan its frames; read them with `.batches()` inside the `with`."""
    with opened(media, limits) as source:
        probe = _probe(source, limits)
        try:
            yield _decord_frames(_rewound(source), probe, max_frames, fps, batch_size, path)
            return
        except _DecordFailed:
            pass
        if probe.codec_error:
            raise Rejection("unsupported_codec", probe.codec_error)
        yield _pyav_frames(_rewound(source), probe, max_frames, fps, batch_size, path)


class _DecordFailed(Exception):
    pass


def _probe(source, limits: MediaLimits = MediaLimits()) -> Probe:
    """The displayed size (the container's, turned by the first frame's display rotation), and why no
    decoder exists for the video stream, if none does. What no container reader accepts (corrupt,
    truncated before its index, not media at all) is a Rejection, and so is a frame size over
    `limits` (from the stream's header, before the first frame is decoded)."""
    import av

    try:
        with av.open(_rewound(source)) as container:
            if not container.streams.video:
                raise Rejection("not_a_video", "no video stream")
            stream = container.streams.video[0]
            context = stream.codec_context
            if context is None or context.codec is None:
                return Probe(0, 0, 0, "no decoder for the video stream's codec")
            width, height = int(context.width), int(context.height)
            limits.check_pixels(width, height)
            rotation = _first_frame_rotation(container)
    except av.error.FFmpegError as error:
        raise Rejection("undecodable_video", excerpt(str(error))) from None
    if rotation % 180:
        width, height = height, width
    return Probe(width, height, rotation, None)


def _first_frame_rotation(container) -> int:
    """The display rotation the first frame carries (0 when it cannot be decoded: the readers then say why)."""
    import av

    try:
        frame = next(container.decode(video=0), None)
    except av.error.FFmpegError:
        return 0
    return int(round(frame.rotation)) % 360 if frame is not None else 0


def _rotated(frame: np.ndarray, rotation: int) -> np.ndarray:
    """A decoded (coded-orientation) frame as displayed: rotation degrees counterclockwise."""
    return np.ascontiguousarray(np.rot90(frame, k=rotation // 90)) if rotation else frame


def _decord_frames(source, probe: Probe, max_frames, fps, batch_size, path) -> VideoFrames:
    """decord, which applies the display rotation itself: at full resolution (lwm), or scaled to the
    displayed size's fit (fast)."""
    import decord

    try:
        if not probe.width or not probe.height:
            raise _DecordFailed("unknown size")
        if path == "lwm":
            reader = decord.VideoReader(source, num_threads=0)  # as LWM opens it
        else:
            out_width, out_height = fitted_size(probe.width, probe.height)
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

    def decoded() -> Iterator[np.ndarray]:
        for start in range(0, len(indices), batch_size):
            try:
                yield reader.get_batch(indices[start : start + batch_size].tolist()).asnumpy()
            except (decord.DECORDError, RuntimeError) as error:
                raise Rejection("undecodable_video", f"decord: {excerpt(str(error))}") from None

    batches = _lwm_frames(prefetched(decoded(), depth=1)) if path == "lwm" else map(_cropped, decoded())
    return VideoFrames("decord", count, rate, probe.width, probe.height, probe.rotation, indices, batches)


def _pyav_frames(source, probe: Probe, max_frames, fps, batch_size, path) -> VideoFrames:
    """PyAV: frame times from the packets (no decoding), then one sequential decode that keeps the
    selected frames, turned by their display rotation: at full resolution (lwm), or scaled (fast)."""
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
    size = {}
    if path == "fast":  # swscale scales the coded frame: ask for the fit of the displayed size, turned back
        fit_width, fit_height = fitted_size(probe.width, probe.height)
        size = (
            {"width": fit_height, "height": fit_width}
            if probe.rotation % 180
            else {"width": fit_width, "height": fit_height}
        )

    def decoded() -> Iterator[np.ndarray]:
        wanted = set(indices.tolist())
        batch, count = [], 0
        try:
            with av.open(_rewound(source)) as video:
                for ordinal, frame in enumerate(video.decode(video=0)):
                    count = ordinal + 1
                    if ordinal in wanted:
                        batch.append(_rotated(frame.to_ndarray(format="rgb24", **size), int(round(frame.rotation))))
                        if len(batch) == batch_size:
                            yield np.stack(batch)
                            batch = []
        except av.error.FFmpegError as error:
            raise Rejection("undecodable_video", f"PyAV: {excerpt(str(error))}") from None
        if count <= indices[-1]:
            raise Rejection("undecodable_video", f"PyAV: ended after {count} of {len(timestamps)} frames")
        if batch:
            yield np.stack(batch)

    batches = _lwm_frames(prefetched(decoded(), depth=1)) if path == "lwm" else map(_cropped, decoded())
    return VideoFrames("pyav", len(timestamps), rate, probe.width, probe.height, probe.rotation, indices, batches)


def _cropped(frames: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(center_crop(frames))


def _lwm_frames(decoded: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Full-resolution batches -> LWM's frames, `RESIZE_THREADS` frames at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    with ThreadPoolExecutor(RESIZE_THREADS, thread_name_prefix="lwm-frames") as pool:
        for frames in decoded:
            yield np.stack(list(pool.map(lambda frame: lwm_frame(Image.fromarray(frame)), frames)))


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
