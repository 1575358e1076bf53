"""Book text: normalisation, identity, sentence ends, and cutting into ~1K-token chunks at natural
boundaries.

Normalisation (applied to every book before anything else, and what chunk offsets refer to):
  1. NUL characters removed;
  2. line ends: CRLF -> LF, then any remaining lone CR -> LF;
  3. Unicode NFC (last, so that the result is NFC even where a NUL separated a letter from its accent).
Nothing else changes: whitespace, quotes and paragraph breaks are kept, so a book's chunk texts
concatenated in order give back its normalised text exactly.

A sentence ends (the one definition every stage uses) at `.`, `!` or `?`, optionally followed by one
closing quote or bracket, where whitespace or the end of the text follows.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lwm_data.arrays import flat_values, list_lengths, run_starts
from lwm_data.errors import Rejection
from lwm_data.examples import TEXT, Example
from lwm_data.tokenizers.text import TokenizedText

# Boundary preference when snapping a cut: higher is better.
PARAGRAPH, SENTENCE, WHITESPACE, ANY_TOKEN = 3, 2, 1, 0

_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f]")


def _char_class(chars: str) -> np.ndarray:
    """A lookup table over code points below 0x2020 (all the classes here live there)."""
    table = np.zeros(0x2020, dtype=bool)
    table[[ord(c) for c in chars]] = True
    return table


SENTENCE_END_MARKS = ".!?"
CLOSING_QUOTES = "\"')\u201d\u2019"
_SENTENCE_END = _char_class(SENTENCE_END_MARKS)
_CLOSING_QUOTE = _char_class(CLOSING_QUOTES)
_WHITESPACE = _char_class(" \t\n")
_BINARY_SNIFF_CHARS = 65536


def normalize_text(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text


def looks_binary(text: str, max_control_fraction: float = 0.01) -> bool:
    """True for decoded binary junk: many control characters other than tab and newline."""
    sample = text[:_BINARY_SNIFF_CHARS]
    return len(_CONTROL_CHARS.findall(sample)) > max_control_fraction * max(len(sample), 1)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def utf8_offsets(data: bytes, chars: np.ndarray) -> np.ndarray:
    """The byte offset in `data` (UTF-8) of each character offset in `chars` (0..number of characters)."""
    char_starts = np.flatnonzero((np.frombuffer(data, np.uint8) & 0xC0) != 0x80)
    return np.append(char_starts, len(data))[chars]


def sentence_end_before(text: str, position: int) -> int:
    """The largest i <= position right after a sentence end (see the module docstring); 0 if none."""
    i = position
    while i > 0:
        i = max(text.rfind(mark, 0, i) for mark in SENTENCE_END_MARKS)
        if i < 0:
            return 0
        end = i + 1 + (i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES)
        if end <= position and (end == len(text) or text[end].isspace()):
            return end
    return 0


@dataclass(frozen=True)
class Chunk:
    index: int
    char_start: int
    char_end: int
    token_start: int
    token_end: int


def boundary_kinds(text: str, char_ends: np.ndarray) -> np.ndarray:
    """Classify the cut after each token: PARAGRAPH, SENTENCE, WHITESPACE, ANY_TOKEN, or -1 (no cut).

    A cut at character c splits text[:c] | text[c:]. Paragraph: text[:c] ends with a blank line.
    Sentence: text[:c] ends with . ! or ? (optionally followed by a closing quote) and text[c] is
    whitespace. Whitespace: either side of the cut is whitespace. -1 marks a token end inside a
    character (byte-fallback pieces), which is never a cut.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    codes = np.where(codes < len(_WHITESPACE), codes, 0)
    padded = np.concatenate([np.zeros(2, np.uint32), codes, np.full(1, ord(" "), np.uint32)])
    at = np.clip(char_ends, 0, len(codes)) + 2  # padded index of text[c]
    before, before2, after = padded[at - 1], padded[at - 2], padded[at]
    newline = ord("\n")
    paragraph = (before == newline) & (before2 == newline)
    ends_sentence = _SENTENCE_END[before] | (_CLOSING_QUOTE[before] & _SENTENCE_END[before2])
    sentence = ends_sentence & _WHITESPACE[after]
    whitespace = _WHITESPACE[before] | _WHITESPACE[after]
    kinds = np.select([paragraph, sentence, whitespace], [PARAGRAPH, SENTENCE, WHITESPACE], ANY_TOKEN)
    kinds[char_ends < 0] = -1
    return kinds


def cut_chunks(text: str, tokenized: TokenizedText, chunk_tokens: int = 1000, tolerance: float = 0.1) -> list[Chunk]:
    """Cut a book into chunks of about `chunk_tokens` tokens, only between tokens.

    Each cut lands within `chunk_tokens * (1 ± tolerance)` tokens of the previous one, at the best
    boundary there (paragraph, then sentence, then whitespace, then any token end), the one nearest
    the target among equals; when every token end in reach is inside a character (byte-fallback
    pieces, only possible for tiny `chunk_tokens`), at the next one past it. A remainder that fits
    in the upper bound stays in the last chunk. No chunk is empty.
    """
    n = len(tokenized.ids)
    if n == 0:
        return []
    kinds = boundary_kinds(text, tokenized.char_ends)
    low = max(1, round(chunk_tokens * (1 - tolerance)))
    high = max(low, round(chunk_tokens * (1 + tolerance)))
    token_cuts = [0]
    while n - token_cuts[-1] > high:
        cut = _next_cut(kinds, token_cuts[-1], low, high, chunk_tokens)
        if cut >= n:  # the next real cut is the text's end: the rest is the last chunk
            break
        token_cuts.append(cut)
    token_cuts.append(n)
    char_cuts = [0] + [int(tokenized.char_ends[t - 1]) for t in token_cuts[1:-1]] + [len(text)]
    return [
        Chunk(i, char_cuts[i], char_cuts[i + 1], token_cuts[i], token_cuts[i + 1]) for i in range(len(token_cuts) - 1)
    ]


def _next_cut(kinds: np.ndarray, start: int, low: int, high: int, target: int) -> int:
    """Token index of the next cut: the best boundary kind in [start+low, start+high], nearest
    start+target among equals. kinds[t-1] describes the cut before token t."""
    window = kinds[start + low - 1 : start + high]
    best_kind = window.max()
    if best_kind < 0:  # only mid-character token ends in reach: take the next real one
        return start + high + 1 + int(np.flatnonzero(kinds[start + high :] >= 0)[0])
    candidates = np.flatnonzero(window == best_kind)
    pick = candidates[np.argmin(np.abs(candidates - (target - low)))]
    return start + low + int(pick)


# ---- a book back from its chunk rows ----


@dataclass
class BookChunks:
    """One book's chunks: `tokens[offsets[c]:offsets[c + 1]]` are chunk c's tokens."""

    book_id: str
    tokens: np.ndarray  # int32, the whole book
    offsets: np.ndarray  # int64, num_chunks + 1
    texts: list[str]

    @property
    def num_chunks(self) -> int:
        return len(self.offsets) - 1

    @property
    def chunk_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def book_chunks_from_table(book_id: str, table: pa.Table) -> BookChunks:
    """A book from its CHUNK_SCHEMA rows (any order, any number of record batches); raises
    Rejection("incomplete_book") unless its chunk indices run 0..n-1 once each and agree with
    num_chunks, and every chunk's token list matches its num_tokens.

    The book's tokens are copied once into one int32 array; no per-token Python objects.
    """
    table = table.sort_by("chunk_index")
    index = table["chunk_index"].to_numpy()
    declared = pc.unique(table["num_chunks"]).to_pylist()
    if not np.array_equal(index, np.arange(len(index))) or declared != [len(index)]:
        shown = f"{index[:8].tolist()}{'...' if len(index) > 8 else ''}"
        raise Rejection(
            "incomplete_book",
            f"chunk indices {shown} are not 0..{declared[0] - 1} once each ({len(index)} rows, num_chunks {declared})",
            book_id,
            book_id,
        )
    lengths = list_lengths(table["tokens"])
    if not np.array_equal(lengths, table["num_tokens"].to_numpy()):
        raise Rejection("incomplete_book", "a chunk's tokens do not match its num_tokens", book_id, book_id)
    tokens = flat_values(table["tokens"], np.int32)
    return BookChunks(book_id, tokens, np.concatenate([[0], np.cumsum(lengths)]), table["text"].to_pylist())


def text_example(book: BookChunks, bos: Sequence[int], title: str | None = None) -> Example:
    """A book as one plain-text example: `bos` (the tokenizer's BOS, or nothing), then its chunks'
    tokens; loss on every token after the first."""
    tokens = np.concatenate([np.asarray(bos, np.int32), book.tokens])
    weights = np.ones(len(tokens), np.float32)
    weights[0] = 0.0
    meta = {"num_chunks": book.num_chunks, **({"title": title} if title else {})}
    return Example(
        book.book_id,
        TEXT,
        book.book_id,
        tokens,
        weights,
        np.zeros(len(tokens), np.bool_),
        ("<s>" if len(bos) else "") + "".join(book.texts),
        meta,
    )


def split_by_book(batch: pa.Table | pa.RecordBatch) -> Iterable[tuple[str, pa.Table]]:
    """(book_id, that book's rows) for each book in a batch of rows (zero-copy slices)."""
    table = (pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch).sort_by("book_id")
    ids = table["book_id"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(run_starts(ids))
    for start, end in zip(starts, np.r_[starts[1:], len(ids)]):
        yield str(ids[start]), table.slice(int(start), int(end - start))
