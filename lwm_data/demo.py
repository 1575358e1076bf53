"""`lwm-data demo`: the whole text pipeline on synthetic books, offline, with embedded defaults.

    synthetic books -> chunk -> qa (cloze backend) -> chat (32K) -> pack (32K, chat + 16% text)

Each stage's output is validated as it is made; the stages' manifests are returned in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from lwm_data.synthetic import generate_books, write_books_jsonl
from lwm_data.validate import validate

CONTEXT = 32768


def run_demo(root: Path, num_books: int = 12, num_words: int = 30000, seed: int = 0) -> Iterator[dict]:
    """Run every stage under `root`, yielding each stage's manifest as it finishes."""
    from lwm_data.pipelines import chat_examples, chunk_books, pack, qa_pairs

    books = write_books_jsonl(root / "books" / "books.jsonl", generate_books(num_books, num_words, seed))
    stages: list[tuple[str, Callable[[str], dict]]] = [
        ("chunks", lambda out: chunk_books.run(chunk_books.ChunkConfig(input=str(books), output=out))),
        ("qa", lambda out: qa_pairs.run(qa_pairs.QAConfig(input=str(root / "chunks"), output=out))),
        ("chat", lambda out: chat_examples.run(
            chat_examples.ChatJobConfig(chunks=str(root / "chunks"), qa=str(root / "qa"), output=out,
                                        context_lengths=(CONTEXT,), seed=seed))),
        ("packed", lambda out: pack.run(
            pack.PackConfig(input=f"{root / 'chat'},{root / 'chunks'}", output=out, seq_len=CONTEXT,
                            mix={"chat": 0.84, "text": 0.16}, overflow="split", loss_weighting="example", seed=seed))),
    ]
    for name, run_stage in stages:
        output = str(root / name)
        manifest = run_stage(output)
        violations = validate(output)
        if violations:
            raise RuntimeError(f"{name} output is invalid: {dict(violations)}")
        manifest["directory"] = output
        yield manifest
