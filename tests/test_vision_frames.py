"""Frames: LWM's sampling, resize + center crop, decord with the PyAV fallback, images of every mode,
bad media as Rejections, and memory that stays bounded on a long video."""

from __future__ import annotations

import threading
import tracemalloc
import warnings

import av
import numpy as np
import pytest
from PIL import Image

from lwm_data import files
from lwm_data.errors import Rejection
from lwm_data.vision.frames import (
    FRAME_PATHS,
    MediaLimits,
    center_crop,
    fitted_size,
    image_frame,
    prefetched,
    sample_indices,
    video_frames,
)
from tests.media import make_image, make_noise_image, make_video


def read_all(media, **kwargs) -> tuple[np.ndarray, object]:
    with video_frames(str(media), **kwargs) as video:
        frames = np.concatenate(list(video.batches()))
    return frames, video


# ---- sampling and geometry ----


def test_sampling_is_lwms_linspace():
    timestamps = np.arange(100) / 25
    np.testing.assert_array_equal(sample_indices(timestamps, 8), np.linspace(0, 99, 8).astype(int))
    np.testing.assert_array_equal(sample_indices(timestamps[:5], 8), np.arange(5))  # fewer frames: all
    np.testing.assert_array_equal(sample_indices(timestamps, 0), np.arange(100))


def test_fps_sampling_follows_presentation_time():
    timestamps = np.array([0, 0.04, 0.08, 0.5, 0.54, 1.0, 2.0])  # variable frame rate
    np.testing.assert_array_equal(sample_indices(timestamps, fps=2), [0, 3, 5, 6])  # ticks 0, .5, 1, 1.5, 2
    np.testing.assert_array_equal(sample_indices(timestamps, max_frames=2, fps=2), [0, 6])


@pytest.mark.parametrize(
    "size, expected", [((320, 240), (341, 256)), ((240, 426), (256, 454)), ((256, 256), (256, 256))]
)
def test_short_side_to_256(size, expected):
    assert fitted_size(*size) == expected


def test_center_crop():
    frame = np.arange(300 * 256 * 3).reshape(300, 256, 3)
    np.testing.assert_array_equal(center_crop(frame), frame[22:278])


# ---- videos ----


def test_video_frames_are_sampled_resized_and_batched(tmp_path):
    path = make_video(tmp_path / "v.mp4", frames=30)
    with video_frames(str(path), max_frames=8, batch_size=3) as video:
        batches = list(video.batches())
    assert [len(b) for b in batches] == [3, 3, 2]
    assert batches[0].shape[1:] == (256, 256, 3) and batches[0].dtype == np.uint8
    np.testing.assert_array_equal(video.indices, np.linspace(0, 29, 8).astype(int))
    assert video.meta == {"reader": "decord", "num_frames": 30, "fps": 10.0, "width": 320, "height": 240, "rotation": 0}


def test_frames_show_the_right_picture(tmp_path):
    """The red square moves as in the source (7 px a frame, x 256/240 for the resize) inside the crop."""
    path = make_video(tmp_path / "v.mp4", frames=10)
    frames, _ = read_all(path, max_frames=0)
    red = (frames[..., 0] > 150) & (frames[..., 1] < 100)
    assert red[6].sum() > 2000 and red[9].sum() > 2000  # the whole 51x51 square
    x6, x9 = (np.flatnonzero(red[i].any(0)).mean() for i in (6, 9))
    assert x9 - x6 == pytest.approx(3 * 7 * 256 / 240, abs=3)


@pytest.mark.parametrize("frames", [1, 5])
def test_short_videos(tmp_path, frames):
    got, video = read_all(make_video(tmp_path / "v.mp4", frames=frames), max_frames=30)
    assert len(got) == frames and video.num_frames == frames


@pytest.mark.parametrize("width, height", [(240, 426), (1920, 1080)])
def test_portrait_and_large_videos(tmp_path, width, height):
    got, video = read_all(make_video(tmp_path / "v.mp4", frames=3, width=width, height=height), max_frames=0)
    assert got.shape == (3, 256, 256, 3) and (video.width, video.height) == (width, height)


def test_variable_frame_rate(tmp_path):
    times = [0, 40, 80, 120, 500, 540, 580, 1000, 1040, 1500, 2000]
    path = make_video(tmp_path / "vfr.mp4", frames=len(times), times_ms=times)
    got, video = read_all(path, max_frames=0, fps=2)
    np.testing.assert_array_equal(video.indices, [0, 4, 7, 9, 10])
    assert len(got) == 5


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="PyAV built without an AV1 encoder")
def test_what_decord_cannot_open_is_read_by_pyav(tmp_path):
    path = make_video(tmp_path / "v.mkv", frames=12, width=256, height=256, codec="libsvtav1")
    got, video = read_all(path, max_frames=4)
    assert video.reader == "pyav" and len(got) == 4
    np.testing.assert_array_equal(video.indices, np.linspace(0, 11, 4).astype(int))


def test_bad_videos_are_rejections_with_reasons(tmp_path):
    good = make_video(tmp_path / "good.mp4", frames=30)
    data = good.read_bytes()
    cases = {
        "empty_file": b"",
        "undecodable_video": b"this is a text file, not a video\n" * 20,
        "unsupported_codec": data.replace(b"avc1", b"zzz9"),
    }
    for reason, content in cases.items():
        path = tmp_path / f"{reason}.mp4"
        path.write_bytes(content)
        with pytest.raises(Rejection) as caught:
            read_all(path)
        assert caught.value.reason == reason, (reason, caught.value.detail)
    with pytest.raises(Rejection) as caught:
        read_all(tmp_path / "missing.mp4")
    assert caught.value.reason == "missing_file"


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_mp4(tmp_path, faststart):
    """Cut before its index (moov at the end) or mid-stream (moov first): either way a Rejection."""
    path = make_video(tmp_path / "v.mp4", frames=40, faststart=faststart)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Rejection) as caught:
        read_all(path, max_frames=0)
    assert caught.value.reason == "undecodable_video"


def test_video_from_bytes(tmp_path):
    data = make_video(tmp_path / "v.mp4", frames=6).read_bytes()
    with video_frames(data, max_frames=3) as video:
        assert sum(len(b) for b in video.batches()) == 3


@pytest.mark.slow
def test_long_video_memory_is_bounded(tmp_path):
    """1200 frames: holding them all at 256x256 would take 236 MB; batches of 16 keep it to a few."""
    path = make_video(tmp_path / "long.mp4", frames=1200, width=160, height=120, fps=30)
    tracemalloc.start()
    try:
        with video_frames(str(path), max_frames=0, batch_size=16) as video:
            total = sum(len(batch) for batch in prefetched(video.batches()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 1200
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.1f} MiB"


# ---- images ----


@pytest.mark.parametrize("path", ["lwm", "fast"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "LA"])
def test_image_modes_become_rgb(tmp_path, mode, path):
    frame = image_frame(str(make_image(tmp_path / f"i-{mode}.png", mode=mode)), path)
    assert frame.shape == (1, 256, 256, 3) and frame.dtype == np.uint8


def test_fast_path_composites_transparency_over_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (300, 300), (10, 20, 30, 0)).save(path)
    assert (image_frame(str(path), "fast") == 255).all()


def test_fast_path_applies_exif_rotation(tmp_path):
    gradient = np.repeat(np.linspace(0, 255, 300).astype(np.uint8)[None, :, None], 200, 0).repeat(
        3, 2
    )  # dark -> bright
    rotated, upright = tmp_path / "r.jpg", tmp_path / "u.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(gradient).save(rotated, exif=exif, quality=95)
    Image.fromarray(gradient).transpose(Image.Transpose.ROTATE_270).save(upright, quality=95)
    a, b = image_frame(str(rotated), "fast").astype(int), image_frame(str(upright), "fast").astype(int)
    assert np.abs(a - b).mean() < 3  # the same upright picture
    assert a[0, :, 128].std() > 40 and a[0, 128, :].std() < 5  # the gradient now runs top to bottom


@pytest.mark.parametrize("path", ["lwm", "fast"])
def test_huge_jpeg(tmp_path, path):
    image = make_image(tmp_path / "huge.jpg", width=6000, height=4000)
    assert image_frame(str(image), path).shape == (1, 256, 256, 3)


def test_corrupt_image(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    with pytest.raises(Rejection) as caught:
        image_frame(str(path))
    assert caught.value.reason == "undecodable_image"


# ---- bounds ----


def rejection_of(read, *args, **kwargs) -> Rejection:
    with pytest.raises(Rejection) as caught:
        read(*args, **kwargs)
    return caught.value


def test_media_over_the_byte_limit(tmp_path):
    heavy = make_noise_image(tmp_path / "heavy.png")  # about 58 KB
    limits = MediaLimits(max_media_bytes=10_000)
    for media in (str(heavy), heavy.read_bytes()):
        rejection = rejection_of(image_frame, media, limits=limits)
        assert rejection.reason == "too_large" and "over --max-media-bytes 10,000" in rejection.detail
    video = make_video(tmp_path / "v.mp4", frames=3, width=160, height=120)
    assert rejection_of(read_all, video, limits=MediaLimits(max_media_bytes=1_000)).reason == "too_large"
    assert image_frame(str(heavy), limits=MediaLimits(max_media_bytes=heavy.stat().st_size)).shape == (1, 256, 256, 3)


def test_remote_media_over_the_byte_limit_are_not_copied(tmp_path, monkeypatch):
    from apache_beam.io.filesystems import FileSystems

    import tests.memfs  # noqa: F401 - registers memfs://

    with FileSystems.create("memfs://bounds/heavy.png") as out:
        out.write(make_noise_image(tmp_path / "heavy.png").read_bytes())

    def never(path):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(files, "open", never)
    rejection = rejection_of(image_frame, "memfs://bounds/heavy.png", limits=MediaLimits(max_media_bytes=10_000))
    assert rejection.reason == "too_large"


@pytest.mark.parametrize("path", FRAME_PATHS)
def test_frames_over_the_pixel_limit(tmp_path, monkeypatch, path):
    image = make_image(tmp_path / "i.png", width=320, height=240)
    video = make_video(tmp_path / "v.mp4", frames=2, width=320, height=240)
    limits = MediaLimits(max_pixels=320 * 240 - 1)
    with monkeypatch.context() as patched:  # nothing is decoded: the image's size comes from its header
        patched.setattr("PIL.ImageFile.ImageFile.load", lambda image: pytest.fail("the image was decoded"))
        rejection = rejection_of(image_frame, str(image), path, limits)
    assert rejection.reason == "too_many_pixels"
    assert rejection.detail == "320x240 = 76,800 pixels, over --max-pixels 76,799"
    assert rejection_of(read_all, video, path=path, limits=limits).reason == "too_many_pixels"
    at_the_limit = MediaLimits(max_pixels=320 * 240)
    assert image_frame(str(image), path, at_the_limit).shape == (1, 256, 256, 3)
    assert read_all(video, path=path, limits=at_the_limit)[0].shape == (2, 256, 256, 3)


def test_pillows_decompression_bomb_checks_are_the_same_rejection(tmp_path, monkeypatch):
    """Pillow's own guard (Image.MAX_IMAGE_PIXELS) refuses at twice its limit and warns above it: both,
    the warning when warnings are errors, are too_many_pixels, never a crash."""
    image = str(make_image(tmp_path / "i.png", width=100, height=100))
    roomy = MediaLimits(max_pixels=10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)  # 10,000 pixels: over twice the limit
    rejection = rejection_of(image_frame, image, limits=roomy)
    assert rejection.reason == "too_many_pixels" and rejection.detail.startswith("Pillow: ")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8_000)  # over the limit, under twice it: a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert rejection_of(image_frame, image, limits=roomy).reason == "too_many_pixels"


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="--max-media-bytes"):
        MediaLimits(max_pixels=0)


# ---- overlap ----


def test_prefetched_keeps_order_and_runs_ahead():
    produced = []

    def items():
        for i in range(6):
            produced.append(threading.current_thread().name)
            yield i

    assert list(prefetched(items(), depth=2)) == list(range(6))
    assert all(name != threading.current_thread().name for name in produced)


def test_prefetched_reraises_and_stops_when_closed():
    def failing():
        yield 1
        raise Rejection("undecodable_video", "boom")

    with pytest.raises(Rejection):
        list(prefetched(failing()))
    consumed = prefetched(iter(range(10**9)), depth=2)
    assert next(consumed) == 0
    consumed.close()  # the producer thread stops instead of running on
