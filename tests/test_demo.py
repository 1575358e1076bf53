"""`lwm-data demo`: synthetic books and videos through both whole pipelines, a training pack and a few
torchrun steps, offline; every output valid and balanced, the summary names them."""

import json

from typer.testing import CliRunner

from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.validate import validate


def test_inputs_only_writes_the_synthetic_inputs(tmp_path):
    result = CliRunner().invoke(
        app, ["demo", "--output", str(tmp_path), "--inputs-only", "--books", "2", "--videos", "1"]
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "inputs" / "books").glob("*.txt"))) == 2
    assert len(list((tmp_path / "inputs" / "heldout").glob("*.txt"))) == 1
    assert {p.suffix for p in (tmp_path / "inputs" / "videos").iterdir()} == {".mp4", ".txt"}
    assert not (tmp_path / "books").exists()


def test_demo_runs_everything_into_valid_outputs_and_trains(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--books", "3", "--words", "30000", "--videos", "2", "--steps", "3"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})  # one summary line each
    assert result.exit_code == 0, result.output
    for directory in (
        "books/chunk",
        "books/qa",
        "books/chat",
        "books/text",
        "books/pack",
        "video/video",
        "video/pack",
        "train-pack",
    ):
        manifest = outputs.read_manifest(str(out / directory))
        assert manifest["counts"]["balanced"] and manifest["counts"]["out"] > 0, directory
        assert not validate(str(out / directory)), directory
    assert outputs.read_manifest(str(out / "video/video"))["vqgan"]["random_weights"]  # said, and recorded

    rows = outputs.read_table(str(out / "train-pack"), ["tokens", "kinds"])
    assert {len(tokens) for tokens in rows["tokens"].to_pylist()} == {1024}
    kinds = {kind for row in rows["kinds"].to_pylist() for kind in row}
    assert "text" in kinds and kinds & {"video_text", "text_video"}

    records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    metrics = [r for r in records if "loss" in r]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] > 0 for m in metrics)
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3]  # the held-out book, before and after
    assert (out / "stats.png").stat().st_size > 0 and (out / "train" / "loss.png").stat().st_size > 0
    assert not validate(str(out / "heldout" / "pack"))
    for name in ("books/pack", "video/pack", "train-pack", "loss", "held-out loss", str(out / "train")):
        assert name in result.output
