"""`lwm-data evalset`: RULER's long-context task families on the user's books (lwm_data.text.evalset)
as a stage output, and `export_ruler`, RULER's own JSONL layout of it.

Plain Python, like needle: the set is small (a few hundred prompts) and each prompt needs the whole
haystack. The haystack is a glob of book files, or the output directory of `lwm-data chunk` (its
chunks joined per book); book_qa needs the latter plus `--qa` (the output of `lwm-data qa`). Counts
are over haystack records (books, or chunks): `out` = records used, dead-lettered = rejected book
records; stat `prompts`, and `prompts_<task>`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from lwm_data import files, outputs
from lwm_data.config import nested, setting
from lwm_data.errors import ConfigError, Rejection
from lwm_data.outputs import DeadLetterPolicy
from lwm_data.schemas import MANIFEST
from lwm_data.text.books import read_haystack
from lwm_data.text.evalset import BOOK_QA, Document, EvalsetConfig, QAItem, evalset_rows, rows_table
from lwm_data.tokenizers import TextTokenizer, load_tokenizer, resolve_tokenizer

STAGE = "evalset"


@dataclass(frozen=True)
class EvalsetStageConfig:
    haystack: str = setting(help="Glob of book files (JSONL, Parquet, .txt), or the output directory of `chunk`.")
    output: str = setting(help="Output directory.")
    qa: str | None = setting(None, "Output directory of `lwm-data qa` over the --haystack chunks (for book_qa).")
    tokenizer: str | None = setting(None, "Tokenizer that measures lengths (default: the chunks', else embedded).")
    evalset: EvalsetConfig = nested(EvalsetConfig)
    policy: DeadLetterPolicy = nested(DeadLetterPolicy)


def _is_chunk_output(path: str) -> bool:
    return files.exists(files.join(path.rstrip("/"), MANIFEST))


def read_chunks(directory: str) -> tuple[list[tuple[str, str]], list[Document]]:
    """(book id, text) per book and every chunk as a Document, in book and chunk order."""
    table = outputs.read_table(directory, ["book_id", "chunk_index", "text", "num_tokens"])
    rows = sorted(table.to_pylist(), key=lambda r: (r["book_id"], r["chunk_index"]))
    documents = [Document(r["book_id"], r["chunk_index"], r["text"], r["num_tokens"]) for r in rows]
    books: dict[str, list[str]] = {}
    for d in documents:
        books.setdefault(d.book_id, []).append(d.text)
    return [(book_id, "".join(texts)) for book_id, texts in books.items()], documents


def read_qa_items(directory: str, documents: list[Document], tokenizer: TextTokenizer, max_tokens: int) -> list[QAItem]:
    """Every QA pair of a chunk in `documents` whose answer fits in `max_tokens` tokens."""
    known = {(d.book_id, d.chunk_index) for d in documents}
    items = []
    for row in outputs.read_table(directory, ["book_id", "chunk_index", "pairs"]).to_pylist():
        if (row["book_id"], row["chunk_index"]) not in known:
            continue
        for pair in row["pairs"]:
            question, answer = pair["question"].strip(), pair["answer"].strip()
            if question and answer and len(tokenizer.encode(answer)) <= max_tokens:
                items.append(QAItem(row["book_id"], row["chunk_index"], question, answer))
    return sorted(items, key=lambda i: (i.book_id, i.chunk_index, i.question))


def run(config: EvalsetStageConfig, beam_args: list[str] | None = None) -> dict:
    """Read the haystack (and QA), write the eval rows as one EVALSET_SCHEMA shard, the rejected book
    records to errors/, and commit; returns the manifest. (`beam_args` is unused.)"""
    started = outputs.now()
    config.evalset.check()
    texts: list[tuple[str, str]] = []
    documents: list[Document] = []
    rejected: list[Rejection] = []
    if _is_chunk_output(config.haystack):
        manifest = outputs.read_manifest(config.haystack, ("chunk",), "--haystack")
        tokenizer = resolve_tokenizer(manifest.get("tokenizer"), config.tokenizer)
        texts, documents = read_chunks(config.haystack)
        records = len(documents)
    else:
        tokenizer = load_tokenizer(config.tokenizer)
        books, rejected = read_haystack(config.haystack)
        texts = [(book.book_id, book.text) for book in books]
        records = len(texts)
    if not texts:
        raise ConfigError(f"no usable chunks in {config.haystack}")
    qa_items: list[QAItem] = []
    if BOOK_QA in config.evalset.tasks:
        if not documents or not config.qa:
            raise ConfigError("book_qa needs chunks as --haystack (the output of `lwm-data chunk`) and --qa")
        outputs.read_manifest(config.qa, ("qa",), "--qa")
        qa_items = read_qa_items(config.qa, documents, tokenizer, config.evalset.answer_tokens)
        if not qa_items:
            raise ConfigError(f"{config.qa} holds no QA pair of the --haystack chunks")
    rows = list(evalset_rows(texts, tokenizer, config.evalset, qa_items, documents))
    by_task = Counter(r["task"] for r in rows)
    counters = {"in": records + len(rejected), "out": records, "prompts": len(rows)}
    counters |= {f"prompts_{task}": n for task, n in sorted(by_task.items())}
    return outputs.commit_table(STAGE, config, rows_table(rows), rejected, counters, tokenizer.entry, started)


def export_ruler(directory: str, output: str) -> Counter:
    """An evalset in RULER's data layout: `<output>/<length>/<task>/validation.jsonl`, one line per
    prompt with RULER's `index`, `input`, `outputs`, `length` (prompt tokens, BOS included) and an empty
    `answer_prefix` (our prompts end with RULER's answer prefix already), plus `example_id` and `depth`.
    Returns the lines written per file."""
    outputs.read_manifest(directory, (STAGE,), "export-ruler")
    columns = ["example_id", "task", "context_length", "depth", "prompt", "prompt_tokens", "answers"]
    grouped: dict[str, list[str]] = {}
    for row in outputs.read_table(directory, columns).to_pylist():
        path = files.join(output, str(row["context_length"]), row["task"], "validation.jsonl")
        lines = grouped.setdefault(path, [])
        record = {
            "index": len(lines),
            "input": row["prompt"],
            "outputs": row["answers"],
            "length": row["prompt_tokens"],
            "answer_prefix": "",
            "example_id": row["example_id"],
            "depth": row["depth"],
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    for path, lines in grouped.items():
        with files.create(path) as f:
            f.write(("\n".join(lines) + "\n").encode())
    return Counter({path: len(lines) for path, lines in grouped.items()})
