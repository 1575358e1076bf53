"""The registry and the stage shape: every stage registered once, its CLI derived from its config,
and the stage transforms fused into ONE Beam pipeline with per-stage balanced counts."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from lwm_data import config as settings
from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.validate import validate
from lwm_data.errors import ConfigError
from lwm_data.pipelines import chunk, pack
from lwm_data.pipelines.registry import STAGES, markdown_table
from lwm_data.recipes import books, run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(STAGES))
def test_every_setting_of_every_stage_is_an_option_with_the_same_default(name):
    stage = STAGES[name]
    command = get_command(app).commands[name]
    params = {p.name: p for p in command.params}
    for option in settings.options(stage.config):
        param = params[option.name]
        assert f"--{option.name.replace('_', '-')}" in param.opts + getattr(param, "secondary_opts", [])
        assert set(option.flags) <= set(param.opts)
        if option.required:
            assert param.required
        else:
            given = param.default
            value = (() if option.repeat else None) if given is None else option.coerce(given)
            assert value == option.default, f"{name} --{option.name}: CLI default {given!r} != {option.default!r}"
        assert param.help == option.help and option.help, f"{name} --{option.name} has no help"


def test_the_readme_stage_table_is_the_registry():
    assert markdown_table() in (REPO / "README.md").read_text()


def test_settings_from_toml_values_and_their_errors():
    config = settings.build(
        pack.PackConfig,
        {"input": ["a", "b"], "output": "o", "seq_len": 8192, "mix": {"chat": 0.84, "text": 0.16}, "buffer_size": 100},
    )
    assert config.input == ("a", "b") and config.packing.mix == {"chat": 0.84, "text": 0.16}
    assert settings.flat(config)["input"] == ["a", "b"] and settings.flat(config)["buffer_size"] == 100
    assert settings.build(pack.PackConfig, settings.flat(config)) == config  # what a manifest records, back
    with pytest.raises(ConfigError, match="unknown settings \\['seq_length'\\]"):
        settings.build(pack.PackConfig, {"input": "a", "output": "o", "seq_length": 5})
    with pytest.raises(ConfigError, match="missing required settings: seq_len"):
        settings.build(pack.PackConfig, {"input": "a", "output": "o"})
    with pytest.raises(ConfigError, match="chunk_tokens must be int"):
        settings.build(chunk.ChunkConfig, {"input": "a", "output": "o", "chunk_tokens": "many"})


@dataclass(frozen=True)
class Inner:
    seed: int = settings.setting(0, "inner seed")


@dataclass(frozen=True)
class Outer:
    seed: int = settings.setting(0, "outer seed")
    inner: Inner = settings.nested(Inner)


def test_option_names_are_unique_across_nested_configs():
    with pytest.raises(TypeError, match="used twice: \\['seed'\\]"):
        settings.options(Outer)


def test_stages_fuse_into_one_pipeline_with_balanced_counts_per_stage(books_jsonl, tmp_path):
    out = {name: str(tmp_path / name) for name in ("chunks", "qa", "chat", "text", "packed")}
    document = {
        "chunk": {"input": str(books_jsonl), "output": out["chunks"]},
        "qa": {"output": out["qa"]},
        "chat": {"output": out["chat"], "context_lengths": [4096], "pairs_per_example": 2},
        "text": {"output": out["text"]},
        "pack": {"output": out["packed"], "seq_len": 4096, "overflow": "split", "mix": {"chat": 0.84, "text": 0.16}},
    }
    job = books.job(run.stage_configs(run.PIPELINES["books"], document))
    manifests = job.run()
    assert [m["stage"] for m in manifests] == ["chunk", "qa", "chat", "text", "pack"]
    for manifest, directory in zip(manifests, out.values()):
        assert manifest["counts"]["balanced"] and manifest["counts"]["out"] > 0, manifest["stage"]
        assert not validate(directory)
    chunk_m, qa_m, chat_m, text_m, pack_m = manifests
    assert qa_m["counts"]["in"] == chunk_m["stats"]["chunks"]  # every chunk asked once, in its own namespace
    assert text_m["counts"]["in"] == chunk_m["counts"]["out"]  # one text example per book
    assert pack_m["counts"]["in"] == chat_m["stats"]["examples"] + text_m["counts"]["out"]
    assert qa_m["config"]["input"] == out["chunks"] and pack_m["config"]["input"] == [out["chat"], out["text"]]
    assert pack_m["packing"]["tokens_by_kind"].keys() == {"chat", "text"}
    alone = chunk.run(chunk.ChunkConfig(input=str(books_jsonl), output=str(tmp_path / "alone")))
    assert alone["counts"] == chunk_m["counts"] and alone["stats"] == chunk_m["stats"]
    key = [("book_id", "ascending"), ("chunk_index", "ascending")]
    assert (
        outputs.read_table(out["chunks"]).sort_by(key).equals(outputs.read_table(str(tmp_path / "alone")).sort_by(key))
    )


def test_a_stage_command_reports_a_bad_setting_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        app, ["qa", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--backend", "nope"]
    )
    assert result.exit_code == 2 and "backend must be one of" in result.output
    result = CliRunner().invoke(app, ["qa", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not the output of a finished lwm-data stage" in result.output


def test_typer_sees_derived_signatures():
    command = get_command(app).commands["chunk"]
    assert {"input", "output", "chunk_tokens", "max_record_bytes"} <= {p.name for p in command.params}
    assert inspect.signature(command.callback).parameters["ctx"].annotation is typer.Context


@pytest.mark.slow
def test_a_local_run_prints_no_beam_noise(tmp_path):
    """Beam's "apitools not found" and "Resource module is not available" lines mean nothing to a user."""
    import subprocess
    import sys

    from lwm_data.testing.media import make_video

    make_video(tmp_path / "v.mp4", frames=2)
    (tmp_path / "v.txt").write_text("a clip")
    command = [
        sys.executable,
        "-m",
        "lwm_data.cli",
        "video",
        "--input",
        str(tmp_path / "*.mp4"),
        "--output",
        str(tmp_path / "out"),
        "--random-config",
        "reduced",
        "--max-frames",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "apitools" not in result.stderr and "Resource module" not in result.stderr
    assert "RANDOM weights" in result.stderr  # the warning that does matter stays


def test_a_mistyped_option_is_refused_not_passed_to_beam(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["chunk", "--input", "x", "--output", "y", "--chunk-tokenz", "5"])
    assert result.exit_code == 2 and "did you mean --chunk-tokens?" in result.output
    result = CliRunner().invoke(app, ["run", "books", "--config", "c.toml", "--nonsense"])
    assert result.exit_code == 2 and "unknown option --nonsense" in result.output
