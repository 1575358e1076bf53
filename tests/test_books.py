import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lwm_data.errors import Rejection
from lwm_data.reading import iter_lines
from lwm_data.text.books import Book, read_books


def _reasons(items):
    return [i.reason for i in items if isinstance(i, Rejection)]


def test_jsonl_records_ids_titles_and_rejections(tmp_path):
    path = tmp_path / "b.jsonl"
    lines = [
        json.dumps({"id": 7, "title": "T", "text": "Alpha.\r\nBeta"}),
        json.dumps({"meta": {"short_book_title": "PG", "id": "pg-1"}, "text": "Gamma"}),
        json.dumps({"text": "No id here"}),
        "",
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"text": None}),
        json.dumps({"title": "x"}),
        json.dumps({"text": ["a"]}),
        json.dumps({"text": "   \n"}),
        json.dumps({"text": "\x01\x02\x03\x04" * 50}),
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe bad utf8\n")
    items = list(read_books(str(path)))
    books = [i for i in items if isinstance(i, Book)]
    assert [b.book_id for b in books[:2]] == ["7", "pg-1"]
    assert books[0].text == "Alpha.\nBeta" and books[0].title == "T" and books[1].title == "PG"
    assert books[2].book_id == books[2].text_sha256[:16]
    assert _reasons(items) == [
        "invalid_json",
        "invalid_json",
        "missing_text",
        "missing_text",
        "text_not_string",
        "empty_text",
        "binary_content",
        "invalid_utf8",
    ]
    assert [i.locator for i in items][:3] == ["line 1", "line 2", "line 3"]


def test_compressed_jsonl_parquet_and_txt(tmp_path):
    record = json.dumps({"id": "a", "text": "Hello there."}).encode() + b"\n"
    (tmp_path / "x.jsonl.gz").write_bytes(gzip.compress(record))
    (tmp_path / "x.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(record))
    pq.write_table(pa.table({"text": ["From parquet.", None], "id": ["p1", "p2"]}), tmp_path / "x.parquet")
    (tmp_path / "Moby.Dick.txt").write_text("Call me Ishmael.\r\n")
    for name in ("x.jsonl.gz", "x.jsonl.zst"):
        (book,) = read_books(str(tmp_path / name))
        assert (book.book_id, book.text) == ("a", "Hello there.")
    parquet_items = list(read_books(str(tmp_path / "x.parquet")))
    assert parquet_items[0].text == "From parquet." and _reasons(parquet_items) == ["missing_text"]
    (txt,) = read_books(str(tmp_path / "Moby.Dick.txt"))
    assert txt.text == "Call me Ishmael.\n" and txt.title == "Moby.Dick"


def test_unreadable_and_unknown_files_are_one_rejection_each(tmp_path):
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    assert _reasons(read_books(str(tmp_path / "broken.jsonl.gz"))) == ["unreadable_file"]
    assert _reasons(read_books(str(tmp_path / "data.bin"))) == ["unknown_format"]
    assert _reasons(read_books(str(tmp_path / "missing.jsonl"))) == ["unreadable_file"]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_truncated_compressed_file_is_unreadable_after_the_lines_before_the_cut(tmp_path, suffix):
    lines = b"".join(json.dumps({"id": f"b{i}", "text": f"Book {i}. " * 40}).encode() + b"\n" for i in range(3000))
    whole = gzip.compress(lines) if suffix == ".gz" else zstandard.ZstdCompressor().compress(lines)
    (tmp_path / f"books.jsonl{suffix}").write_bytes(whole)
    assert len(list(read_books(str(tmp_path / f"books.jsonl{suffix}")))) == 3000
    (tmp_path / f"cut.jsonl{suffix}").write_bytes(whole[: len(whole) // 2])
    items = list(read_books(str(tmp_path / f"cut.jsonl{suffix}")))  # never a cut last line passed as a record
    assert len(items) < 3000 and all(book.text.startswith("Book") for book in items[:-1])
    assert _reasons(items) == ["unreadable_file"] and "EOFError" in items[-1].detail


def test_oversized_line_is_skipped_without_losing_neighbours(tmp_path):
    path = tmp_path / "big.jsonl"
    good = json.dumps({"text": "small"}).encode()
    path.write_bytes(good + b"\n" + b'{"text": "' + b"x" * 3000 + b'"}\n' + good + b"\n")
    items = list(read_books(str(path), max_record_bytes=1000))
    assert _reasons(items) == ["record_too_large"]
    assert [i.locator for i in items] == ["line 1", "line 2", "line 3"]


def test_iter_lines_across_block_boundaries():
    data = b"a" * 5 + b"\n" + b"b" * 20 + b"\n\nccc"
    lines = list(iter_lines(io.BytesIO(data), max_bytes=10, block_bytes=4))
    assert lines == [(1, b"aaaaa"), (2, None), (3, b""), (4, b"ccc")]


def test_json_edge_cases_are_one_rejection_each_and_keep_the_rest_of_the_file(tmp_path):
    path = tmp_path / "edge.jsonl"
    lines = [
        "[" * 100_000,  # too deeply nested for json.loads (RecursionError)
        '{"id": ' + "1" * 5000 + ', "text": "x"}',  # int past Python's digit limit (ValueError)
        r'{"text": "lone \ud800 surrogate"}',
        r'{"id": "\udc00", "text": "Fine text."}',
        r'{"title": "\ud800", "text": 5}',
        json.dumps({"id": "last", "text": "Still read."}),
    ]
    path.write_text("\n".join(lines) + "\n")
    items = list(read_books(str(path)))
    assert _reasons(items) == ["invalid_json", "invalid_json", "invalid_utf8", "invalid_utf8", "text_not_string"]
    assert [i.locator for i in items] == [f"line {n}" for n in range(1, 7)]
    assert items[-1].book_id == "last"


def test_dead_letter_with_lone_surrogates_is_writable_json():
    from lwm_data.errors import DeadLetter

    line = DeadLetter("chunk", "text_not_string", "f.jsonl", "line 1", "d", '{"title": "\ud800"}').to_json()
    line.encode()  # a UTF-8 sink (WriteToText) must accept it
    assert json.loads(line)["record"] == '{"title": "\ud800"}'
    assert "é" in DeadLetter("chunk", "r", "s", record="café").to_json()  # readable when it can be


def test_parquet_reads_the_same_title_keys_as_jsonl(tmp_path):
    pq.write_table(pa.table({"text": ["A book."], "short_book_title": ["PG title"]}), tmp_path / "pg19.parquet")
    (book,) = read_books(str(tmp_path / "pg19.parquet"))
    assert book.title == "PG title"


def test_dead_letters_with_unicode_line_separators_read_back_one_per_line(tmp_path):
    from lwm_data.outputs import OutputRun, read_dead_letters
    from lwm_data.schemas import CHUNK_SCHEMA

    run = OutputRun(str(tmp_path))
    run.write_table(CHUNK_SCHEMA.empty_table())
    run.write_dead_letters(
        "chunk",
        [
            Rejection("r", record="a\u2028b\u2029c\x85d", source="s", locator="line 1"),
            Rejection("r", source="s", locator="line 2"),
        ],
    )
    run.commit({"stage": "chunk"})
    assert [d["record"] for d in read_dead_letters(str(tmp_path))] == ["a\u2028b\u2029c\x85d", ""]


def test_a_bug_in_a_parser_fails_instead_of_posing_as_an_unreadable_file(tmp_path, monkeypatch):
    import pytest

    import lwm_data.text.books as books

    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"text": "One."}) + "\n" + json.dumps({"text": "Two."}) + "\n")

    def broken(*args):
        raise TypeError("a bug")

    monkeypatch.setattr(books, "book_from_fields", broken)
    with pytest.raises(TypeError, match="a bug"):
        list(read_books(str(path)))
