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
        if n:
            table.add_row(f"filtered: {reason}", str(n))
    for reason, n in counts["dead_lettered_by_reason"].items():
        table.add_row(f"dead-lettered: {reason}", str(n))
    for name, value in manifest.get("stats", {}).items():
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value))
    if "seconds" in manifest:
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
    """Run every text stage on synthetic books, offline, and print a summary of each."""
    from lwm_data.demo import run_demo

    root = workdir or Path(tempfile.mkdtemp(prefix="lwm-data-demo-"))
    console.print(f"working in {root}")
    for manifest in run_demo(root, books, words, seed):
        print_manifest(manifest)
        console.print(f"[green]valid[/green] {manifest['directory']}")


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


@app.command(context_settings=BEAM_OPTIONS)
def chat(
    ctx: typer.Context,
    chunks: str = typer.Option(..., "--chunks", help="Chunk stage output directory."),
    qa: str = typer.Option(..., "--qa", help="QA stage output directory."),
    output: str = typer.Option(..., "--output", help="Output directory."),
    context: str = typer.Option("32768", "--context", help="Context lengths, comma-separated (e.g. 32768,131072,1048576)."),
    pairs_per_example: int = typer.Option(8, help="QA turns per example (fewer when the window has fewer)."),
    stride: float = typer.Option(1.0, help="Window step as a fraction of the window (1: no overlap, 0.5: half)."),
    seed: int = typer.Option(0),
    tokenizer: Optional[str] = typer.Option(None, help="Default: the chunk stage's tokenizer (from its manifest)."),
) -> None:
    """Chunks + QA -> long-context chat examples (LWM's chat form), one or more context lengths."""
    from lwm_data.pipelines import chat_examples

    config = chat_examples.ChatJobConfig(
        chunks=chunks, qa=qa, output=output, context_lengths=_int_list(context),
        pairs_per_example=pairs_per_example, stride=stride, seed=seed, tokenizer=tokenizer,
    )
    print_manifest(chat_examples.run(config, ctx.args))


@app.command("import-lwm", context_settings=BEAM_OPTIONS)
def import_lwm(
    ctx: typer.Context,
    input: str = typer.Option(..., "--input", help="Glob of LWM JSONL files, any Beam filesystem."),
    output: str = typer.Option(..., "--output", help="Output directory."),
    fields: Optional[list[str]] = typer.Option(
        None, "--fields", help="Dataset-wide field spec; repeat for a list (one chosen per line). Default: each line's."
    ),
    fields_key: str = typer.Option("fields", help="Key of a line's own field spec."),
    tokenizer: Optional[str] = typer.Option(None, help="SentencePiece .model or tokenizer dir (default: embedded)."),
    seed: int = typer.Option(0, help="0 picks list-valued specs exactly as LWM does (by line number)."),
    prepend_text: str = typer.Option("", help="LWM's prepend_text, put before the first text field."),
    max_frames: int = typer.Option(-1, help="LWM's max_n_frames: keep this many frames, uniformly (-1: all)."),
) -> None:
    """LWM JSONL -> unpacked examples, tokenized exactly as LWM's processors do."""
    from lwm_data.pipelines import import_lwm as job

    config = job.ImportConfig(
        input=input, output=output, fields=tuple(fields or ()), fields_key=fields_key, tokenizer=tokenizer,
        seed=seed, prepend_text=prepend_text, max_frames=max_frames,
    )
    print_manifest(job.run(config, ctx.args))


@app.command("export-lwm")
def export_lwm(
    input: str = typer.Option(..., "--input", help="Output directory of a stage of unpacked examples (chat, vision, ...)."),
    output: str = typer.Option(..., "--output", help="LWM JSONL file to write."),
    tokenizer: Optional[str] = typer.Option(None, help="Default: the tokenizer in the input's manifest."),
) -> None:
    """Unpacked examples -> LWM JSONL (per-line `fields` spec), for LWM's own JAX loaders."""
    from lwm_data.pipelines import import_lwm as job

    counts = job.export(input, output, tokenizer)
    console.print(f"{counts.output} of {counts.input} examples written to {output}")
    for reason, n in counts.dead_lettered.items():
        console.print(f"[red]not exported[/red] {reason}: {n} (see {output}{job.EXPORT_ERRORS_SUFFIX})")
    if counts.dead_lettered:
        raise typer.Exit(1)


@app.command()
def needle(
    haystack: str = typer.Option(..., "--haystack", help="Glob of book files (JSONL, Parquet, .txt) for the haystack."),
    output: str = typer.Option(..., "--output", help="Output directory."),
    context: str = typer.Option(..., "--context", help="Context lengths, comma-separated."),
    depths: str = typer.Option("0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", "--depths", help="Needle depths in [0, 1]."),
    needles: int = typer.Option(1, "--needles", help="Needles per prompt (distinct cities)."),
    retrieve: int = typer.Option(1, "--retrieve", help="Needles asked for per prompt."),
    rounds: int = typer.Option(1, help="Prompts per (context, depth), each over a different haystack."),
    answer_tokens: int = typer.Option(64, help="Tokens left free for the answer within the context length."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer that measures context lengths (default: embedded)."),
    seed: int = typer.Option(0),
) -> None:
    """Needle-in-a-haystack eval set (LWM's protocol)."""
    from lwm_data.needle import NeedleConfig, make_needle_set
    from lwm_data.tokenizers import load_tokenizer

    config = NeedleConfig(_int_list(context), _float_list(depths), needles, retrieve, rounds, seed, answer_tokens)
    try:
        manifest = make_needle_set(haystack, output, config, load_tokenizer(tokenizer))
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1)
    print_manifest(manifest)


@app.command("needle-score")
def needle_score(
    needles: str = typer.Option(..., "--needles", help="Output directory of `lwm-data needle`."),
    responses: str = typer.Option(..., "--responses", help='JSONL of model outputs: {"example_id": ..., "response": ...}.'),
    png: Optional[str] = typer.Option(None, help="Heatmap to write (default: <responses>.accuracy.png)."),
) -> None:
    """Score model responses: print the context-by-depth accuracy grid and write its heatmap."""
    from apache_beam.io.filesystems import FileSystems

    from lwm_data import io as lwm_io
    from lwm_data.needle import accuracy_grid, plot_grid, read_responses, score_rows

    with FileSystems.open(responses) as f:
        answers, bad = read_responses(f.read().decode().splitlines())
    rows = lwm_io.read_table(needles, ["example_id", "context_length", "depth", "needles", "retrieve"]).to_pylist()
    scored, missing = score_rows(rows, answers)
    if not scored:
        console.print("[red]no response matches a needle prompt[/red]")
        raise typer.Exit(1)
    grid = accuracy_grid(scored)
    table = Table(title=f"needle accuracy ({len(scored)} scored, {len(missing)} without response, {bad} bad lines)")
    table.add_column("depth")
    for length in grid.context_lengths:
        table.add_column(str(length), justify="right")
    for j, depth in enumerate(grid.depths):
        cells = ("-" if grid.counts[i, j] == 0 else f"{grid.accuracy[i, j]:.2f}" for i in range(len(grid.context_lengths)))
        table.add_row(f"{depth:.0%}", *cells)
    console.print(table)
    console.print(f"mean accuracy {sum(r['score'] for r in scored) / len(scored):.3f}")
    png = png or f"{responses}.accuracy.png"
    plot_grid(grid, png)
    console.print(f"heatmap: {png}")


@app.command(context_settings=BEAM_OPTIONS)
def pack(
    ctx: typer.Context,
    input: str = typer.Option(..., "--input", help="Example or chunk-stage directories, comma-separated."),
    output: str = typer.Option(..., "--output", help="Output directory."),
    seq_len: int = typer.Option(..., "--seq-len", help="Tokens per packed row."),
    mix: Optional[str] = typer.Option(None, help="Shares of tokens by kind, e.g. chat=0.84,text=0.16."),
    loss_weighting: str = typer.Option("token", help="token: weights as they are; example: every example counts equally."),
    overflow: str = typer.Option("drop", help="Examples longer than a row: drop, truncate, or split (plain text only)."),
    buffer: int = typer.Option(10_000, help="Examples sorted together by best-fit-decreasing."),
    seed: int = typer.Option(0, help="Seed of the example order."),
    bos_id: Optional[int] = typer.Option(None, help="BOS id for chunk inputs (default: their tokenizer's)."),
) -> None:
    """Examples -> fixed-length packed rows with segment ids (Parquet shards + manifest + errors/)."""
    from lwm_data.packing import parse_mix
    from lwm_data.pipelines import pack as pack_stage

    config = pack_stage.PackConfig(
        input=input, output=output, seq_len=seq_len, mix=parse_mix(mix), loss_weighting=loss_weighting,
        overflow=overflow, buffer=buffer, seed=seed, bos_id=bos_id,
    )
    manifest = pack_stage.run(config, ctx.args)
    print_manifest(manifest)
    summary = manifest["packing"]
    console.print(f"fill {summary['fill_efficiency']:.4%}, {summary['segments_per_row']} segments per row")


@app.command()
def stats(
    directory: str = typer.Argument(..., help="Any stage's output directory."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also save figures to this PNG."),
) -> None:
    """Counts and token totals of a stage's output; with --plot, its distributions."""
    from lwm_data.stats import collect_stats, plot_stats

    collected = collect_stats(directory)
    table = Table(title=f"{collected.stage}: {directory}", show_header=False)
    counts = collected.counts
    for name in ("in", "out", "filtered_total", "dead_lettered"):
        table.add_row(name.replace("_total", ""), f"{counts.get(name, 0):,}")
    for name, value in collected.totals.items():
        table.add_row(name, f"{value:,}" if isinstance(value, int) else str(value))
    for kind, tokens in collected.tokens_by_kind.items():
        table.add_row(f"tokens: {kind}", f"{tokens:,}")
    console.print(table)
    if plot:
        titles = plot_stats(collected, str(plot))
        console.print(f"{plot}: {', '.join(titles)}")


@app.command(context_settings=BEAM_OPTIONS)
def qa(
    ctx: typer.Context,
    input: str = typer.Option(..., "--input", help="A chunk stage's output directory (or a glob of its shards)."),
    output: str = typer.Option(..., "--output", help="Output directory."),
    backend: str = typer.Option("cloze", help="vllm (start a local server), openai (--endpoint) or cloze (offline)."),
    model: Optional[str] = typer.Option(None, help="Model path or name (vllm), served model name (openai)."),
    endpoint: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."),
    pairs_per_chunk: int = typer.Option(3, help="Pairs asked for per chunk."),
    concurrency: int = typer.Option(8, help="Requests in flight per worker."),
    cache: Optional[str] = typer.Option(None, help="Response cache directory (any Beam filesystem): reruns reuse answers."),
    prompt_file: Optional[str] = typer.Option(None, help='JSON prompt template {"version", "system", "user"}.'),
    max_asks: int = typer.Option(3, help="Requests per chunk, re-asks of invalid replies included."),
    max_tokens: int = typer.Option(512, help="Reply token limit; a reply cut off there is invalid."),
    temperature: float = typer.Option(0.7),
    seed: Optional[int] = typer.Option(None, help="Per-request sampling seed (re-asks add 1 each)."),
    timeout: float = typer.Option(120.0, help="Per-request timeout, seconds."),
    max_retries: int = typer.Option(4, help="Retries per request on 429, 5xx, connection errors and timeouts."),
    min_question_chars: int = typer.Option(10),
    max_question_chars: int = typer.Option(300),
    max_answer_chars: int = typer.Option(300),
    require_question_mark: bool = typer.Option(True, help="A question must end with '?'."),
    vllm_python: Optional[str] = typer.Option(None, help="Python with vLLM installed (default: $LWM_VLLM_PYTHON or this one)."),
    vllm_args: str = typer.Option("", help="Extra arguments for the vLLM server, one string (vllm backend)."),
) -> None:
    """Chunks -> question-answer pairs per chunk (Parquet shards + manifest + errors/)."""
    import shlex

    from lwm_data.pipelines import qa_pairs
    from lwm_data.qa import PairLimits

    limits = PairLimits(
        min_question_chars=min_question_chars, max_question_chars=max_question_chars,
        max_answer_chars=max_answer_chars, require_question_mark=require_question_mark,
    )
    config = qa_pairs.QAConfig(
        input=input, output=output, backend=backend, model=model, endpoint=endpoint, pairs_per_chunk=pairs_per_chunk,
        concurrency=concurrency, cache=cache, prompt_file=prompt_file, max_asks=max_asks, max_tokens=max_tokens,
        temperature=temperature, seed=seed, timeout_s=timeout, max_retries=max_retries, limits=limits,
        vllm_python=vllm_python, vllm_args=tuple(shlex.split(vllm_args)),
    )
    print_manifest(qa_pairs.run(config, ctx.args))


@app.command("serve-llm", context_settings=BEAM_OPTIONS)
def serve_llm(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model directory or Hugging Face name."),
    port: int = typer.Option(8000, help="Port on 127.0.0.1."),
    vllm_python: Optional[str] = typer.Option(None, help="Python with vLLM installed (default: $LWM_VLLM_PYTHON or this one)."),
) -> None:
    """Run vLLM's OpenAI server for `lwm-data qa --backend openai` (extra arguments go to vLLM)."""
    import os

    from lwm_data.llm import vllm_command

    command = vllm_command(model, port, vllm_python, tuple(ctx.args))
    console.print(" ".join(command))
    os.execvp(command[0], command)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
