"""`lwm-data vision-decode`: stored codes back to pictures, so people can look at what a dataset holds.

Reads a `vision-codes` output (codes per item) or any output of vision examples (the vision blocks
found through `vision_mask`, or through the `vision_offset` in their meta for one-vocabulary
examples), decodes them with the VQ-GAN its manifest names (the same random weights, rebuilt from
their seed, when it names random ones), and writes PNG frames (`OUT/<item>/frame_00000.png`) or one
H.264 MP4 per item (`OUT/<item>.mp4`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import numpy as np

from lwm_data import outputs
from lwm_data.errors import ConfigError
from lwm_data.lwm_format.layout import END_OF_FRAME, END_OF_VISION, TOKENS_PER_FRAME
from lwm_data.tokenizers.vision import VQGAN


def vqgan_of(manifest: dict, vqgan_path: str | None = None, subfolder: str = "", device: str = "cpu") -> VQGAN:
    """The VQ-GAN an output was made with (or the one given)."""
    if vqgan_path:
        return VQGAN.from_pretrained(vqgan_path, subfolder, device=device)
    entry = manifest.get("vqgan")
    if not entry:
        raise ConfigError("the output's manifest names no VQ-GAN: pass --vqgan")
    pixel_range = entry.get("pixel_range", "0,1")  # outputs made before it was recorded fed [0, 1]
    if entry.get("random_weights"):
        return VQGAN.random(entry["config"] == "reduced", entry["seed"], device=device, pixel_range=pixel_range)
    return VQGAN.from_pretrained(entry["path"], entry.get("subfolder", ""), device=device, pixel_range=pixel_range)


def coded_items(directory: str) -> Iterator[tuple[str, np.ndarray]]:
    """(item or example id, codes (frames, 256)) of every vision block in a stage's output."""
    stage = outputs.read_manifest(directory)["stage"]
    if stage == "vision-codes":
        for batch in outputs.iter_batches(directory, ["item_id", "codes"], batch_size=64):
            for item_id, codes in zip(batch["item_id"].to_pylist(), batch["codes"].to_numpy(zero_copy_only=False)):
                yield item_id, np.asarray(codes, np.int64).reshape(-1, TOKENS_PER_FRAME)
        return
    for batch in outputs.iter_batches(directory, ["example_id", "tokens", "vision_mask", "meta"], batch_size=16):
        for row in batch.to_pylist():
            tokens, mask = np.asarray(row["tokens"]), np.asarray(row["vision_mask"], bool)
            offset = json.loads(row["meta"] or "{}").get("vision_offset")
            if offset:  # one vocabulary: vision ids sit after the text ids
                mask, tokens = tokens >= offset, np.where(tokens >= offset, tokens - offset, tokens)
            for i, block in enumerate(vision_blocks(tokens, mask)):
                yield f"{row['example_id']}-{i}", block


def vision_blocks(tokens: np.ndarray, vision_mask: np.ndarray) -> list[np.ndarray]:
    """Each run of vision ids as (frames, 256) codes, end-of-frame/-vision ids removed."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], vision_mask, [False]]).astype(np.int8)))
    blocks = []
    for start, end in zip(edges[::2], edges[1::2]):
        ids = tokens[start:end]
        codes = ids[(ids != END_OF_FRAME) & (ids != END_OF_VISION)]
        blocks.append(codes.reshape(-1, TOKENS_PER_FRAME))
    return blocks


def write_pictures(
    directory: str, output: str, vqgan: VQGAN, limit: int = 0, as_video: bool = False, fps: float = 4.0
) -> list[str]:
    """Decode an output's vision blocks into PNG frames or MP4s under `output`; returns what was written."""
    from PIL import Image

    os.makedirs(output, exist_ok=True)
    written = []
    for n, (name, codes) in enumerate(coded_items(directory)):
        if limit and n >= limit:
            break
        frames = np.concatenate([vqgan.decode(codes[i : i + 16]) for i in range(0, len(codes), 16)])
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-120:]
        if as_video:
            path = os.path.join(output, slug + ".mp4")
            _write_mp4(path, frames, fps)
            written.append(path)
            continue
        os.makedirs(os.path.join(output, slug), exist_ok=True)
        for i, frame in enumerate(frames):
            path = os.path.join(output, slug, f"frame_{i:05d}.png")
            Image.fromarray(frame).save(path)
            written.append(path)
    return written


def _write_mp4(path: str, frames: np.ndarray, fps: float) -> None:
    from fractions import Fraction

    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
