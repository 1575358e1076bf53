"""Book text: normalisation, identity, and cutting into ~1K-token chunks at natural boundaries.

Normalisation (applied to every book before anything else, and what chunk offsets refer to):
  1. NUL characters removed;
  2. line ends: CRLF -> LF, then any remaining lone CR -> LF;
  3. Unicode NFC (last, so that the result is NFC even where a NUL separated a letter from its accent).
Nothing else changes: whitespace, quotes and paragraph breaks are kept, so a book's chunk texts
concatenated in order give back its normalised text exactly.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from lwm_data.tokenizers.text import TokenizedText

# Boundary preference when snapping a cut: higher is better.
PARAGRAPH, SENTENCE, WHITESPACE, ANY_TOKEN = 3, 2, 1, 0

_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f]")


def _char_class(chars: str) -> np.ndarray:
    """A lookup table over code points below 0x2020 (all the classes here live there)."""
    table = np.zeros(0x2020, dtype=bool)
    table[[ord(c) for c in chars]] = True
    return table


_SENTENCE_END = _char_class(".!?")
_CLOSING_QUOTE = _char_class("\"')\u201d\u2019")
_WHITESPACE = _char_class(" \t\n")


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
    sample = text[:65536]
    return len(_CONTROL_CHARS.findall(sample)) > max_control_fraction * max(len(sample), 1)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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


def chunk_tokens(
    text: str, tokenized: TokenizedText, chunk_tokens: int = 1000, tolerance: float = 0.1
) -> list[Chunk]:
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
        Chunk(i, char_cuts[i], char_cuts[i + 1], token_cuts[i], token_cuts[i + 1])
        for i in range(len(token_cuts) - 1)
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
