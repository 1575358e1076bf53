"""`lwm-train plot METRICS.jsonl --output FIG.png`: what a run's metrics file says, in two panels.

Left: training loss by step, and the held-out eval loss by step (its own records, step 0 first).
Right: the eval loss by position within the example (power-of-two buckets), one line per evaluation,
lighter for earlier ones: the long-context curve, which falls with position when the model uses its
context, and should fall further as training goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training step records, eval records) of a metrics JSONL file."""
    train, evals = [], []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (evals if "eval_loss" in record else train).append(record)
    return train, evals


def plot_metrics(path: str | Path, output: str | Path) -> list[str]:
    """Write the figure; returns its panels' titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(path)
    if not train and not evals:
        raise ValueError(f"{path} holds no training or eval records")
    figure, (by_step, by_position) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        by_step.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", color="#4c72b0")
    if evals:
        steps, losses = [r["step"] for r in evals], [r["eval_loss"] for r in evals]
        by_step.plot(steps, losses, "o-", label="eval", color="#c44e52")
    by_step.set(title="loss by step", xlabel="step", ylabel="loss")
    by_step.legend()
    colors = plt.cm.viridis([0.15 + 0.7 * i / max(1, len(evals) - 1) for i in range(len(evals))])
    for record, color in zip(evals, colors):
        buckets = sorted(record["eval_loss_by_position"].items(), key=lambda item: int(item[0]))
        by_position.plot(
            [int(b) for b, _ in buckets], [v for _, v in buckets], "o-", color=color, label=f"step {record['step']}"
        )
    by_position.set(title="eval loss by position", xlabel="target position (power-of-two bucket)", ylabel="loss")
    by_position.set_xscale("log", base=2)
    if evals:
        by_position.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return ["loss by step", "eval loss by position"]
