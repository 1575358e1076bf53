"""`lwm-data stats`: counts and token totals for any stage, and its figures."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.stats import collect_stats
from lwm_data.examples import Examples
from lwm_data.packing import PackOptions
from lwm_data.stats import plot_stats
from lwm_data.testing.packing import pack_examples
from tests.helpers import write_output

SEQ_LEN = 64


def sample_examples() -> Examples:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, SEQ_LEN, 60)
    kinds = ["chat" if i % 3 else "image_text" for i in range(len(lengths))]
    return Examples.from_arrays(
        [f"e{i}" for i in range(len(lengths))],
        kinds,
        [rng.integers(1, 32000, k).astype(np.int32) for k in lengths],
        [np.ones(k) for k in lengths],
        [(np.arange(k) % 2 == 0) & (kind == "image_text") for k, kind in zip(lengths, kinds)],
    )


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory) -> str:
    return write_output(tmp_path_factory.mktemp("examples"), "chat", sample_examples().to_table("test"))


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> str:
    table, _ = pack_examples(sample_examples(), PackOptions(seq_len=SEQ_LEN))
    return write_output(tmp_path_factory.mktemp("packed"), "pack", table)


def test_examples_stats_count_tokens_by_kind(examples_dir):
    examples = sample_examples()
    stats = collect_stats(examples_dir)
    assert stats.totals["examples"] == len(examples)
    assert stats.totals["tokens"] == int(examples.lengths.sum())
    chat = examples.kinds == "chat"
    assert stats.tokens_by_kind == {
        "chat": int(examples.lengths[chat].sum()),
        "image_text": int(examples.lengths[~chat].sum()),
    }


def test_packed_stats_report_fill_and_segments(packed_dir):
    examples = sample_examples()
    stats = collect_stats(packed_dir)
    rows = stats.totals["rows"]
    assert stats.totals["seq_len"] == SEQ_LEN
    assert stats.totals["tokens"] == int(examples.lengths.sum())
    assert stats.totals["fill efficiency"] == pytest.approx(examples.lengths.sum() / (rows * SEQ_LEN), abs=1e-6)
    assert stats.segments_per_row.sum() == len(examples)
    assert stats.totals["vision tokens"] == int(examples.vision_mask.sum())
    assert sorted(stats.lengths.tolist()) == sorted(examples.lengths.tolist())
    assert stats.fill_per_row.max() <= 1.0


def test_chunk_stats(chunks_dir):
    stats = collect_stats(str(chunks_dir))
    table = outputs.read_table(str(chunks_dir), ["book_id", "num_tokens"])
    assert stats.totals == {
        "books": len(set(table["book_id"].to_pylist())),
        "chunks": table.num_rows,
        "tokens": sum(table["num_tokens"].to_pylist()),
    }


def test_plots_the_figures_that_apply(packed_dir, examples_dir, tmp_path):
    packed_png, examples_png = tmp_path / "packed.png", tmp_path / "examples.png"
    assert plot_stats(collect_stats(packed_dir), str(packed_png)) == [
        "segment length (tokens)",
        "segments per row",
        "fill per row",
        "tokens by kind",
    ]
    assert plot_stats(collect_stats(examples_dir), str(examples_png)) == ["example length (tokens)", "tokens by kind"]
    assert packed_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and examples_png.stat().st_size > 1000


def test_stats_command_prints_the_table_and_saves_the_plot(packed_dir, tmp_path):
    png = tmp_path / "stats.png"
    result = CliRunner().invoke(app, ["stats", packed_dir, "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "fill efficiency" in result.output and "segments per row" in result.output
    assert png.exists()
