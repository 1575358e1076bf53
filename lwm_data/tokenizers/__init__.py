"""Tokenizers: text (SentencePiece / Hugging Face), known by content (see `text`)."""

from lwm_data.tokenizers.text import (
    TextTokenizer,
    TokenizedText,
    TokenizerMismatch,
    default_tokenizer_path,
    load_tokenizer,
    resolve_tokenizer,
)

__all__ = [
    "TextTokenizer",
    "TokenizedText",
    "TokenizerMismatch",
    "default_tokenizer_path",
    "load_tokenizer",
    "resolve_tokenizer",
]
