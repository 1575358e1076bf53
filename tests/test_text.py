import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwm_data.testing.books import generate_book
from lwm_data.text.chunking import (
    PARAGRAPH,
    SENTENCE,
    WHITESPACE,
    boundary_kinds,
    cut_chunks,
    looks_binary,
    normalize_text,
    utf8_offsets,
)
from lwm_data.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_normalize_text_nfc_line_ends_and_nul():
    assert normalize_text("cafe\u0301\r\nnext\rline\x00!") == "caf\u00e9\nnext\nline!"
    assert normalize_text("already fine\n") == "already fine\n"
    # NUL removal comes before NFC, so the result is NFC (and normalising again changes nothing)
    assert normalize_text("e\x00\u0301") == "\u00e9" == normalize_text(normalize_text("e\x00\u0301"))


def test_looks_binary():
    assert looks_binary("\x01\x02\x03" * 100 + "text")
    assert not looks_binary("plain text\twith tabs\nand lines\n")


def test_boundary_kinds_classify_cuts():
    text = 'One. "Two." Three\n\nFour five'
    cuts = np.array([4, 11, 17, 19, 24])
    kinds = boundary_kinds(text, cuts)
    # after "One." (space follows), after '"Two."', after "Three" (newline follows), after the blank line,
    # after "Four" (space follows)
    assert kinds.tolist() == [SENTENCE, SENTENCE, WHITESPACE, PARAGRAPH, WHITESPACE]


def _pieces(text, chunks):
    return [text[c.char_start : c.char_end] for c in chunks]


def test_chunks_are_lossless_token_aligned_and_within_tolerance(tokenizer):
    text = generate_book(3, 12000).text
    tokenized = tokenizer.encode_with_offsets([text])[0]
    chunks = cut_chunks(text, tokenized, 1000, 0.1)
    assert "".join(_pieces(text, chunks)) == text
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].token_start == 0 and chunks[-1].token_end == len(tokenized.ids)
    for c in chunks[:-1]:
        assert 900 <= c.token_end - c.token_start <= 1100
        assert c.char_end == tokenized.char_ends[c.token_end - 1]  # cut exactly between two tokens
    # synthetic books have blank lines between paragraphs: every cut lands on one
    assert all(text[: c.char_end].endswith("\n\n") for c in chunks[:-1])


def test_cut_chunks_of_whole_book_are_the_book_tokenization(tokenizer):
    text = generate_book(4, 3000).text
    tokenized = tokenizer.encode_with_offsets([text])[0]
    assert tokenized.ids.tolist() == tokenizer.encode(text)
    chunks = cut_chunks(text, tokenized, 200)
    rebuilt = np.concatenate([tokenized.ids[c.token_start : c.token_end] for c in chunks])
    assert rebuilt.tolist() == tokenized.ids.tolist()


def test_sentence_cut_when_no_paragraph_in_reach(tokenizer):
    text = " ".join(f"Sentence number {i} ends here." for i in range(400))
    tokenized = tokenizer.encode_with_offsets([text])[0]
    chunks = cut_chunks(text, tokenized, 100)
    assert all(text[: c.char_end].endswith(".") for c in chunks[:-1])


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(
        alphabet=st.sampled_from(list("ab .!?\n\"'") + ["\u00e9", "\u4e16", "\U0001f600", "\u0301"]),
        min_size=0,
        max_size=400,
    ),
    size=st.integers(1, 40),
)
def test_chunking_is_lossless_for_any_text(tokenizer, text, size):
    text = normalize_text(text)
    tokenized = tokenizer.encode_with_offsets([text])[0]
    chunks = cut_chunks(text, tokenized, size)
    assert "".join(text[c.char_start : c.char_end] for c in chunks) == text
    assert sum(c.token_end - c.token_start for c in chunks) == len(tokenized.ids)
    assert all(c.token_end > c.token_start for c in chunks)


def test_no_empty_last_chunk_when_the_text_ends_in_byte_fallback_pieces(tokenizer):
    text = "ab\U00010348"  # the last character is four byte-fallback pieces
    tokenized = tokenizer.encode_with_offsets([text])[0]
    assert (tokenized.char_ends == -1).sum() == 3
    for size in (1, 2, 3):
        chunks = cut_chunks(text, tokenized, size)
        assert all(c.token_end > c.token_start and c.char_end > c.char_start for c in chunks)
        assert "".join(_pieces(text, chunks)) == text and chunks[-1].token_end == len(tokenized.ids)


def test_utf8_offsets_of_character_offsets():
    text = "a\u00e9\u4e16\U0001f600b"
    chars = np.arange(len(text) + 1)
    assert utf8_offsets(text.encode(), chars).tolist() == [len(text[:c].encode()) for c in chars]
