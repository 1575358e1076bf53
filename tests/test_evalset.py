"""Long-context eval sets (RULER's task families): every task's lengths, answers, depths, determinism
and haystack use; the stage end to end (validate, pack, the trainer's reader, RULER JSONL); scoring."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from lwm_data import config as settings
from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.validate import validate
from lwm_data.errors import ConfigError
from lwm_data.schemas import EVALSET_SCHEMA, RESPONSES_SCHEMA
from lwm_data.text.evalscore import grids, scored_rows, string_match_all, string_match_part, summary
from lwm_data.text.evalset import (
    NIAH_TASKS,
    TASKS,
    EvalsetConfig,
    build_haystack,
    evalset_rows,
    rows_table,
)
from lwm_data.tokenizers import bos_prefix, load_tokenizer
from tests.helpers import write_output

LENGTHS = (2048, 6000)
DEPTHS = (0.0, 0.5, 1.0)
TEXT_TASKS = TASKS[:-1]


@pytest.fixture(scope="module", params=["default", "llama2"])
def tokenizer(request):
    if request.param == "default":
        return load_tokenizer(None)
    return load_tokenizer(str(request.getfixturevalue("llama2_tokenizer_path")))


@pytest.fixture(scope="module")
def books(synthetic_books):
    return [(b.id, b.text) for b in synthetic_books]


@pytest.fixture(scope="module")
def rows(books, tokenizer):
    config = EvalsetConfig(LENGTHS, DEPTHS, samples=2, seed=3, key_type="words", value_type="numbers")
    return list(evalset_rows(books, tokenizer, config))


def test_every_task_and_grid_point_is_there(rows):
    per_task = {t: sum(r["task"] == t for r in rows) for t in TEXT_TASKS}
    for task in NIAH_TASKS:
        assert per_task[task] == 2 * len(LENGTHS) * len(DEPTHS)
    for task in ("variable_tracking", "common_words", "frequent_words"):
        assert per_task[task] == 2 * len(LENGTHS)
    assert len({r["example_id"] for r in rows}) == len(rows)
    assert rows_table(rows).schema.equals(EVALSET_SCHEMA)


def test_lengths_are_exact_in_the_tokenizer(rows, tokenizer):
    for row in rows[:: max(1, len(rows) // 12)] + [r for r in rows if r["context_length"] == 6000][:3]:
        encoded = bos_prefix(tokenizer) + tokenizer.encode(row["prompt"])
        assert len(encoded) == row["prompt_tokens"] and list(row["tokens"][: row["prompt_tokens"]]) == encoded
    for row in rows:
        budget = row["context_length"] - 128
        assert budget - 80 < row["prompt_tokens"] <= budget, (row["example_id"], row["prompt_tokens"])
        assert row["num_tokens"] <= row["context_length"] and row["num_tokens"] == len(row["tokens"])
        weights = row["loss_weights"]
        assert not weights[: row["prompt_tokens"]].any() and weights[row["prompt_tokens"] :].all()
        answer = tokenizer.decode(row["tokens"][row["prompt_tokens"] :])
        assert all(a in answer for a in row["answers"])


def test_expected_answers_occur_once_and_sit_at_their_depth(rows):
    for row in rows:
        prompt = row["prompt"]
        if row["task"] in NIAH_TASKS:
            meta = row["meta"]
            for value in row["answers"]:
                assert prompt.count(value) == 1, (row["example_id"], value)
            assert len(row["answers"]) == {"niah_single": 1, "niah_multikey": 1}.get(row["task"], 4)
            needle = f"One of the special magic numbers for {meta['keys'][0]} is: {meta['values'][0]}."
            position = prompt.index("\n" + needle + "\n") + 1
            start = prompt.index("afterwards.\n") + len("afterwards.\n")
            end = prompt.rindex("\nWhat ")
            assert (position - start) / (end - start) == pytest.approx(row["depth"], abs=0.05)
            before = prompt[start : position - 1]
            assert before == "" or before.rstrip("\"'\u201d\u2019)\n")[-1] in ".!?"
        elif row["task"] == "variable_tracking":
            value = row["meta"]["value"]
            assert prompt.count(f"= {value}\n") == 1 and row["depth"] is None
            names = row["answers"]
            assert len(names) == 5 and all(re.fullmatch("[A-Z]{5}", n) for n in names)
            positions = [prompt.index(f"VAR {n} = ") for n in names]
            assert positions == sorted(positions)
            assert prompt.count(f"VAR {names[-1]}") == 1  # the end of the chain is named once
        elif row["task"] == "common_words":
            entries = re.findall(r"\d+\. ([a-z]+)", prompt.split("\n")[1])
            counts = {w: entries.count(w) for w in set(entries)}
            common = set(row["answers"])
            assert len(common) == 10 and min(counts[w] for w in common) > max(
                c for w, c in counts.items() if w not in common
            )
        elif row["task"] == "frequent_words":
            words = re.findall(r"\b[a-z]{6}\b", prompt[prompt.index("words. ") : prompt.rindex("\nQuestion")])
            counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
            assert [w for _, w in counts[:3]] == row["answers"] and counts[2][0] > counts[3][0]


def test_no_haystack_text_repeats_within_a_prompt(rows, books, tokenizer):
    """A prompt's haystack, inserted lines removed, is one run of the rotated books' text from its start."""
    haystacks = {}
    for row in rows:
        if row["task"] not in (*NIAH_TASKS, "variable_tracking"):
            continue
        sample = int(row["example_id"].rsplit("-", 1)[1])
        if sample not in haystacks:
            rotated = books[sample:] + books[:sample]
            haystacks[sample] = build_haystack([t for _, t in rotated], tokenizer, 10**9).text
        prompt = row["prompt"]
        start = prompt.index("\n") + 1 if row["task"] != "variable_tracking" else prompt.index("\n\n") + 2
        end = prompt.rindex("\nWhat ") if row["task"] != "variable_tracking" else prompt.rindex("\nQuestion: ")
        context = prompt[start:end]
        context = re.sub(r"\nOne of the special magic numbers for [a-z-]+ is: \d+\.\n", "", context)
        context = re.sub(r"\nVAR [A-Z]{5} = (VAR [A-Z]{5}|\d+)\n", "", context)
        assert haystacks[sample].startswith(context), row["example_id"]
        assert len(context) > 0.8 * (row["context_length"] - 128) * 3


def test_deterministic_for_a_seed_and_other_key_types(books, rows, tokenizer):
    config = EvalsetConfig(LENGTHS, DEPTHS, samples=2, seed=3)
    again = list(evalset_rows(books, tokenizer, config))
    assert [r["prompt"] for r in again] == [r["prompt"] for r in rows]
    other = EvalsetConfig((2048,), (0.5,), ("niah_multiquery",), seed=4, key_type="uuids", value_type="uuids")
    (row,) = evalset_rows(books, tokenizer, other)
    assert all(re.fullmatch(r"[0-9a-f-]{36}", a) and row["prompt"].count(a) == 1 for a in row["answers"])
    assert row["prompt"] != next(r for r in rows if r["task"] == "niah_multiquery")["prompt"]


def test_a_haystack_too_short_is_refused(books, tokenizer):
    with pytest.raises(ConfigError, match="never repeated"):
        list(evalset_rows(books[:1], tokenizer, EvalsetConfig((65536,), (0.5,), ("niah_single",))))
    with pytest.raises(ConfigError, match="unknown tasks"):
        list(evalset_rows(books, tokenizer, EvalsetConfig((2048,), tasks=("niah_triple",))))
    with pytest.raises(ConfigError, match="book_qa needs"):
        list(evalset_rows(books, tokenizer, EvalsetConfig((2048,), tasks=("book_qa",))))


# ---- the stage ----


@pytest.fixture(scope="module")
def evalset_dir(tmp_path_factory, books_jsonl):
    from lwm_data.pipelines import evalset

    output = tmp_path_factory.mktemp("evalset")
    values = {"haystack": str(books_jsonl), "output": str(output), "context_lengths": "2048,4096", "depths": "0,1"}
    manifest = evalset.run(settings.build(evalset.EvalsetStageConfig, values))
    assert manifest["stats"]["prompts"] == 2 * (4 * 2 + 3) and manifest["counts"]["balanced"]
    return output


def test_stage_output_validates_and_packs_for_the_trainer(evalset_dir, tmp_path):
    from lwm_data.pipelines import pack
    from lwm_data.train.data import PackedDataset

    assert not validate(str(evalset_dir))
    table = outputs.read_table(str(evalset_dir))
    assert set(table["kind"].to_pylist()) == {"eval"}
    packed = tmp_path / "packed"
    pack.run(settings.build(pack.PackConfig, {"input": str(evalset_dir), "output": str(packed), "seq_len": 4096}))
    assert not validate(str(packed))
    answer_tokens = sum(int(np.sum(w)) for w in table["loss_weights"].to_numpy(zero_copy_only=False))
    stream = list(PackedDataset(str(packed), shuffle=False, vocabulary=(32000, 8448)))
    assert sum(float(row["loss_weights"].sum()) for row in stream) == answer_tokens > 0


def test_the_trainer_reports_the_answer_loss_of_each_task_length_and_depth(evalset_dir, tmp_path):
    import contextlib

    import torch

    from lwm_data.examples import eval_group
    from lwm_data.pipelines import pack
    from lwm_data.train.evaluate import Evaluator
    from lwm_data.train.model import Transformer, preset
    from lwm_data.train.parallel import Parallel

    packed = tmp_path / "packed"
    pack.run(settings.build(pack.PackConfig, {"input": str(evalset_dir), "output": str(packed), "seq_len": 4096}))
    torch.manual_seed(0)
    model = Transformer(preset("tiny", attention_backend="torch", vision_vocab_size=0)).eval()
    evaluate = Evaluator(
        str(packed), batches=100, batch_size=2, par=Parallel(torch.device("cpu"), None), vocabulary=None
    )
    record = evaluate(model, 4096, contextlib.nullcontext())
    groups = {eval_group(i) for i in outputs.read_table(str(evalset_dir))["example_id"].to_pylist()}
    assert set(record["eval_loss_by_group"]) == groups and len(groups) == 2 * (4 * 2 + 3)
    assert "niah_single-2048-0" in groups and "variable_tracking-4096" in groups
    losses = list(record["eval_loss_by_group"].values())
    assert all(np.isfinite(losses)) and min(losses) <= record["eval_loss"] <= max(losses)


def test_validate_counts_a_row_without_answers(evalset_dir, tmp_path):
    table = outputs.read_table(str(evalset_dir))
    broken = table.set_column(
        table.schema.get_field_index("answers"),
        table.schema.field("answers"),
        pa.array([[]] * table.num_rows, pa.list_(pa.string())),
    )
    write_output(tmp_path / "broken", "evalset", broken)
    assert validate(str(tmp_path / "broken"))["no expected answers"] == table.num_rows


def test_ruler_jsonl_export(evalset_dir, tmp_path):
    result = CliRunner().invoke(app, ["export-ruler", "--input", str(evalset_dir), "--output", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "r" / "2048" / "niah_single" / "validation.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2 and [r["index"] for r in records] == [0, 1]
    assert all(set(r) >= {"input", "outputs", "length"} and r["length"] <= 2048 - 128 for r in records)
    assert (tmp_path / "r" / "4096" / "frequent_words" / "validation.jsonl").exists()


def test_book_qa_from_chunks_and_cloze_pairs(chunks_dir, tmp_path):
    from lwm_data.pipelines import evalset, qa

    qa.run(qa.QAConfig(input=str(chunks_dir), output=str(tmp_path / "qa")))
    values = {
        "haystack": str(chunks_dir),
        "qa": str(tmp_path / "qa"),
        "output": str(tmp_path / "ev"),
        "context_lengths": "4096",
        "depths": "0,0.5,1",
        "tasks": "book_qa,niah_single",
        "samples": 2,
    }
    evalset.run(settings.build(evalset.EvalsetStageConfig, values))
    assert not validate(str(tmp_path / "ev"))
    rows = [r for r in outputs.read_table(str(tmp_path / "ev")).to_pylist() if r["task"] == "book_qa"]
    assert len(rows) == 6
    chunks = outputs.read_table(str(chunks_dir), ["book_id", "chunk_index", "text"]).to_pylist()
    text_of = {(c["book_id"], c["chunk_index"]): c["text"] for c in chunks}
    for row in rows:
        meta = json.loads(row["meta"])
        gold = text_of[(meta["book_id"], meta["chunk_index"])]
        blocks = re.split(r"\n\nDocument \d+:\n", "\n\n" + row["prompt"].split("given documents.\n\n", 1)[1])[1:]
        blocks[-1] = blocks[-1].split("\n\nAnswer the question")[0]
        assert blocks[meta["gold_document"] - 1] == gold and len(blocks) == meta["documents"]
        assert len(set(blocks)) == len(blocks)  # no chunk twice
        others = {b for b in blocks if b != gold}
        assert not any(text_of.get((meta["book_id"], i)) in others for i in range(200))  # other books only
        assert row["answers"][0] in gold and row["prompt_tokens"] <= 4096 - 128
        assert row["prompt"].endswith(" Answer:")
    with pytest.raises(ConfigError, match="book_qa needs"):
        evalset.run(settings.build(evalset.EvalsetStageConfig, {**values, "qa": None}))


# ---- scoring ----


def test_ruler_metrics():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_all("ABCDE, fghij", ["abcde", "FGHIJ"]) == 1.0
    assert string_match_part("It was Velmont.", ["velmont", "Cardell"]) == 1.0
    assert string_match_part("No idea.", ["velmont"]) == 0.0


def _responses(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{**r, "model": "hand", "finish_reason": "stop"} for r in rows], schema=RESPONSES_SCHEMA
    )


def test_eval_score_from_hand_made_responses(tmp_path):
    rows = []
    for length in (2048, 4096):
        for depth in (0.0, 1.0):
            right = length == 2048 or depth == 0.0
            rows.append(
                {
                    "example_id": f"niah_single-{length}-{depth:g}-0",
                    "task": "niah_single",
                    "context_length": length,
                    "depth": depth,
                    "answers": ["1234567"],
                    "response": " 1234567." if right else " 7654321.",
                }
            )
        rows.append(
            {
                "example_id": f"variable_tracking-{length}-0",
                "task": "variable_tracking",
                "context_length": length,
                "depth": None,
                "answers": ["AAAAA", "BBBBB", "CCCCC", "DDDDD"],
                "response": "aaaaa BBBBB" if length == 2048 else "AAAAA BBBBB CCCCC DDDDD",
            }
        )
        rows.append(
            {
                "example_id": f"book_qa-{length}-0.5-0",
                "task": "book_qa",
                "context_length": length,
                "depth": 0.5,
                "answers": ["Velmont"],
                "response": "in velmont" if length == 4096 else "nowhere",
            }
        )
    scored = scored_rows(rows)
    expected = {
        "tasks": {
            "niah_single": {"2048": 1.0, "4096": 0.5},
            "variable_tracking": {"2048": 0.5, "4096": 1.0},
            "book_qa": {"2048": 0.0, "4096": 1.0},
        },
        "average": {"2048": 0.5, "4096": 0.8333},
    }
    assert summary(scored) == expected
    grid = grids(scored)["niah_single"]
    assert grid.depths == [0.0, 1.0] and grid.accuracy.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert np.isnan(grids(scored)["variable_tracking"].depths[0])

    responses = write_output(tmp_path / "responses", "eval-run", _responses(rows))
    scores = tmp_path / "scores"
    result = CliRunner().invoke(app, ["eval-score", "--input", responses, "--output", str(scores)])
    assert result.exit_code == 0, result.output
    assert json.loads((scores / "summary.json").read_text()) == expected
    assert "average" in result.output and "0.833" in result.output
    for task in expected["tasks"]:
        assert (scores / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((scores / "scores.jsonl").read_text().splitlines()) == len(rows)


def test_eval_score_refuses_other_outputs(tmp_path):
    other = write_output(tmp_path / "needle", "needle", pa.table({"x": [1]}))
    result = CliRunner().invoke(app, ["eval-score", "--input", other, "--output", str(tmp_path / "s")])
    assert result.exit_code == 2 and "eval-run" in result.output
