"""Tokenizers: text (SentencePiece / Hugging Face), known by content (see `text`)."""

from lwm_data.tokenizers.text import (
    TextTokenizer,
    TokenizedText,
    TokenizerMismatch,
    bos_prefix,
    default_tokenizer_path,
    load_tokenizer,
    require_eos,
    resolve_tokenizer,
)

__all__ = [
    "TextTokenizer",
    "TokenizedText",
    "TokenizerMismatch",
    "bos_prefix",
    "default_tokenizer_path",
    "load_tokenizer",
    "require_eos",
    "resolve_tokenizer",
]
