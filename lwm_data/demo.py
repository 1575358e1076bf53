"""`lwm-data demo`: the whole text pipeline on synthetic books, offline, with embedded defaults.

    synthetic books -> chunk -> qa (cloze backend) -> chat (32K) -> text -> pack (32K, chat + 16% text)

Each stage's output is validated as it is made; the stages' manifests are returned in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from lwm_data import config as settings
from lwm_data.packing import LWM_TEXT_SHARE
from lwm_data.stages import STAGES
from lwm_data.synthetic import generate_books, write_books_jsonl
from lwm_data.validate import validate

CONTEXT = 32768


def run_demo(root: Path, num_books: int = 12, num_words: int = 30000, seed: int = 0) -> Iterator[dict]:
    """Run every stage under `root`, yielding each stage's manifest as it finishes."""
    books = write_books_jsonl(root / "books" / "books.jsonl", generate_books(num_books, num_words, seed))
    out = {name: str(root / name) for name in ("chunks", "qa", "chat", "text", "packed")}
    mix = {"chat": 1 - LWM_TEXT_SHARE, "text": LWM_TEXT_SHARE}
    runs = [
        ("chunk", "chunks", {"input": str(books)}),
        ("qa", "qa", {"input": out["chunks"]}),
        ("chat", "chat", {"chunks": out["chunks"], "qa": out["qa"], "context_lengths": (CONTEXT,), "seed": seed}),
        ("text", "text", {"input": out["chunks"]}),
        ("pack", "packed", {"input": (out["chat"], out["text"]), "seq_len": CONTEXT, "mix": mix,
                            "overflow": "split", "loss_weighting": "example", "seed": seed}),
    ]
    for stage_name, directory, values in runs:
        stage = STAGES[stage_name]
        manifest = stage.run(settings.build(stage.config, {**values, "output": out[directory]}), None)
        violations = validate(out[directory])
        if violations:
            raise RuntimeError(f"{directory} output is invalid: {dict(violations)}")
        manifest["directory"] = out[directory]
        yield manifest
