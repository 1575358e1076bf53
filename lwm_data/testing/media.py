"""Synthetic media made on the spot, for tests, benchmarks and the demo (nothing is downloaded): PyAV
encodes a moving square to H.264 (or another codec), PIL writes images."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def moving_square(index: int, width: int, height: int) -> np.ndarray:
    """Frame `index` of a red square sliding right over a blue background with a frame-number stripe."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., 2] = 90
    side = max(4, min(width, height) // 5)
    x = (index * 7) % max(1, width - side)
    frame[height // 3 : height // 3 + side, x : x + side] = (230, 40, 30)
    frame[: max(2, height // 20), : (index * 11) % width] = 255
    return frame


def make_video(
    path: Path,
    frames: int = 24,
    width: int = 320,
    height: int = 240,
    fps: int = 10,
    codec: str = "libx264",
    times_ms: list[int] | None = None,
    faststart: bool = False,
) -> Path:
    """An H.264 MP4 (by default) of a moving square; `times_ms` (each frame's presentation time) makes
    its frame rate variable."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(moving_square(i, width, height), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_image(
    path: Path, width: int = 300, height: int = 200, mode: str = "RGB", exif_orientation: int | None = None
) -> Path:
    image = Image.fromarray(moving_square(3, width, height))
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        image = image.convert(mode)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    image.save(path, **kwargs)
    return path
