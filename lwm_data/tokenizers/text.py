"""Text tokenizers: SentencePiece `.model` files and Hugging Face tokenizer directories.

`encode` never adds BOS/EOS (LWM's original tokenizer behaviour; see docs/lwm-format.md): callers add
them explicitly. `bos_id` is the id the tokenizer puts at the start of a sequence, None when it puts
none (SmolLM2: its `bos_token` is named but never added); `eos_id` the end-of-sequence id, None when
the tokenizer names none. A directory's `tokenizer_config.json` / `special_tokens_map.json` decide
both (`bos_token`, `eos_token`, `add_bos_token`); without them, a SentencePiece model's own ids and a
`tokenizer.json`'s post-processor (what it adds around a sequence) do. `encode_with_offsets` also
returns where each token ends in the input, in characters, which is what lets the chunker cut only
between tokens.

Tokenizers are known by content. A manifest records the one a stage used as its `entry`:
`{"name": "default", "sha256": ...}` for the embedded model, `{"path": ..., "sha256": ...}` for a
user's file (any Beam filesystem), each with `vocab_size`, `bos_id` and `eos_id`. Later stages, on
any machine, get it back through `resolve_tokenizer(entry)`, which always checks the sha256 (and the
special ids, when recorded): a moved site-packages, an upgraded mistral-common or an edited file is
an error that says what to pass, never a silent switch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
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

    def __init__(self, model_bytes: bytes, path: str | None, config: dict[str, Any] | None = None):
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self._sp.vocab_size()
        own_bos, own_eos = self._sp.bos_id(), self._sp.eos_id()
        self.bos_id, self.eos_id = special_ids(
            config or {}, self._piece_id, [own_bos] if own_bos >= 0 else [], own_eos if own_eos >= 0 else None
        )
        self.entry = _entry(self)
        self._piece_bytes, self._dummy_prefix = self._offset_table()

    def _piece_id(self, piece: str) -> int | None:
        piece_id = self._sp.piece_to_id(piece)
        return None if piece_id == self._sp.unk_id() and piece != self._sp.id_to_piece(piece_id) else piece_id

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
        """Read-only int32 arrays straight from SentencePiece's buffers (no Python int per token)."""
        return self._sp.encode(texts, num_threads=num_threads, return_type="numpy")

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def encode_with_offsets(self, texts: list[str], num_threads: int = -1) -> list[TokenizedText]:
        ids_list = self.encode_batch(texts, num_threads) if self._piece_bytes is not None else None
        out = []
        for i, text in enumerate(texts):
            data = text.encode()
            fast = ids_list is not None and _summed_offsets(ids_list[i], data, self._piece_bytes, self._dummy_prefix)
            out.append(fast or self._proto_offsets(text, data))
        return out

    def _proto_offsets(self, text: str, data: bytes) -> TokenizedText:
        pieces = self._sp.encode(text, return_type="proto").pieces
        ids = np.fromiter((p.id for p in pieces), dtype=np.int32, count=len(pieces))
        byte_ends = np.fromiter((p.end for p in pieces), dtype=np.int64, count=len(pieces))
        return TokenizedText(ids, _char_index_of_byte(data)[byte_ends])


class HuggingFaceTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers`), without special tokens added."""

    def __init__(self, json_bytes: bytes, path: str, config: dict[str, Any] | None = None):
        from tokenizers import Tokenizer

        self.path = path
        self.sha256 = hashlib.sha256(json_bytes).hexdigest()
        self._tok = Tokenizer.from_str(json_bytes.decode())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added_before, added_after = self._post_processor_tokens()
        self.bos_id, self.eos_id = special_ids(
            config or {}, self._tok.token_to_id, added_before, added_after[-1] if added_after else None
        )
        self.entry = _entry(self)
        self._piece_bytes = self._byte_level_table(json.loads(json_bytes))

    def _byte_level_table(self, config: dict[str, Any]) -> np.ndarray | None:
        """Byte length of every token in the input, when offsets can be summed from ids alone.

        That holds for byte-level BPE (GPT-2, SmolLM, LLaMA 3, Qwen) with no normaliser: every
        model token is the input's bytes, one alphabet character each, and added tokens are matched
        as written. Anything else (normalisers, prefix spaces, trimmed or stripped offsets) keeps
        the offsets `tokenizers` tracks, which cost a Python tuple per token.
        """
        if config.get("normalizer") or not _byte_level_pre_tokenizer(config.get("pre_tokenizer")):
            return None
        if not _offsets_untouched(config.get("post_processor")) or config["model"].get("type") != "BPE":
            return None
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = set(ByteLevel.alphabet())
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, token_id in self._tok.get_vocab(with_added_tokens=False).items():
            if not alphabet.issuperset(token):
                return None
            lengths[token_id] = len(token)
        for token_id, added in self._tok.get_added_tokens_decoder().items():
            if added.lstrip or added.rstrip:
                return None
            lengths[token_id] = len(added.content.encode())
        return lengths

    def _post_processor_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a sequence (`add_special_tokens`)."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)  # ids only: no offsets tracked
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_with_offsets(self, texts: list[str], num_threads: int = -1) -> list[TokenizedText]:
        if self._piece_bytes is not None:
            summed = [
                _summed_offsets(ids, t.encode(), self._piece_bytes) for ids, t in zip(self.encode_batch(texts), texts)
            ]
            if all(summed):
                return summed
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [TokenizedText(np.asarray(e.ids, dtype=np.int32), _hf_char_ends(e.offsets)) for e in encodings]


_SPLITTERS = ("Split", "Digits")  # pre-tokenizers that only split (unless told to remove what they match)


def _byte_level_pre_tokenizer(config: dict[str, Any] | None) -> bool:
    """ByteLevel without an added prefix space, alone or with splitters: the input's bytes, all of them."""
    if not config:
        return False
    parts = config["pretokenizers"] if config["type"] == "Sequence" else [config]
    byte_level = [p for p in parts if p["type"] == "ByteLevel"]
    others = [p for p in parts if p["type"] != "ByteLevel"]
    only_split = all(p["type"] in _SPLITTERS and p.get("behavior") != "Removed" for p in others)
    return len(byte_level) == 1 and not byte_level[0].get("add_prefix_space") and only_split


def _offsets_untouched(config: dict[str, Any] | None) -> bool:
    """A post-processor that leaves offsets as they are when no special tokens are added."""
    if config is None or config["type"] == "TemplateProcessing":
        return True
    if config["type"] == "ByteLevel":
        return not config.get("trim_offsets", True)
    return config["type"] == "Sequence" and all(_offsets_untouched(p) for p in config["processors"])


def _summed_offsets(
    ids: np.ndarray, data: bytes, piece_bytes: np.ndarray, dummy_prefix: int = 0
) -> TokenizedText | None:
    """Offsets from each token's byte length in the input (`piece_bytes[id]`), or None when they do
    not add up to the input (e.g. an unknown piece: its length is not in the table)."""
    byte_ends = np.cumsum(piece_bytes[ids]) - dummy_prefix
    if len(ids) and byte_ends[-1] != len(data):
        return None
    byte_ends = np.maximum(byte_ends, 0)
    return TokenizedText(ids, _char_index_of_byte(data)[byte_ends])


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
    bos_id: int | None  # what the tokenizer puts at a sequence's start; None: nothing
    eos_id: int | None  # None: the tokenizer names no end-of-sequence token

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_with_offsets(self, texts: list[str], num_threads: int = -1) -> list[TokenizedText]: ...


def _entry(tokenizer: SentencePieceTokenizer | HuggingFaceTokenizer) -> dict[str, Any]:
    where = {"name": DEFAULT} if tokenizer.path is None else {"path": tokenizer.path}
    return {
        **where,
        "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }


SPECIAL_TOKEN_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # the later one wins


def special_tokens_config(directory: str) -> dict[str, Any]:
    """`bos_token`, `eos_token` and `add_bos_token` from a Hugging Face directory's files ({} if none)."""
    config: dict[str, Any] = {}
    for name in SPECIAL_TOKEN_FILES:
        path = files.join(directory, name)
        if files.exists(path):
            found = files.read_json(path)
            config.update({k: found[k] for k in ("bos_token", "eos_token", "add_bos_token") if k in found})
    return config


def special_ids(
    config: dict[str, Any],
    token_id: Callable[[str], int | None],
    added_before: list[int],
    own_eos: int | None,
) -> tuple[int | None, int | None]:
    """(bos_id, eos_id): BOS only when the tokenizer adds one (`add_bos_token`, else whether
    `added_before`, what it puts before a sequence, is non-empty); the configured tokens when named,
    else the tokenizer's own (`added_before[0]`, `own_eos`)."""
    add_bos = config.get("add_bos_token")
    add_bos = bool(added_before) if add_bos is None else bool(add_bos)
    bos = _configured_id(config, "bos_token", token_id)
    eos = _configured_id(config, "eos_token", token_id)
    if bos is None and add_bos:
        if not added_before:
            raise ConfigError("add_bos_token is true but the tokenizer names no bos_token")
        bos = added_before[0]
    return (bos if add_bos else None), (eos if eos is not None else own_eos)


def _configured_id(config: dict[str, Any], key: str, token_id: Callable[[str], int | None]) -> int | None:
    token = config.get(key)
    if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
        token = token.get("content")
    if not token:
        return None
    found = token_id(token)
    if found is None:
        raise ConfigError(f"{key} {token!r} is not in the tokenizer's vocabulary")
    return found


def bos_prefix(tokenizer: TextTokenizer) -> list[int]:
    """What starts a sequence: [BOS], or [] for a tokenizer that adds none."""
    return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def require_eos(tokenizer: TextTokenizer, needed_for: str) -> int:
    """The EOS id, or a ConfigError saying that `needed_for` needs one and where it is named."""
    if tokenizer.eos_id is None:
        raise ConfigError(
            f"{needed_for} needs an end-of-sequence token and the tokenizer {describe_entry(tokenizer.entry)} "
            "names none: set eos_token in its tokenizer_config.json"
        )
    return tokenizer.eos_id


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
        return SentencePieceTokenizer(files.read_bytes(sp_model), path, special_tokens_config(directory))
    if files.exists(hf_json):
        return HuggingFaceTokenizer(files.read_bytes(hf_json), path, special_tokens_config(directory))
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
        return _same_special_ids(tokenizer, entry) if entry else tokenizer
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
    return _same_special_ids(tokenizer, entry)


def _same_special_ids(tokenizer: TextTokenizer, entry: dict[str, Any]) -> TextTokenizer:
    """The model file is the same; so must be what its directory's config makes of BOS and EOS."""
    for key in ("bos_id", "eos_id"):
        if key in entry and entry[key] != getattr(tokenizer, key):
            raise TokenizerMismatch(
                f"{describe_entry(entry)} made this input with {key} {entry[key]}; its files here give "
                f"{getattr(tokenizer, key)} (tokenizer_config.json changed?)"
            )
    return tokenizer
