"""The command line as a user meets it: every command, given a missing input or another stage's
output, says what is wrong in one line (`error: ...`, with what to do) and exits 2, no traceback
(lwm_data.errors.UserError); every `--help` is readable in an 80-column terminal."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lwm_data import config as settings
from lwm_data.cli.main import app
from lwm_data.pipelines import chunk, qa
from lwm_data.pipelines.registry import STAGES
from lwm_data.testing.books import generate_books, write_books_jsonl
from lwm_data.train.__main__ import app as train_app

INPUT_OPTIONS = ("input", "chunks", "qa", "haystack")
VALUES = {"seq_len": "1024", "context_lengths": "1024"}
# The stage outputs a stage must not take (a stage of books takes a stage output directory instead)
WRONG = {"qa": "qa", "text": "qa", "chat": "qa", "vision-sequences": "chunk", "pack": "chunk", "evalset": "qa"}


@pytest.fixture(scope="module")
def outputs_of(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    books = write_books_jsonl(root / "books.jsonl", generate_books(1, 300, seed=2))
    chunk.run(chunk.ChunkConfig(input=str(books), output=str(root / "chunk")))
    qa.run(settings.build(qa.QAConfig, {"input": str(root / "chunk"), "output": str(root / "qa"), "backend": "cloze"}))
    return {"chunk": root / "chunk", "qa": root / "qa"}


def stage_args(stage: str, given: Path, output: Path, outputs_of: dict[str, Path]) -> list[str]:
    args = [stage]
    for option in settings.options(STAGES[stage].config):
        if not option.required:
            continue
        if option.name == "output":
            value = str(output)
        elif option.name in INPUT_OPTIONS:
            value = str(given) if option.name != "chunks" or given.name != "chunk" else str(outputs_of["qa"])
        else:
            value = VALUES[option.name]
        args += [option.cli_flags[0], value]
    return args


def assert_one_line_error(result, *expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    for text in expected:
        assert text in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_missing_input_is_one_line(stage, tmp_path, outputs_of):
    result = CliRunner().invoke(app, stage_args(stage, tmp_path / "nowhere", tmp_path / "out", outputs_of))
    assert_one_line_error(result, str(tmp_path / "nowhere"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", list(STAGES))
def test_another_stages_output_is_one_line_that_names_both(stage, tmp_path, outputs_of):
    wrong = WRONG.get(stage, "chunk")
    result = CliRunner().invoke(app, stage_args(stage, outputs_of[wrong], tmp_path / "out", outputs_of))
    assert_one_line_error(result, str(outputs_of[wrong]), wrong)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "{missing}"],
        ["stats", "{missing}"],
        ["export-lwm", "--input", "{missing}", "--output", "{out}/x.jsonl"],
        ["export-lwm", "--input", "{qa}", "--output", "{out}/x.jsonl"],
        ["vision-decode", "--input", "{missing}", "--output", "{out}"],
        ["vision-decode", "--input", "{qa}", "--output", "{out}"],
        ["convert-vqgan", "--input", "{missing}", "--output", "{out}"],
        ["needle-score", "--needles", "{missing}", "--responses", "{missing}"],
        ["needle-score", "--needles", "{qa}", "--responses", "{missing}"],
        ["run", "books", "--config", "{missing}"],
    ],
    ids=lambda args: " ".join(a for a in args if not a.startswith("{")),
)
def test_tools_say_what_is_missing_or_wrong_in_one_line(args, tmp_path, outputs_of):
    names = {"missing": tmp_path / "nowhere", "out": tmp_path / "out", "qa": outputs_of["qa"]}
    result = CliRunner().invoke(app, [a.format(**names) for a in args])
    assert_one_line_error(result)


COMMANDS = [(app, (name,)) for name in typer.main.get_command(app).commands] + [
    (train_app, ()),
    *((train_app, (name,)) for name in typer.main.get_command(train_app).commands),
]


@pytest.mark.parametrize(
    "cli, command", COMMANDS, ids=[" ".join(("lwm-train",) * (cli is train_app) + c) for cli, c in COMMANDS]
)
def test_help_names_every_option_in_full_at_80_columns(cli, command):
    result = CliRunner().invoke(cli, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and max(map(len, result.output.splitlines())) <= 80
    click_command = typer.main.get_command(cli)
    for name in command:
        click_command = click_command.commands[name]
    for parameter in click_command.params:
        for flag in [*parameter.opts, *parameter.secondary_opts]:
            if flag.startswith("-"):
                assert flag in result.output, flag
