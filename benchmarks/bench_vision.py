"""Vision throughput in frames/s: decode + resize against bare decord, VQ-GAN encode alone, the whole stage.

    python benchmarks/bench_vision.py [--configs reduced,amused] [--videos 8] [--frames 48] [--device cpu]

Videos: synthetic H.264 (lwm_data.testing.media), 640x360, made once in the workdir.
- bare decord: `VideoReader(path, width, height).get_batch(...)` over every frame, batches of 16, at
  the size lwm_data asks decord for (short side 256): the same decode + resize with nothing around it.
  (`decord native f/s`, decoding at the native size without resizing, is printed for reference.)
- decode: lwm_data's frames (`video_frames(...).batches()`: probe, sampling plan, decord resizing in
  the decoder, center crop to 256x256), every frame. Goal: >= 0.9x bare decord.
- encode: `VQGAN.encode` on already decoded 256x256 frames, batches of `--batch-size`.
- stage: the `vision-codes` Beam job over the same files (read, decode, RunInference VQ-GAN, assemble,
  write Parquet). Goal: >= 0.8x the slower of decode and encode (decoding overlaps with encoding).
Each figure is the median of `--repeats` runs; `--configs` picks the VQ-GAN shapes (reduced: the CPU
test shape; amused: the real aMUSEd shape, 216 GFLOP a frame). On a GPU: `--device cuda` (bf16,
torch.compile); see benchmarks/gpu_vision.sh.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DECODE_GOAL, STAGE_GOAL = 0.9, 0.8


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


def bare_decord(paths: list[Path], resized: bool = True) -> None:
    import decord

    from lwm_data.vision.frames import fitted_size

    width, height = fitted_size(640, 360) if resized else (-1, -1)
    for path in paths:
        reader = decord.VideoReader(str(path), width=width, height=height, num_threads=1)
        for start in range(0, len(reader), 16):
            reader.get_batch(list(range(start, min(start + 16, len(reader))))).asnumpy()


def our_decode(paths: list[Path]) -> None:
    from lwm_data.vision.frames import video_frames

    for path in paths:
        with video_frames(str(path), max_frames=0, batch_size=16) as video:
            for _ in video.batches():
                pass


def decoded_frames(paths: list[Path]) -> np.ndarray:
    from lwm_data.vision.frames import video_frames

    batches = []
    for path in paths:
        with video_frames(str(path), max_frames=0, batch_size=16) as video:
            batches += list(video.batches())
    return np.concatenate(batches)


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

    from lwm_data.tokenizers.vision import VQGAN

    workdir = Path(args.workdir)
    print(f"machine: {os.cpu_count()} cores, device {args.device}; videos 640x360 H.264; medians of {args.repeats}")
    print(
        f"{'config':8} {'frames':>6} {'decord native f/s':>17} {'decord f/s':>10} {'decode f/s':>10} {'ratio':>6} "
        f"{'encode f/s':>10} {'stage f/s':>9} {'ratio':>6}"
    )
    for config in args.configs.split(","):
        frames_each = args.frames if config == "reduced" or args.device == "cuda" else args.amused_frames
        directory = workdir / f"{config}-{frames_each}"
        paths = make_videos(directory, args.videos, frames_each)
        total = args.videos * frames_each
        native = median_rate(lambda: bare_decord(paths, resized=False), total, args.repeats)
        bare = median_rate(lambda: bare_decord(paths), total, args.repeats)
        ours = median_rate(lambda: our_decode(paths), total, args.repeats)
        model = VQGAN.random(config == "reduced", device=args.device)
        frames = decoded_frames(paths)
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
            print(f"{config}: eager encode {rate:.1f} frames/s (bf16, batch {size}); compiled below")
        whole = median_rate(
            lambda: stage(directory, workdir / "out" / config, config, args.device, size), total, args.repeats
        )
        print(
            f"{config:8} {total:6d} {native:17.1f} {bare:10.1f} {ours:10.1f} {ours / bare:6.2f} {encode:10.2f} "
            f"{whole:9.2f} {whole / min(ours, encode):6.2f}"
        )
    print(f"goals: decode >= {DECODE_GOAL}x bare decord; stage >= {STAGE_GOAL}x the slower of decode and encode")


if __name__ == "__main__":
    main()
