"""The chat Beam job end to end on the synthetic books' chunks, plus LWM export/import through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from lwm_data import config as settings
from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.validate import validate
from lwm_data.errors import Rejection
from lwm_data.pipelines import chat
from lwm_data.schemas import QA_SCHEMA
from tests.helpers import write_output

LENGTHS = (4096, 65536)  # the synthetic books (~4K-12K tokens) fill 4K windows, never a 64K one


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory, chunks_dir, synthetic_books):
    """QA shards as the QA stage writes them: one pair per stated fact, none for every 4th chunk,
    a blank pair, and QA for a book that has no chunks."""
    facts = {book.id: book.facts for book in synthetic_books}
    chunks = outputs.read_table(str(chunks_dir), ["book_id", "chunk_index", "text"]).to_pylist()
    rows = []
    for chunk in chunks:
        pairs = [
            {"question": f"What is the {f.relation.replace('_', ' ')} of {f.subject}?", "answer": f.value}
            for f in facts[chunk["book_id"]]
            if f.sentence in chunk["text"]
        ]
        if pairs and chunk["chunk_index"] % 4 != 1:
            rows.append({"book_id": chunk["book_id"], "chunk_index": chunk["chunk_index"], "pairs": pairs})
    rows[0]["pairs"].append({"question": " ", "answer": "nothing"})
    rows.append({"book_id": "ghost-book", "chunk_index": 0, "pairs": [{"question": "Who?", "answer": "Nobody."}]})
    for row in rows:
        row.update(model="test", backend="fixture", prompt_version="v0")
    output = tmp_path_factory.mktemp("qa")
    return write_output(output, "qa", pa.Table.from_pylist(rows, schema=QA_SCHEMA))


def run_chat(chunks_dir, qa_dir, output, seed=0):
    values = dict(
        chunks=str(chunks_dir),
        qa=str(qa_dir),
        output=str(output),
        context_lengths=LENGTHS,
        pairs_per_example=3,
        seed=seed,
    )
    return chat.run(settings.build(chat.ChatStageConfig, values))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, chunks_dir, qa_dir):
    output = tmp_path_factory.mktemp("chat")
    return output, run_chat(chunks_dir, qa_dir, output)


def sorted_rows(directory) -> list[dict]:
    return sorted(outputs.read_table(str(directory)).to_pylist(), key=lambda r: r["example_id"])


def test_counts_balance_per_book_and_length(chat_run, synthetic_books):
    output, manifest = chat_run
    counts = manifest["counts"]
    books = len(synthetic_books) + 1  # + the QA-only ghost book
    assert counts["in"] == books * len(LENGTHS) and counts["balanced"]
    assert counts["out"] == len(synthetic_books)
    assert counts["filtered"] == {"shorter_than_65536": len(synthetic_books)}
    assert counts["dead_lettered_by_reason"] == {"qa_without_chunks": len(LENGTHS)}
    assert manifest["stats"]["examples"] == manifest["stats"]["examples_4096"] == len(outputs.read_table(str(output)))
    assert manifest["stats"]["qa_pairs_blank"] == 1
    assert not validate(str(output))
    assert {d["reason"] for d in outputs.read_dead_letters(str(output))} == {"qa_without_chunks"}


def test_examples_fit_and_carry_loss_only_on_answers(chat_run, chunks_dir):
    output, _ = chat_run
    chunk_counts = {
        r["book_id"]: r["num_chunks"]
        for r in outputs.read_table(str(chunks_dir), ["book_id", "num_chunks"]).to_pylist()
    }
    for row in sorted_rows(output):
        meta = json.loads(row["meta"])
        tokens, weights = np.array(row["tokens"]), np.array(row["loss_weights"])
        assert row["num_tokens"] == len(tokens) <= meta["context_length"] == 4096
        assert tokens[0] == 1 and weights[0] == 0 and tokens[-1] == 2 and weights[-1] == 1
        assert ((tokens == 2) == (weights > 0) & np.r_[weights[1:] == 0, True]).all()  # each weighted run ends in EOS
        assert 0 <= meta["chunk_start"] < meta["chunk_end"] <= chunk_counts[row["source"]]
        assert all(meta["chunk_start"] <= c < meta["chunk_end"] and c % 4 != 1 for c in meta["qa_chunks"])
        assert not any(row["vision_mask"])


def test_deterministic_for_a_seed_through_the_cli(chat_run, chunks_dir, qa_dir, tmp_path):
    output, _ = chat_run
    args = ["chat", "--chunks", str(chunks_dir), "--qa", str(qa_dir), "--output", str(tmp_path / "again")]
    result = CliRunner().invoke(app, args + ["--context", ",".join(map(str, LENGTHS)), "--pairs-per-example", "3"])
    assert result.exit_code == 0, result.output
    assert sorted_rows(tmp_path / "again") == sorted_rows(output)


def test_export_then_import_gives_the_same_examples(chat_run, tmp_path):
    output, _ = chat_run
    jsonl = tmp_path / "chat.jsonl"
    runner = CliRunner()
    exported = runner.invoke(app, ["export-lwm", "--input", str(output), "--output", str(jsonl)])
    assert exported.exit_code == 0, exported.output
    ids = [json.loads(line)["id"] for line in jsonl.read_text().splitlines()]
    imported = runner.invoke(app, ["import-lwm", "--input", str(jsonl), "--output", str(tmp_path / "imported")])
    assert imported.exit_code == 0, imported.output
    back = {json.loads(r["meta"])["line"]: r for r in outputs.read_table(str(tmp_path / "imported")).to_pylist()}
    original = {r["example_id"]: r for r in sorted_rows(output)}
    assert len(back) == len(original) == len(ids)
    for line, example_id in enumerate(ids, start=1):
        for column in ("tokens", "loss_weights", "vision_mask"):
            assert back[line][column] == original[example_id][column]
    assert not validate(str(tmp_path / "imported"))


def test_books_are_rebuilt_from_rows_in_any_order_and_bad_ones_refused(chunks_dir):
    from lwm_data.text.chunking import book_chunks_from_table, split_by_book

    table = outputs.read_table(str(chunks_dir), chat.CHUNK_COLUMNS)
    pieces = dict(split_by_book(table))
    book_id, rows = next(iter(pieces.items()))
    assert set(pieces) == set(table["book_id"].to_pylist())
    shuffled = rows.take(np.random.default_rng(0).permutation(rows.num_rows))
    book = book_chunks_from_table(book_id, pa.concat_tables([shuffled.slice(0, 3), shuffled.slice(3)]))
    assert np.array_equal(book.tokens, np.concatenate([np.array(t, np.int32) for t in rows["tokens"].to_pylist()]))
    assert book.texts == rows["text"].to_pylist() and book.num_chunks == rows.num_rows
    with pytest.raises(Rejection, match="incomplete_book"):
        book_chunks_from_table(book_id, rows.slice(1))
