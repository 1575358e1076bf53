"""Tokenizers: text (SentencePiece / Hugging Face) and, later, vision (VQ-GAN)."""

from lwm_data.tokenizers.text import TextTokenizer, TokenizedText, default_tokenizer_path, load_tokenizer

__all__ = ["TextTokenizer", "TokenizedText", "default_tokenizer_path", "load_tokenizer"]
