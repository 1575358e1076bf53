"""`lwm-data <stage> ...`: one command per stage. Arguments a command does not know are Beam
pipeline options and pass through unchanged (`--runner DataflowRunner --project ...`)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
BEAM_OPTIONS = {"allow_extra_args": True, "ignore_unknown_options": True}


def print_manifest(manifest: dict) -> None:
    counts = manifest["counts"]
    table = Table(title=f"{manifest['stage']}: {counts['in']} in", show_header=False)
    table.add_row("out", str(counts["out"]))
    for reason, n in counts["filtered"].items():
        table.add_row(f"filtered: {reason}", str(n))
    for reason, n in counts["dead_lettered_by_reason"].items():
        table.add_row(f"dead-lettered: {reason}", str(n))
    for name, value in manifest.get("stats", {}).items():
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value))
    table.add_row("seconds", str(manifest["seconds"]))
    console.print(table)


@app.command(context_settings=BEAM_OPTIONS)
def chunk(
    ctx: typer.Context,
    input: str = typer.Option(..., "--input", help="Glob of JSONL (.gz/.zst), Parquet or .txt books, any Beam filesystem."),
    output: str = typer.Option(..., "--output", help="Output directory."),
    tokenizer: Optional[str] = typer.Option(None, help="SentencePiece .model or Hugging Face tokenizer dir (default: embedded)."),
    chunk_tokens: int = typer.Option(1000, help="Target tokens per chunk."),
    tolerance: float = typer.Option(0.1, help="Chunk length may vary by this fraction to meet a natural boundary."),
    min_book_tokens: int = typer.Option(0, help="Drop (count) books with fewer tokens."),
    max_book_tokens: Optional[int] = typer.Option(None, help="Drop (count) books with more tokens."),
    max_record_bytes: int = typer.Option(256 * 1024 * 1024, help="Dead-letter input records larger than this."),
) -> None:
    """Books -> ~1K-token chunks (Parquet shards + manifest + errors/)."""
    from lwm_data.pipelines import chunk_books

    config = chunk_books.ChunkConfig(
        input=input, output=output, tokenizer=tokenizer, chunk_tokens=chunk_tokens, tolerance=tolerance,
        min_book_tokens=min_book_tokens, max_book_tokens=max_book_tokens, max_record_bytes=max_record_bytes,
    )
    print_manifest(chunk_books.run(config, ctx.args))


@app.command()
def validate(directory: str = typer.Argument(..., help="Any stage's output directory.")) -> None:
    """Check a stage's output against its schema and invariants; exit 1 on any violation."""
    from lwm_data.validate import validate as run_validate

    violations = run_validate(directory)
    if violations:
        for name, n in violations.most_common():
            console.print(f"[red]INVALID[/red] {name}: {n}")
        raise typer.Exit(1)
    console.print(f"[green]valid[/green] {directory}")


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="Where to write inputs and outputs (default: a temp dir)."),
    books: int = typer.Option(12, help="Synthetic books to generate."),
    words: int = typer.Option(30000, help="Mean words per book."),
    seed: int = typer.Option(0),
) -> None:
    """Run the pipeline on synthetic books with embedded defaults and print a summary."""
    from lwm_data.pipelines import chunk_books
    from lwm_data.synthetic import generate_books, write_books_jsonl

    root = workdir or Path(tempfile.mkdtemp(prefix="lwm-data-demo-"))
    books_path = write_books_jsonl(root / "books" / "books.jsonl", generate_books(books, words, seed))
    console.print(f"synthetic books: {books_path}")
    manifest = chunk_books.run(chunk_books.ChunkConfig(input=str(books_path), output=str(root / "chunks")))
    print_manifest(manifest)
    console.print(f"chunks: {root / 'chunks'}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
