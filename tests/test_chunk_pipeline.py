import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lwm_data import config as settings
from lwm_data import outputs
from lwm_data.cli.main import app
from lwm_data.cli.validate import validate
from lwm_data.errors import Rejection, UnbalancedCounts
from lwm_data.pipelines import chunk
from lwm_data.testing.books import generate_books, write_books_jsonl
from lwm_data.text.books import Book
from lwm_data.tokenizers import load_tokenizer

HUGE_LINE_BYTES = 300 * 1024 * 1024


@pytest.fixture(scope="module")
def messy_input(tmp_path_factory, synthetic_books) -> Path:
    """Good books in three formats, an exact duplicate, an id conflict and every kind of bad record."""
    root = tmp_path_factory.mktemp("messy")
    write_books_jsonl(root / "good.jsonl", synthetic_books[:4])
    with gzip.open(root / "more.jsonl.gz", "wt") as f:
        for book in synthetic_books[4:6] + synthetic_books[:1]:  # the last line duplicates good.jsonl:1
            f.write(json.dumps({"id": book.id, "text": book.text}) + "\n")
        f.write(json.dumps({"id": synthetic_books[0].id, "text": "A different text under a taken id."}) + "\n")
        f.write(json.dumps({"id": synthetic_books[6].id + "-x", "text": "Short book."}) + "\n")
    (root / "book.txt").write_text(synthetic_books[6].text)
    with open(root / "bad.jsonl", "wb") as f:
        f.write(b'{"text": 5}\n{broken\n\xff\xfe\xfd\n{"id": "no-text"}\n{"text": ""}\n')
        f.write(json.dumps({"text": "\x00\x01\x02\x03\x04\x05\x06" * 40}).encode() + b"\n")
        f.write(b'{"text": "' + b"y" * HUGE_LINE_BYTES + b'"}\n')
    (root / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b this is not gzip")
    return root


@pytest.fixture(scope="module")
def messy_output(tmp_path_factory, messy_input):
    output = tmp_path_factory.mktemp("chunks-out")
    config = chunk.ChunkConfig(input=str(messy_input / "*"), output=str(output), min_book_tokens=100)
    return output, chunk.run(config)


def test_counts_balance_and_every_bad_record_is_dead_lettered(messy_output):
    output, manifest = messy_output
    counts = manifest["counts"]
    # 4 (good.jsonl) + 5 (gz) + 1 (txt) + 7 (bad.jsonl) + 1 (corrupt file)
    assert counts["in"] == 18
    assert counts["filtered"] == {"duplicate": 1, "too_short": 1}
    assert counts["dead_lettered_by_reason"] == {
        "binary_content": 1,
        "conflicting_id": 1,
        "empty_text": 1,
        "invalid_json": 1,
        "invalid_utf8": 1,
        "missing_text": 1,
        "record_too_large": 1,
        "text_not_string": 1,
        "unreadable_file": 1,
    }
    assert counts["out"] == 7 and counts["balanced"]
    letters = outputs.read_dead_letters(str(output))
    assert len(letters) == counts["dead_lettered"]
    assert all(letter["stage"] == "chunk" and letter["source"] and letter["reason"] for letter in letters)
    huge = next(letter for letter in letters if letter["reason"] == "record_too_large")
    assert huge["source"].endswith("bad.jsonl") and huge["locator"] == "line 7"


def test_manifest_records_config_tokenizer_and_files(messy_output):
    output, manifest = messy_output
    assert manifest["stage"] == "chunk" and manifest["config"]["chunk_tokens"] == 1000
    assert manifest["tokenizer"]["sha256"] == load_tokenizer().sha256
    on_disk = json.loads((output / "manifest.json").read_text())
    assert on_disk == manifest
    shard_rows = sum(f["rows"] for f in manifest["files"] if f["path"].endswith(".parquet"))
    assert shard_rows == manifest["stats"]["chunks"] > 0
    table = outputs.read_table(str(output))
    assert sum(table["num_tokens"].to_pylist()) == manifest["stats"]["tokens"]


def test_output_is_valid_and_chunks_rebuild_each_book(messy_output, synthetic_books):
    output, _ = messy_output
    assert not validate(str(output))
    table = outputs.read_table(str(output)).sort_by([("book_id", "ascending"), ("chunk_index", "ascending")])
    rows = table.to_pylist()
    first = [r for r in rows if r["book_id"] == synthetic_books[0].id]
    assert "".join(r["text"] for r in first) == synthetic_books[0].text
    tokens = [t for r in first for t in r["tokens"]]
    assert tokens == load_tokenizer().encode(synthetic_books[0].text)
    assert {r["title"] for r in first} == {synthetic_books[0].title}
    txt_book = [r for r in rows if r["title"] == "book"]
    assert txt_book and txt_book[0]["book_id"] != synthetic_books[6].id  # .txt books get a content hash id


def test_readable_by_hugging_face_datasets(messy_output):
    from datasets import load_dataset

    output, manifest = messy_output
    shards = outputs.list_shards(str(output))
    dataset = load_dataset("parquet", data_files=shards, split="train")
    assert len(dataset) == manifest["stats"]["chunks"]
    assert set(dataset.column_names) >= {"book_id", "chunk_index", "tokens", "text"}


def test_length_filters_and_determinism(tmp_path, books_jsonl):
    def run(name, **kwargs):
        config = chunk.ChunkConfig(input=str(books_jsonl), output=str(tmp_path / name), **kwargs)
        return chunk.run(config)

    a, b = run("a", max_book_tokens=9000), run("b", max_book_tokens=9000)
    assert a["counts"] == b["counts"] and a["counts"]["filtered"].get("too_long", 0) > 0
    key = [("book_id", "ascending"), ("chunk_index", "ascending")]
    assert (
        outputs.read_table(str(tmp_path / "a"))
        .sort_by(key)
        .equals(outputs.read_table(str(tmp_path / "b")).sort_by(key))
    )


def test_rerun_replaces_previous_output_and_leaves_no_stale_file(tmp_path, books_jsonl):
    config = chunk.ChunkConfig(input=str(books_jsonl), output=str(tmp_path / "o"), chunk_tokens=500)
    first = chunk.run(config)
    (tmp_path / "o" / first["run"] / "part-99999-of-99999.parquet").write_bytes(b"stale")
    (tmp_path / "o" / "part-00000-of-00001.parquet").write_bytes(b"a shard of the layout before runs")
    second = chunk.run(config)
    assert second["run"] != first["run"] and second["counts"] == first["counts"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["manifest.json", second["run"]]
    assert not validate(str(tmp_path / "o"))


def test_cli_passes_beam_options_through(tmp_path, books_jsonl):
    result = CliRunner().invoke(
        app,
        [
            "chunk",
            "--input",
            str(books_jsonl),
            "--output",
            str(tmp_path / "cli"),
            "--chunk-tokens",
            "800",
            "--direct_num_workers",
            "2",
            "--direct_running_mode",
            "multi_threading",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = outputs.read_manifest(str(tmp_path / "cli"))
    assert manifest["config"]["chunk_tokens"] == 800 and manifest["counts"]["balanced"]
    assert CliRunner().invoke(app, ["validate", str(tmp_path / "cli")]).exit_code == 0


def test_validate_reports_violation_classes_with_counts(tmp_path, chunks_dir):
    broken = tmp_path / "broken"
    shutil.copytree(chunks_dir, broken)
    shard = outputs.list_shards(str(broken))[0]
    table = pq.read_table(shard)
    num_tokens = table["num_tokens"].to_pylist()
    num_tokens[0] += 1
    num_tokens[1] += 1
    column = table.schema.get_field_index("num_tokens")
    pq.write_table(table.set_column(column, table.schema.field(column), pa.array(num_tokens, pa.int32())), shard)
    assert validate(str(broken)) == {"tokens length != num_tokens": 2}
    result = CliRunner().invoke(app, ["validate", str(broken)])
    assert result.exit_code == 1 and "tokens length != num_tokens: 2" in result.output
    (broken / "manifest.json").unlink()
    assert CliRunner().invoke(app, ["validate", str(broken)]).exit_code == 2  # not a stage's output at all


def test_only_bad_input_gives_an_empty_valid_output_when_the_policy_allows(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": 1}\nnot json\n')
    config = settings.build(
        chunk.ChunkConfig, {"input": str(tmp_path / "bad.jsonl"), "output": str(tmp_path / "o"), "max_dead_fraction": 1}
    )
    manifest = chunk.run(config)
    assert manifest["counts"]["in"] == 2 and manifest["counts"]["dead_lettered"] == 2
    assert outputs.read_table(str(tmp_path / "o")).num_rows == 0 and not validate(str(tmp_path / "o"))


def test_lone_surrogates_are_dead_lettered_not_a_job_crash(tmp_path):
    (tmp_path / "s.jsonl").write_text(
        '{"text": 5, "title": "\\ud800"}\n{"id": "\\ud800", "text": "Some text."}\n{"text": "A good book."}\n'
    )
    config = {"input": str(tmp_path / "s.jsonl"), "output": str(tmp_path / "o"), "max_dead_fraction": 0.7}
    manifest = chunk.run(settings.build(chunk.ChunkConfig, config))
    counts = manifest["counts"]
    assert (counts["in"], counts["out"]) == (3, 1) and counts["balanced"]
    assert counts["dead_lettered_by_reason"] == {"invalid_utf8": 1, "text_not_string": 1}
    assert not validate(str(tmp_path / "o"))


def test_a_job_that_dead_letters_most_of_its_input_fails_and_keeps_the_previous_output(tmp_path):
    books = write_books_jsonl(tmp_path / "books.jsonl", generate_books(2, 300, seed=1))
    output = tmp_path / "o"
    good = chunk.run(chunk.ChunkConfig(input=str(books), output=str(output)))
    body = [json.dumps({"content": f"Book {i}. It was a dark night."}) for i in range(3)]  # the text under another key
    (tmp_path / "other.jsonl").write_text("\n".join(body + ['{"text": "One good book."}']) + "\n")
    result = CliRunner().invoke(app, ["chunk", "--input", str(tmp_path / "other.jsonl"), "--output", str(output)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "chunk: 3 of 4 input records dead-lettered (75%), more than --max-dead-fraction 0.5" in message
    assert f"missing_text: 3 (e.g. {tmp_path / 'other.jsonl'} line 1) - is the text under another key?" in message
    assert outputs.read_manifest(str(output)) == good  # nothing committed
    assert sorted(p.name for p in output.iterdir()) == ["manifest.json", good["run"]]  # the failed run is gone
    args = ["chunk", "--input", str(tmp_path / "other.jsonl"), "--output", str(output), "--max-dead-fraction", "0.8"]
    assert CliRunner().invoke(app, args).exit_code == 0


def test_counts_that_do_not_balance_are_a_bug_that_commits_nothing():
    counts = outputs.Counts(input=3, output=1, dead_lettered={"invalid_json": 1})
    with pytest.raises(UnbalancedCounts, match="chunk: counts do not balance.*a bug in lwm-data"):
        outputs.enforce("chunk", counts, outputs.DeadLetterPolicy(), lambda: [])


def test_the_first_copy_and_the_first_use_of_an_id_are_kept_in_line_order():
    def book(text, line):
        return Book("same-id", None, text, text, "f.jsonl", f"line {line}")

    (kept,) = chunk.KeepFirstCopy("chunk")(("h", [book("t", 10), book("t", 9), book("t", 100)]))
    assert kept.locator == "line 9"
    first, *rejected = chunk.reject_conflicting_ids(("same-id", [book("b", 10), book("a", 9)]))
    assert first.locator == "line 9"
    assert [(r.reason, r.locator) for r in rejected] == [("conflicting_id", "line 10")]
    assert all(isinstance(r, Rejection) for r in rejected)


def test_validate_flags_an_empty_chunk():
    from collections import Counter

    from lwm_data.checks import check_chunk_rows
    from lwm_data.schemas import CHUNK_SCHEMA

    rows = [
        dict(
            book_id="b",
            title=None,
            chunk_index=i,
            num_chunks=2,
            char_start=s,
            char_end=e,
            num_tokens=len(t),
            text="ab"[s:e],
            tokens=t,
        )
        for i, (s, e, t) in enumerate([(0, 2, [1, 2]), (2, 2, [])])
    ]
    violations = Counter()
    check_chunk_rows(pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA), violations)
    assert +violations == {"empty chunk (no tokens)": 1}
