"""`lwm-data run books|video --config TOML`: one Beam job per pipeline, settings from the stage
configs, flag overrides, intermediate outputs optional, every stage's counts in the final manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.validate import validate
from lwm_data.errors import ConfigError
from lwm_data.recipes import run
from tests.media import make_video

REPO = Path(__file__).resolve().parents[1]


def books_toml(path: Path, books: Path, output: Path) -> Path:
    path.write_text(f"""
output = "{output}"
[chunk]
input = "{books}"
[qa]
backend = "cloze"
[chat]
context_lengths = [4096]
pairs_per_example = 2
[text]
[pack]
seq_len = 4096
overflow = "split"
mix = {{ chat = 0.84, text = 0.16 }}
""")
    return path


def test_overrides_and_beam_options_are_told_apart():
    overrides, beam_args = run.split_overrides(
        [
            "--qa.backend",
            "cloze",
            "--pack.seq-len=8192",
            "--chat.context-lengths",
            "4096,8192",
            "--runner",
            "DirectRunner",
            "--direct_num_workers=2",
        ],
        run.PIPELINES["books"],
    )
    assert overrides == {
        "qa": {"backend": "cloze"},
        "pack": {"seq_len": 8192},
        "chat": {"context_lengths": (4096, 8192)},
    }
    assert beam_args == ["--runner", "DirectRunner", "--direct_num_workers=2"]
    with pytest.raises(ConfigError, match="true or false"):
        run.split_overrides(["--video.one-vocabulary", "maybe"], run.PIPELINES["video"])


def test_each_stage_has_its_own_dead_letter_policy():
    books = run.PIPELINES["books"]
    overrides, _ = run.split_overrides(["--chunk.max-dead-fraction", "0.9"], books)
    configs = run.stage_configs(books, {"output": "o", "chunk": {"input": "b"}, "pack": {"seq_len": 4096}}, overrides)
    assert {stage: c.policy.max_dead_fraction for stage, c in configs.items()} == {
        "chunk": 0.9,
        "qa": 0.5,
        "chat": 0.5,
        "text": 0.5,
        "pack": 0.5,
    }


def test_config_errors_say_what_to_change():
    books = run.PIPELINES["books"]
    base = {"output": "o", "chunk": {"input": "b"}, "pack": {"seq_len": 4096}}
    assert run.stage_configs(books, base)["qa"].input == "o/chunk"
    with pytest.raises(ConfigError, match="unknown tables or keys \\['packing'\\]"):
        run.stage_configs(books, {**base, "packing": {}})
    with pytest.raises(ConfigError, match="\\[qa\\] input: set by the pipeline"):
        run.stage_configs(books, {**base, "qa": {"input": "elsewhere"}})
    with pytest.raises(ConfigError, match="\\[pack\\] unknown settings \\['seq_length'\\]"):
        run.stage_configs(books, {**base, "pack": {"seq_length": 4096}})
    with pytest.raises(ConfigError, match="\\[pack\\] missing required settings: seq_len"):
        run.stage_configs(books, {"output": "o", "chunk": {"input": "b"}})


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_build(path):
    pipelines = [p for p in run.PIPELINES.values() if p.stages[0] in run.load(str(path))]
    if not pipelines:
        pytest.skip("not a data pipeline config (the trainer's)")
    (pipeline,) = pipelines
    configs = run.stage_configs(pipeline, run.load(str(path)))
    assert list(configs) == list(pipeline.stages)


@pytest.mark.slow
def test_books_pipeline_writes_only_packed_rows_with_every_stages_counts(books_jsonl, tmp_path):
    output = tmp_path / "out"
    config = books_toml(tmp_path / "books.toml", books_jsonl, output)
    result = CliRunner().invoke(app, ["run", "books", "--config", str(config), "--pack.seed", "3"])
    assert result.exit_code == 0, result.output
    assert "run books: every stage" in result.output
    assert sorted(p.name for p in output.iterdir()) == ["pack"]  # no intermediate outputs
    assert sorted(p.name for p in (output / "pack").iterdir() if not p.name.startswith("_")) == [
        "manifest.json",
        outputs.read_manifest(str(output / "pack"))["run"],
    ]
    assert not list((output / "pack").glob("_scratch/*/run-*"))  # scratch shards are gone
    manifest = outputs.read_manifest(str(output / "pack"))
    stages = manifest["pipeline"]["stages"]
    assert list(stages) == ["chunk", "qa", "chat", "text"] and all(c["balanced"] for c in stages.values())
    assert manifest["config"]["seed"] == 3 and manifest["config"]["seq_len"] == 4096
    assert manifest["counts"]["in"] > stages["text"]["out"] == stages["chunk"]["out"]  # chats + one text per book
    assert not validate(str(output / "pack"))


@pytest.mark.slow
def test_books_all_filtered_commit_empty_outputs_with_one_warning_naming_the_cause(books_jsonl, tmp_path, caplog):
    config = books_toml(tmp_path / "books.toml", books_jsonl, tmp_path / "elsewhere")
    output = tmp_path / "out"
    args = ["--chunk.min-book-tokens", str(10**9)]
    manifests = run.run("books", str(config), args, keep_intermediate=True, output=str(output))  # --output wins
    assert [m["config"]["output"] for m in manifests] == [
        str(output / s) for s in ("chunk", "qa", "chat", "text", "pack")
    ]
    assert not (tmp_path / "elsewhere").exists()
    books = manifests[0]["counts"]["in"]
    assert manifests[0]["counts"]["filtered"]["too_short"] == books > 0
    assert all(m["counts"]["balanced"] and m["counts"]["out"] == 0 for m in manifests)
    assert manifests[-1]["packing"]["rows"] == 0 and not validate(str(output / "pack"))
    warned = [r.getMessage() for r in caplog.records if "nothing to do" in r.getMessage()]
    assert warned == [
        f"chunk: nothing to do: none of its {books} input records was kept (filtered too_short: {books}); "
        "an empty output was committed"
    ]


@pytest.mark.slow
def test_video_pipeline_keeps_intermediate_outputs_when_asked(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    make_video(media / "a.mp4", frames=4)
    (media / "a.txt").write_text("a clip")
    (media / "b.mp4").write_bytes(b"")
    (media / "b.txt").write_text("an empty file")
    config = tmp_path / "video.toml"
    config.write_text(f"""
output = "{tmp_path / "out"}"
[video]
input = "{media}"
random_config = "reduced"
max_frames = 2
[pack]
seq_len = 1024
""")
    manifests = run.run("video", str(config), [], keep_intermediate=True)
    assert [m["stage"] for m in manifests] == ["video", "pack"]
    video_manifest, pack_manifest = manifests
    assert video_manifest["vqgan"]["random_weights"] and video_manifest["counts"]["dead_lettered_by_reason"] == {
        "empty_file": 1
    }
    assert pack_manifest["pipeline"]["kept"] == {"video": str(tmp_path / "out" / "video")}
    assert pack_manifest["pipeline"]["stages"]["video"] == video_manifest["counts"]
    assert not validate(str(tmp_path / "out" / "video")) and not validate(str(tmp_path / "out" / "pack"))
    # without keeping it, the video stage's dead letter lands in pack's errors/
    manifests = run.run("video", str(config), ["--pack.output", str(tmp_path / "alone")], keep_intermediate=False)
    letters = outputs.read_dead_letters(str(tmp_path / "alone"))
    assert [(letter["stage"], letter["reason"]) for letter in letters] == [("video", "empty_file")]
    assert not validate(str(tmp_path / "alone"))
    assert json.loads(json.dumps(manifests[-1]["pipeline"]))["kept"] == {}
