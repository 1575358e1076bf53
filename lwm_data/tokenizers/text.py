"""Text tokenizers: SentencePiece `.model` files and Hugging Face tokenizer directories.

`encode` never adds BOS/EOS (LWM's original tokenizer behaviour; see docs/lwm-format.md): callers add
them explicitly. `encode_with_offsets` also returns where each token ends in the input, in
characters, which is what lets the chunker cut only between tokens.

Tokenizers are known by content. A manifest records the one a stage used as its `entry`:
`{"name": "default", "sha256": ...}` for the embedded model, `{"path": ..., "sha256": ...}` for a
user's file (any Beam filesystem). Later stages, on any machine, get it back through
`resolve_tokenizer(entry)`, which always checks the sha256: a moved site-packages, an upgraded
mistral-common or an edited file is an error that says what to pass, never a silent switch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm

from lwm_data import files
from lwm_data.errors import ConfigError

DEFAULT = "default"
_SPACE = "\u2581"  # SentencePiece's whitespace symbol
_IDENTITY_PROBE = "a  b\u3000\ufb01\r\n"


def default_tokenizer_path() -> str:
    """The 32000-piece LLaMA-layout SentencePiece model that `mistral-common` ships (offline)."""
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


@dataclass(frozen=True)
class TokenizedText:
    ids: np.ndarray  # int32 token ids
    char_ends: np.ndarray  # int64: token i covers text[char_ends[i-1]:char_ends[i]] (-1 mid-character)


def _char_index_of_byte(data: bytes) -> np.ndarray:
    """Map every byte offset 0..len(data) to the character offset it starts, -1 inside a character."""
    raw = np.frombuffer(data, dtype=np.uint8)
    is_char_start = (raw & 0xC0) != 0x80
    char_index = np.empty(len(raw) + 1, dtype=np.int64)
    char_index[:-1] = np.cumsum(is_char_start) - 1
    char_index[-1] = int(is_char_start.sum())
    char_index[:-1][~is_char_start] = -1
    return char_index


class SentencePieceTokenizer:
    """A SentencePiece model loaded from any Beam filesystem path (None: the embedded default)."""

    def __init__(self, model_bytes: bytes, path: str | None):
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.entry = _entry(path, self.sha256)
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self._piece_bytes, self._dummy_prefix = self._offset_table()

    def _offset_table(self) -> tuple[np.ndarray | None, int]:
        """Byte length of every piece in the input, when offsets can be summed from ids alone.

        That holds for identity normalisation (LLaMA, Mistral): pieces are the input's bytes with
        spaces shown as U+2581, byte-fallback pieces are one byte, control pieces none. Other
        normalisers fall back to the slower proto output, which carries offsets.
        """
        normalized = self._sp.normalize(_IDENTITY_PROBE)
        plain = _IDENTITY_PROBE.replace(" ", _SPACE)
        if normalized not in (plain, _SPACE + plain):
            return None, 0
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self._sp.is_byte(i):
                lengths[i] = 1
            elif not (self._sp.is_control(i) or self._sp.is_unknown(i)):
                lengths[i] = len(self._sp.id_to_piece(i).replace(_SPACE, " ").encode())
        return lengths, len(normalized) - len(plain)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[np.ndarray]:
        ids = self._sp.encode(texts, num_threads=num_threads)
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def encode_with_offsets(self, texts: list[str], num_threads: int = -1) -> list[TokenizedText]:
        ids_list = self.encode_batch(texts, num_threads) if self._piece_bytes is not None else None
        out = []
        for i, text in enumerate(texts):
            data = text.encode()
            fast = ids_list is not None and self._fast_offsets(ids_list[i], data)
            out.append(fast or self._proto_offsets(text, data))
        return out

    def _fast_offsets(self, ids: np.ndarray, data: bytes) -> TokenizedText | None:
        byte_ends = np.cumsum(self._piece_bytes[ids]) - self._dummy_prefix
        if len(ids) and byte_ends[-1] != len(data):
            return None  # e.g. an unknown piece: its byte length is not in the table
        byte_ends = np.maximum(byte_ends, 0)
        return TokenizedText(ids, _char_index_of_byte(data)[byte_ends])

    def _proto_offsets(self, text: str, data: bytes) -> TokenizedText:
        pieces = self._sp.encode(text, return_type="proto").pieces
        ids = np.fromiter((p.id for p in pieces), dtype=np.int32, count=len(pieces))
        byte_ends = np.fromiter((p.end for p in pieces), dtype=np.int64, count=len(pieces))
        return TokenizedText(ids, _char_index_of_byte(data)[byte_ends])


class HuggingFaceTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers`), without special tokens added."""

    def __init__(self, json_bytes: bytes, path: str):
        from tokenizers import Tokenizer

        self.path = path
        self.sha256 = hashlib.sha256(json_bytes).hexdigest()
        self.entry = _entry(path, self.sha256)
        self._tok = Tokenizer.from_str(json_bytes.decode())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id(("<s>", "<|begin_of_text|>", "<|startoftext|>"))
        self.eos_id = self._special_id(("</s>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>"))

    def _special_id(self, names: tuple[str, ...]) -> int:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return -1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_with_offsets(self, texts: list[str], num_threads: int = -1) -> list[TokenizedText]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [TokenizedText(np.asarray(e.ids, dtype=np.int32), _hf_char_ends(e.offsets)) for e in encodings]


def _hf_char_ends(offsets: list[tuple[int, int]]) -> np.ndarray:
    """Token end characters; -1 where the next token starts before it ends: byte-level BPE splits a
    character into several tokens that all carry the whole character's span, and no cut goes there."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    ends = spans[:, 1].copy()
    ends[:-1][spans[1:, 0] < ends[:-1]] = -1
    return ends


class TextTokenizer(Protocol):
    """What every stage needs of a text tokenizer."""

    path: str | None
    sha256: str
    entry: dict[str, str]  # how manifests record it (see the module docstring)
    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_with_offsets(self, texts: list[str], num_threads: int = -1) -> list[TokenizedText]: ...


def _entry(path: str | None, sha256: str) -> dict[str, str]:
    return {"name": DEFAULT, "sha256": sha256} if path is None else {"path": path, "sha256": sha256}


@lru_cache(maxsize=8)
def load_tokenizer(path: str | None = None) -> TextTokenizer:
    """Load a SentencePiece `.model`, or a Hugging Face tokenizer directory, from any filesystem.

    A directory with `tokenizer.model` is read as SentencePiece (LLaMA's layout); otherwise its
    `tokenizer.json` is used. `None` loads the embedded default. Cached per process.
    """
    if path is None:
        with open(default_tokenizer_path(), "rb") as f:
            return SentencePieceTokenizer(f.read(), None)
    directory = path.rstrip("/")
    sp_model = files.join(directory, "tokenizer.model")
    hf_json = files.join(directory, "tokenizer.json")
    if files.exists(sp_model):
        return SentencePieceTokenizer(files.read_bytes(sp_model), path)
    if files.exists(hf_json):
        return HuggingFaceTokenizer(files.read_bytes(hf_json), path)
    if files.exists(path):
        return SentencePieceTokenizer(files.read_bytes(path), path)
    raise ConfigError(
        f"no tokenizer at {path}: expected a SentencePiece .model file or a directory with "
        "tokenizer.model or tokenizer.json"
    )


class TokenizerMismatch(ConfigError):
    """The tokenizer at hand is not the one whose ids an input holds."""


def describe_entry(entry: dict[str, Any]) -> str:
    where = "the embedded default" if entry.get("name") == DEFAULT else entry.get("path")
    return f"{where} (sha256 {entry.get('sha256', '?')[:12]}...)"


def resolve_tokenizer(entry: dict[str, Any] | None, requested: str | None = None) -> TextTokenizer:
    """The tokenizer an upstream manifest's entry names, its sha256 checked.

    `requested` (a path the user passes) replaces the recorded location but must be the same model.
    A recorded path that no longer exists resolves to the embedded default when that is the same
    model (manifests once recorded the default by its site-packages path).
    """
    if requested is not None:
        tokenizer = load_tokenizer(requested)
        if entry and tokenizer.sha256 != entry.get("sha256"):
            raise TokenizerMismatch(
                f"tokenizer {requested} (sha256 {tokenizer.sha256[:12]}...) is not the one "
                f"that made this input's tokens: {describe_entry(entry)}"
            )
        return tokenizer
    if not entry:
        raise ConfigError("the input's manifest records no tokenizer: pass --tokenizer")
    path = entry.get("path")
    located = path is not None and files.exists(path)
    tokenizer = load_tokenizer(path if located else None)
    if tokenizer.sha256 != entry.get("sha256"):
        if path is None or located:
            changed = "the embedded default tokenizer" if path is None else f"the tokenizer at {path}"
            raise TokenizerMismatch(
                f"{changed} has changed since it made this input's tokens (sha256 now "
                f"{tokenizer.sha256[:12]}..., recorded {entry.get('sha256', '?')[:12]}...): "
                "pass --tokenizer with the original model"
            )
        raise TokenizerMismatch(
            f"the tokenizer that made this input, {describe_entry(entry)}, is not at that path "
            "here: pass --tokenizer with a copy of it"
        )
    return tokenizer
