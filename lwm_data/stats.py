"""What a stage's output holds, for `lwm-data stats DIR [--plot FILE.png]`: collectors and the plot.

Counts come from the manifest; token totals and distributions from the shards, reading only small
columns (num_tokens, kind, per-row and per-segment counts), never the token lists. Each stage's
collector is named in the registry (lwm_data.pipelines.registry), which `lwm-data stats` dispatches
through (lwm_data.cli.stats):
    chunk_stats    books, chunks, tokens; chunk lengths
    example_stats  examples and tokens by kind; example lengths    (chat, text, import-lwm)
    packed_stats   rows, tokens, padding, fill, segments per row, tokens by kind; segment lengths
    row_stats      rows, and tokens when the rows have num_tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lwm_data import outputs
from lwm_data.arrays import flat_values
from lwm_data.examples import tokens_by_kind
from lwm_data.packing import fill_efficiency


@dataclass
class DatasetStats:
    stage: str
    counts: dict  # the manifest's counts
    totals: dict[str, int | float] = field(default_factory=dict)  # name -> value, in display order
    tokens_by_kind: dict[str, int] = field(default_factory=dict)
    lengths: np.ndarray | None = None  # per example (per segment for packed rows)
    segments_per_row: np.ndarray | None = None
    fill_per_row: np.ndarray | None = None


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy() if table.num_rows else np.zeros(0, np.int64)


def _strings(table: pa.Table, name: str, flatten: bool = False) -> np.ndarray:
    if not table.num_rows:
        return np.zeros(0, object)
    column = pc.list_flatten(table[name]) if flatten else table[name]
    return np.asarray(column.to_pylist(), dtype=object)


def chunk_stats(directory: str, stats: DatasetStats) -> None:
    table = outputs.read_table(directory, ["book_id", "num_tokens"])
    stats.lengths = _column_numpy(table, "num_tokens")
    books = len(pc.unique(table["book_id"])) if table.num_rows else 0
    stats.totals = {"books": books, "chunks": table.num_rows, "tokens": int(stats.lengths.sum())}


def example_stats(directory: str, stats: DatasetStats) -> None:
    table = outputs.read_table(directory, ["kind", "num_tokens"])
    stats.lengths = _column_numpy(table, "num_tokens")
    stats.tokens_by_kind = tokens_by_kind(_strings(table, "kind"), stats.lengths)
    stats.totals = {"examples": table.num_rows, "tokens": int(stats.lengths.sum())}
    if table.num_rows:
        stats.totals["median example tokens"] = int(np.median(stats.lengths))


def row_stats(directory: str, stats: DatasetStats) -> None:
    table = outputs.read_table(directory)
    stats.totals = {"rows": table.num_rows}
    if "num_tokens" in table.column_names:
        stats.lengths = _column_numpy(table, "num_tokens")
        stats.totals["tokens"] = int(stats.lengths.sum())


def packed_stats(directory: str, stats: DatasetStats) -> None:
    columns = ["num_segments", "num_pad_tokens", "num_vision_tokens", "kinds", "segment_lengths"]
    table = outputs.read_table(directory, columns)
    num_segments = _column_numpy(table, "num_segments")
    pad = _column_numpy(table, "num_pad_tokens")
    segment_lengths = flat_values(table["segment_lengths"], np.int64) if table.num_rows else np.zeros(0, np.int64)
    row_of_segment = np.repeat(np.arange(table.num_rows), num_segments)
    row_tokens = np.bincount(row_of_segment, weights=segment_lengths, minlength=table.num_rows)
    seq_len = int(row_tokens[0] + pad[0]) if table.num_rows else 0
    stats.lengths = segment_lengths
    stats.segments_per_row = num_segments
    stats.fill_per_row = row_tokens / seq_len if seq_len else np.zeros(0)
    stats.tokens_by_kind = tokens_by_kind(_strings(table, "kinds", flatten=True), segment_lengths)
    tokens = int(segment_lengths.sum())
    stats.totals = {
        "rows": table.num_rows,
        "seq_len": seq_len,
        "tokens": tokens,
        "vision tokens": int(_column_numpy(table, "num_vision_tokens").sum()),
        "pad tokens": int(pad.sum()),
        "fill efficiency": fill_efficiency(tokens, tokens + int(pad.sum())),
        "segments": int(num_segments.sum()),
        "segments per row": round(float(num_segments.mean()), 3) if table.num_rows else 0.0,
    }


def plot_stats(stats: DatasetStats, path: str) -> list[str]:
    """Save the figures that apply to this stage in one PNG; returns their titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    length_title = "segment length (tokens)" if stats.stage == "pack" else "example length (tokens)"
    panels = [
        (length_title, stats.lengths, _histogram),
        ("segments per row", stats.segments_per_row, _bars),
        ("fill per row", stats.fill_per_row, _histogram),
        ("tokens by kind", stats.tokens_by_kind or None, _kinds),
    ]
    panels = [p for p in panels if p[1] is not None and len(p[1])]
    if not panels:
        raise ValueError(f"nothing to plot for stage {stats.stage!r}")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, values, draw) in zip(axes[0], panels):
        draw(ax, values)
        ax.set_title(title)
    figure.suptitle(f"{stats.stage}: " + ", ".join(f"{k} {v:,}" for k, v in list(stats.totals.items())[:3]))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [p[0] for p in panels]


def _histogram(ax, values: np.ndarray) -> None:
    ax.hist(values, bins=min(50, max(5, len(np.unique(values)))), color="#4c72b0")
    ax.set_ylabel("count")


def _bars(ax, values: np.ndarray) -> None:
    numbers, counts = np.unique(values, return_counts=True)
    ax.bar(numbers, counts, color="#55a868")
    ax.set_ylabel("rows")


def _kinds(ax, tokens_by_kind: dict[str, int]) -> None:
    ax.bar(list(tokens_by_kind), list(tokens_by_kind.values()), color="#c44e52")
    ax.set_ylabel("tokens")
