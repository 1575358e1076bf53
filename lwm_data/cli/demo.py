"""`lwm-data demo`: the whole toolkit on synthetic data, offline, in minutes on two CPU cores.

    synthetic books  -> run books: chunk -> qa (cloze) -> chat (32K) -> text -> pack (32K)   books/
    synthetic videos -> run video: decode -> VQ-GAN (RANDOM reduced weights) -> pack (1K)     video/
    text examples + video examples -> pack (1K rows, text split)                              train-pack/
    one more book, held out -> chunk -> text -> pack (1K rows)                               heldout/
    -> 20 steps of the tiny model, ring attention over 2 CPU processes (torchrun, gloo), the
       held-out loss at step 0, every 10 steps and at the end, and its plot                  train/

Every output is validated as it is made. The configs are the same TOML tables `lwm-data run` reads, so
each step here is one command a user could type; `endpoint` swaps the cloze QA for a real model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lwm_data import config as settings
from lwm_data.cli.validate import validate
from lwm_data.packing import LWM_TEXT_SHARE
from lwm_data.pipelines.registry import STAGES
from lwm_data.recipes import run
from lwm_data.testing.books import generate_books, write_books_txt
from lwm_data.testing.media import make_video

CONTEXT = 32768
TRAIN_SEQ_LEN = 1024

# configs/tiny_cpu.toml's trainer, embedded so an installed package runs the demo without the repo.
TRAIN_TOML = f"""\
model = "tiny"
vision = true
attention_backend = "torch"
ring_size = 2
dtype = "float32"
batch_size = 2
lr = 3e-3
warmup_steps = 4
schedule = "cosine"
weight_decay = 0.1
grad_clip = 1.0
seed = 0
num_workers = 1

[[phases]]
seq_len = {TRAIN_SEQ_LEN}
steps = 20
rope_theta = 1e6
"""


@dataclass(frozen=True)
class DemoOptions:
    output: Path
    books: int = 8
    words: int = 30000
    videos: int = 6
    train_steps: int = 20
    endpoint: str | None = None  # an OpenAI-compatible server (vLLM) for QA instead of the cloze backend
    model: str | None = None  # its served model name
    seed: int = 0


@dataclass
class DemoResult:
    manifests: dict[str, dict]  # step name -> the manifest of its final output
    directories: dict[str, str]  # step name -> output directory
    losses: list[float]  # the training run's loss per step
    eval_losses: list[float]  # the held-out loss at each evaluation
    plot: Path | None  # the books' stats
    train_plot: Path | None  # lwm-train plot of the run's metrics


def write_inputs(root: Path, options: DemoOptions) -> tuple[Path, Path, Path]:
    """Under root/inputs: a folder of synthetic books (.txt), a folder with one more book held out, and
    a folder of captioned clips (.mp4 beside a .txt caption)."""
    books = generate_books(options.books + 1, options.words, options.seed)
    books_in = write_books_txt(root / "inputs" / "books", books[:-1])
    heldout_in = write_books_txt(root / "inputs" / "heldout", books[-1:])
    return books_in, heldout_in, write_videos(root / "inputs" / "videos", options.videos)


def run_demo(options: DemoOptions, report: Callable[[str], None] = print) -> DemoResult:
    """Run every step under `options.output`; `report` hears what is starting."""
    root = options.output
    books_in, heldout_in, videos_in = write_inputs(root, options)
    directories = {
        "books": str(root / "books"),
        "video": str(root / "video"),
        "train-pack": str(root / "train-pack"),
        "heldout": str(root / "heldout"),
    }
    manifests = {}

    report("run books: chunk -> qa -> chat -> text -> pack (one Beam job)")
    manifests["books"] = _checked(run.run("books", books_document(options, books_in), [], True), directories["books"])
    report("run video: decode -> VQ-GAN with RANDOM reduced weights (codes mean nothing) -> pack (one Beam job)")
    manifests["video"] = _checked(run.run("video", video_document(options, videos_in), [], True), directories["video"])
    report(f"pack: text and video examples into {TRAIN_SEQ_LEN}-token training rows")
    manifests["train-pack"] = _pack_for_training(directories)
    report("held out: one more book -> chunk -> text -> pack, the evaluation rows")
    manifests["heldout"] = _heldout(heldout_in, directories["heldout"])

    report(f"train: {options.train_steps} steps, tiny model, ring attention over 2 CPU processes (torchrun)")
    metrics = train(root / "train", directories["train-pack"], directories["heldout"] + "/pack", options.train_steps)
    directories["train"] = str(root / "train")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    eval_losses = [r["eval_loss"] for r in records if "eval_loss" in r]
    from lwm_data.train.plot import plot_metrics

    plot_metrics(metrics, root / "train" / "loss.png")
    stats = _plot(directories["books"] + "/pack", root / "stats.png")
    return DemoResult(manifests, directories, losses, eval_losses, stats, root / "train" / "loss.png")


def write_videos(directory: Path, count: int) -> Path:
    """Short synthetic clips with sidecar captions, as a folder the video stage reads."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        make_video(directory / f"clip{i:02d}.mp4", frames=12 + 4 * i, width=320, height=240)
        (directory / f"clip{i:02d}.txt").write_text(f"A red square moves across the frame, clip {i}.")
    return directory


def books_document(options: DemoOptions, books: Path) -> dict:
    qa = {"backend": "openai", "endpoint": options.endpoint, "model": options.model} if options.endpoint else {}
    return {
        "output": str(options.output / "books"),
        "chunk": {"input": f"{books}/*.txt"},
        "qa": {k: v for k, v in qa.items() if v is not None},
        "chat": {"context_lengths": [CONTEXT], "seed": options.seed},
        "text": {},
        "pack": {
            "seq_len": CONTEXT,
            "mix": {"chat": 1 - LWM_TEXT_SHARE, "text": LWM_TEXT_SHARE},
            "overflow": "split",
            "loss_weighting": "example",
            "seed": options.seed,
        },
    }


def video_document(options: DemoOptions, videos: Path) -> dict:
    return {
        "output": str(options.output / "video"),
        "video": {"input": str(videos), "random_config": "reduced", "max_frames": 3, "direction": "both"},
        "pack": {"seq_len": TRAIN_SEQ_LEN, "loss_weighting": "example", "seed": options.seed},
    }


def _pack_for_training(directories: dict[str, str]) -> dict:
    pack = STAGES["pack"]
    values = {
        "input": (directories["books"] + "/text", directories["video"] + "/video"),
        "output": directories["train-pack"],
        "seq_len": TRAIN_SEQ_LEN,
        "overflow": "split",
    }
    manifest = pack.run(settings.build(pack.config, values), None)
    _check(directories["train-pack"])
    return manifest


def _heldout(books: Path, directory: str) -> dict:
    """The held-out book as packed rows: the chunk, text and pack stages, one after the other."""
    chunk, text, pack = (STAGES[name] for name in ("chunk", "text", "pack"))
    steps = [
        (chunk, {"input": f"{books}/*.txt", "output": f"{directory}/chunk"}),
        (text, {"input": f"{directory}/chunk", "output": f"{directory}/text"}),
        (pack, {"input": (f"{directory}/text",), "output": f"{directory}/pack", "seq_len": TRAIN_SEQ_LEN,
                "overflow": "split"}),
    ]  # fmt: skip
    for stage, values in steps:
        manifest = stage.run(settings.build(stage.config, values), None)
        _check(values["output"])
    return manifest


def _checked(manifests: list[dict], root: str) -> dict:
    """Validate every output of a whole-pipeline run under `root`; returns its final (pack's) manifest."""
    for manifest in manifests:
        _check(f"{root}/{manifest['stage']}")
    return manifests[-1]


def _check(directory: str) -> None:
    violations = validate(directory)
    if violations:
        raise RuntimeError(f"{directory} is invalid: {dict(violations)}")


def train(directory: Path, data: str, heldout: str, steps: int) -> Path:
    """`torchrun --nproc-per-node 2 -m lwm_data.train` on `data`, evaluated on `heldout`; its metrics file."""
    directory.mkdir(parents=True, exist_ok=True)
    config, metrics = directory / "train.toml", directory / "metrics.jsonl"
    config.write_text(TRAIN_TOML)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "lwm_data.train",
        "--config",
        str(config),
        "--data",
        data,
        "--steps",
        str(steps),
        "--metrics",
        str(metrics),
        "--checkpoint-dir",
        str(directory / "checkpoints"),
        "--eval-data",
        heldout,
        "--eval-every",
        "10",
    ]
    # One torch thread per process: two processes share the two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env)
    return metrics


def _plot(directory: str, path: Path) -> Path:
    from lwm_data.cli.stats import collect_stats
    from lwm_data.stats import plot_stats

    plot_stats(collect_stats(directory), str(path))
    return path


def summary_rows(result: DemoResult) -> list[tuple[str, ...]]:
    """(stage, in, out, filtered, dead-lettered, rows, tokens, fill) per stage, for the closing table."""
    rows = []
    for name, manifest in result.manifests.items():
        upstream = manifest.get("pipeline", {}).get("stages", {})
        for stage, counts in upstream.items():
            rows.append((f"{name}/{stage}", *_counts(counts), "", "", ""))
        packing = manifest["packing"]
        tokens = sum(packing["tokens_by_kind"].values())
        label = f"{name}/pack" if upstream else name
        rows.append(
            (
                label,
                *_counts(manifest["counts"]),
                f"{packing['rows']:,}",
                f"{tokens:,}",
                f"{packing['fill_efficiency']:.2%}",
            )
        )
    return rows


def _counts(counts: dict) -> tuple[str, str, str, str]:
    return tuple(f"{counts[key]:,}" for key in ("in", "out", "filtered_total", "dead_lettered"))
