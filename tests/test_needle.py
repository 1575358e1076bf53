"""Needle-in-a-haystack eval set: needles, insertion points, rows, scoring, grid and heatmap, CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.validate import validate
from lwm_data.schemas import NEEDLE_SCHEMA
from lwm_data.text.needle import (
    CITIES,
    MULTI_TEMPLATE,
    SINGLE_TEMPLATE,
    AccuracyGrid,
    NeedleConfig,
    accuracy_grid,
    draw_needles,
    needle_rows,
    plot_grid,
    question_for,
    read_responses,
    score_rows,
    sentence_end_before,
)
from lwm_data.tokenizers import load_tokenizer

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def single_rows(synthetic_books, tokenizer):
    config = NeedleConfig((2048, 6000), DEPTHS, rounds=2, seed=5)
    return list(needle_rows([b.text for b in synthetic_books], tokenizer, config))


@pytest.fixture(scope="module")
def multi_rows(synthetic_books, tokenizer):
    config = NeedleConfig((4096,), DEPTHS, num_needles=4, num_retrieve=2, seed=5)
    return list(needle_rows([b.text for b in synthetic_books], tokenizer, config))


def test_cities_are_distinct_and_lwms():
    assert len(CITIES) == len(set(CITIES)) >= 60
    assert {"Chicago", "Ho Chi Minh City", "Jakarta"} <= set(CITIES)


def test_sentence_end_before():
    text = "He said “Go.” Then 3.14 rose! Mr. X left"
    assert sentence_end_before(text, len(text)) == text.index("Mr.") + 3
    assert sentence_end_before(text, text.index("Mr.")) == text.index("rose!") + 5
    assert sentence_end_before(text, text.index("rose!")) == text.index("”") + 1
    assert sentence_end_before(text, 5) == 0
    assert sentence_end_before("Ends here.", 10) == 10


def test_rows_match_the_schema_and_fit(single_rows, multi_rows):
    for rows in (single_rows, multi_rows):
        table = pa.Table.from_pylist(rows, schema=NEEDLE_SCHEMA)
        assert table.num_rows == len(rows)
        for row in rows:
            assert row["num_tokens"] <= row["context_length"] - 64
            assert row["num_tokens"] > row["context_length"] - 64 - 200  # the haystack fills the context
    assert len(single_rows) == 2 * len(DEPTHS) * 2


def test_needle_sits_right_after_a_sentence_end_at_its_depth(single_rows):
    for row in single_rows:
        (position,) = row["needle_char_positions"]
        needle = row["needles"][0]
        prompt = row["prompt"]
        assert prompt[position:].startswith(f"The special magic {needle['city']} number is: {needle['number']}\n")
        assert prompt[position - 1] == "\n"
        context_start = SINGLE_TEMPLATE.index("{context}")
        before = prompt[context_start : position - 1]
        assert before == "" or before.rstrip("\"'\u201d\u2019)")[-1] in ".!?"
        context_end = prompt.index(f" {row['question']} Don't give")
        depth = (position - context_start) / (context_end - context_start)
        assert depth == pytest.approx(row["depth"], abs=0.05)
        assert row["question"] == f"What is the special magic {needle['city']} number?"
        assert row["answer"] == needle["number"] and len(needle["number"]) == 7
        assert prompt.startswith("You are a helpful assistant. USER: ") and prompt.endswith(" ASSISTANT: ")


def test_multi_needle_rows(multi_rows):
    for row in multi_rows:
        cities = [n["city"] for n in row["needles"]]
        assert len(set(cities)) == 4 and len({n["number"] for n in row["needles"]}) == 4
        assert len(row["retrieve"]) == 2 and cities[0] in row["retrieve"] and set(row["retrieve"]) <= set(cities)
        assert row["needle_depths"][0] == row["depth"]
        for needle, position in zip(row["needles"], row["needle_char_positions"]):
            assert row["prompt"][position:].startswith(
                f"The special magic {needle['city']} number is: {needle['number']}"
            )
        numbers = {n["city"]: n["number"] for n in row["needles"]}
        assert row["answer"] == ", ".join(numbers[c] for c in row["retrieve"])
        assert (
            row["question"] == question_for(row["retrieve"])
            and "What are the special magic numbers for" in row["question"]
        )
        assert row["prompt"].endswith(MULTI_TEMPLATE.split("{question}")[1])


def test_deterministic_for_a_seed(single_rows, synthetic_books, tokenizer):
    again = list(
        needle_rows([b.text for b in synthetic_books], tokenizer, NeedleConfig((2048, 6000), DEPTHS, rounds=2, seed=5))
    )
    assert again == single_rows
    needles, _ = draw_needles(random.Random("other"), 0.5, 1, 1)
    assert needles[0].depth == 0.5


def test_scoring_grid_and_heatmap(single_rows, tmp_path):
    responses = {
        r["example_id"]: f"The number is {r['answer']}." if r["depth"] < 0.5 else "I don't know." for r in single_rows
    }
    del responses[single_rows[0]["example_id"]]
    scored, missing = score_rows(single_rows, responses)
    assert missing == [single_rows[0]["example_id"]]
    grid = accuracy_grid(scored)
    assert grid.context_lengths == [2048, 6000] and grid.depths == list(DEPTHS)
    assert grid.accuracy[:, :2].tolist() == [[1, 1], [1, 1]] and (grid.accuracy[:, 2:] == 0).all()
    assert grid.counts.sum() == len(single_rows) - 1
    png = tmp_path / "grid.png"
    plot_grid(grid, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    partial = AccuracyGrid([1], [0.0, 1.0], np.array([[0.5, np.nan]]), np.array([[2, 0]]))
    assert partial.to_json()["accuracy"] == [[0.5, None]]


def test_read_responses():
    lines = [
        json.dumps({"example_id": "a", "response": "1"}),
        json.dumps({"id": "b", "response": "2"}),
        "{bad",
        json.dumps({"id": "c"}),
        "",
    ]
    assert read_responses(lines) == ({"a": "1", "b": "2"}, 2)


def test_read_responses_counts_lines_json_cannot_parse():
    lines = ["[" * 100_000, '{"id": "a", "response": ' + "1" * 5000 + "}", json.dumps({"id": "b", "response": "7"})]
    assert read_responses(lines) == ({"b": "7"}, 2)


def test_cli_needle_and_needle_score(books_jsonl, tmp_path):
    runner = CliRunner()
    out = tmp_path / "needle"
    haystack = tmp_path / "haystack"
    haystack.mkdir()
    (haystack / "books.jsonl").write_bytes(books_jsonl.read_bytes())
    (haystack / "bad.jsonl").write_bytes(b'{"text": 3}\nnot json\n')
    result = runner.invoke(
        app,
        [
            "needle",
            "--haystack",
            str(haystack / "*.jsonl"),
            "--output",
            str(out),
            "--context",
            "1024,3000",
            "--depths",
            "0,0.5,1",
            "--needles",
            "3",
            "--retrieve",
            "2",
            "--seed",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = outputs.read_table(str(out)).to_pylist()
    counts = outputs.read_manifest(str(out))["counts"]
    assert len(rows) == 6 and counts["balanced"]
    assert counts["dead_lettered_by_reason"] == {"invalid_json": 1, "text_not_string": 1}
    assert {d["source"] for d in outputs.read_dead_letters(str(out))} == {str(haystack / "bad.jsonl")}
    assert not validate(str(out))
    responses = tmp_path / "responses.jsonl"
    responses.write_text("\n".join(json.dumps({"example_id": r["example_id"], "response": r["answer"]}) for r in rows))
    result = runner.invoke(app, ["needle-score", "--needles", str(out), "--responses", str(responses)])
    assert result.exit_code == 0, result.output
    assert "mean accuracy 1.000" in result.output
    assert (tmp_path / "responses.jsonl.accuracy.png").stat().st_size > 1000


def test_a_haystack_too_short_for_the_context_length_is_refused(tokenizer):
    """Rows must hold the context length they claim, not whatever the books ran out at."""
    books = ["A short book. It ends soon."] * 3
    with pytest.raises(ValueError, match="too few for context length 4096"):
        list(needle_rows(books, tokenizer, NeedleConfig((4096,), (0.5,))))
