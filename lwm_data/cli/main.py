"""`lwm-data <stage> ...`: one command per stage, its options derived from the stage's config, and
the tools around them (validate, stats, export-lwm, export-ruler, needle-score, eval-score, serve-llm,
demo). Arguments a stage command does not know are Beam pipeline options and pass through unchanged
(`--runner DataflowRunner --project ...`)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lwm_data import config as settings
from lwm_data.cli import progress
from lwm_data.config import Option
from lwm_data.errors import UserError
from lwm_data.pipelines.common import check_beam_args
from lwm_data.pipelines.registry import STAGES, Stage

app = typer.Typer(
    help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
)  # click's plain help: it wraps help text and never cuts an option name (rich's boxes do at 80 columns)
console = Console()
BEAM_OPTIONS = {"allow_extra_args": True, "ignore_unknown_options": True}
_STANDARD_SECTIONS = {
    "stage",
    "lwm_data_version",
    "created",
    "seconds",
    "run",
    "config",
    "tokenizer",
    "counts",
    "stats",
    "files",
    "pipeline",
}


def print_manifest(manifest: dict) -> None:
    counts = manifest["counts"]
    table = Table(title=f"{manifest['stage']}: {counts['in']} in", show_header=False)
    table.add_row("out", str(counts["out"]))
    for reason, n in counts["filtered"].items():
        if n:
            table.add_row(f"filtered: {reason}", str(n))
    for reason, n in counts["dead_lettered_by_reason"].items():
        table.add_row(f"dead-lettered: {reason}", str(n))
    stats = manifest.get("stats", {})
    for name, value in stats.items():
        table.add_row(name, _number(value))
    for section, values in manifest.items():  # stage-specific sections, e.g. pack's `packing`
        if section not in _STANDARD_SECTIONS and isinstance(values, dict):
            for name, value in values.items():
                if stats.get(name) != value:  # a figure the stats above already show is not repeated
                    table.add_row(f"{section}: {name}", _number(value))
    if "seconds" in manifest:
        table.add_row("seconds", str(manifest["seconds"]))
    console.print(table)
    if "pipeline" in manifest:
        print_pipeline(manifest["pipeline"])


def print_pipeline(pipeline: dict) -> None:
    """A whole-pipeline job's counts, stage by stage."""
    table = Table(title=f"run {pipeline['name']}: every stage")
    for column in ("stage", "in", "out", "filtered", "dead-lettered", "balanced"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, counts in pipeline["stages"].items():
        table.add_row(
            stage,
            *(_number(counts[k]) for k in ("in", "out", "filtered_total", "dead_lettered")),
            "yes" if counts["balanced"] else "[red]no[/red]",
        )
    console.print(table)


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


# ---- stage commands, derived from each stage's config ----


def _cli_parameter(option: Option) -> inspect.Parameter:
    """The Typer parameter of one setting: its annotation and its typer.Option default."""
    default: Any = ... if option.required else option.default
    if option.base_type is bool:
        annotation = bool
        decls = [f"--{option.name.replace('_', '-')}/--no-{option.name.replace('_', '-')}"]
    elif option.repeat:
        annotation, decls = list[str] | None, option.cli_flags
        default = None if option.required else list(option.default) or None
    elif option.takes_text:
        annotation, decls = str | None, option.cli_flags
        default = default if default is ... else _as_text(option.default)
    else:
        annotation = option.base_type | None if option.optional else option.base_type
        decls = option.cli_flags
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=typer.Option(default, *decls, help=option.help, show_default=default is not None),
    )


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return (
            ",".join(map(str, value)) if value and all(isinstance(v, (int, float)) for v in value) else " ".join(value)
        )
    return str(value)


def stage_command(stage: Stage) -> Callable[..., None]:
    """`lwm-data <stage>`: options from the stage's config; extra arguments are Beam options."""
    options = settings.options(stage.config)

    def command(ctx: typer.Context, **values: Any) -> None:
        given = {o.name: values[o.name] for o in options if values[o.name] is not None}
        with user_errors():
            if stage.takes_beam_options:
                check_beam_args(list(ctx.args), [flag for o in options for flag in o.cli_flags])
            config = settings.build(stage.config, given)
            with progress.live():
                manifest = stage.run(config, list(ctx.args) if stage.takes_beam_options else None)
        print_manifest(manifest)
        console.print(f"written to {config.output}")

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    parameters = [context] + [_cli_parameter(o) for o in options]
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = stage.help
    return command


@contextmanager
def user_errors() -> Iterator[None]:
    """Print a configuration error (what to change) and exit 2, instead of a traceback."""
    try:
        yield
    except UserError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None


for _stage in STAGES.values():
    app.command(_stage.name, help=_stage.help, context_settings=BEAM_OPTIONS if _stage.takes_beam_options else None)(
        stage_command(_stage)
    )


# ---- whole pipelines ----


@app.command("run", context_settings=BEAM_OPTIONS)
def run_pipeline(
    ctx: typer.Context,
    pipeline: str = typer.Argument(..., help="books (chunk -> qa -> chat + text -> pack) or video (video -> pack)."),
    config: str = typer.Option(..., "--config", help="TOML: one table per stage, keys as the stage's options."),
    output: str | None = typer.Option(None, "--output", help="Replaces the TOML's top-level `output`."),
    keep_intermediate: bool = typer.Option(
        False, "--keep-intermediate", help="Also keep every upstream stage's output."
    ),
) -> None:
    """A whole pipeline as ONE Beam job; `--<stage>.<option> VALUE` overrides the TOML, the rest goes to Beam."""
    from lwm_data.recipes import run

    with user_errors(), progress.live():
        manifests = run.run(pipeline, config, list(ctx.args), keep_intermediate, output)
    for manifest in manifests:
        print_manifest(manifest)
    console.print("written to " + ", ".join(m["config"]["output"] for m in manifests))


# ---- tools ----


@app.command()
def validate(directory: str = typer.Argument(..., help="Any stage's output directory.")) -> None:
    """Check a stage's output against its schema and invariants; exit 1 on any violation."""
    from lwm_data import outputs
    from lwm_data.cli.validate import validate as run_validate

    with user_errors():
        outputs.read_manifest(directory)  # no manifest: not a stage's output (exit 2), not an invalid one
    violations = run_validate(directory)
    if violations:
        for name, n in violations.most_common():
            console.print(f"[red]INVALID[/red] {name}: {n}")
        raise typer.Exit(1)
    console.print(f"[green]valid[/green] {directory}")


@app.command()
def stats(
    directory: str = typer.Argument(..., help="Any stage's output directory."),
    plot: Path | None = typer.Option(None, "--plot", help="Also save figures to this PNG."),
) -> None:
    """Counts and token totals of a stage's output; with --plot, its distributions."""
    from lwm_data.cli.stats import collect_stats
    from lwm_data.stats import plot_stats

    with user_errors():
        collected = collect_stats(directory)
    table = Table(title=f"{collected.stage}: {directory}", show_header=False)
    counts = collected.counts
    for name in ("in", "out", "filtered_total", "dead_lettered"):
        table.add_row(name.replace("_total", ""), f"{counts.get(name, 0):,}")
    for name, value in collected.totals.items():
        table.add_row(name, _number(value))
    for kind, tokens in collected.tokens_by_kind.items():
        table.add_row(f"tokens: {kind}", f"{tokens:,}")
    console.print(table)
    if plot:
        titles = plot_stats(collected, str(plot))
        console.print(f"{plot}: {', '.join(titles)}")


@app.command("export-lwm")
def export_lwm(
    input: str = typer.Option(
        ..., "--input", help="Output directory of a stage of examples (chat, text, import-lwm, ...)."
    ),
    output: str = typer.Option(..., "--output", help="LWM JSONL file to write."),
    tokenizer: str | None = typer.Option(
        None, help="A copy of the input's tokenizer, where its recorded path is not reachable."
    ),
) -> None:
    """Unpacked examples -> LWM JSONL (per-line `fields` spec), for LWM's own JAX loaders."""
    from lwm_data.pipelines import export_lwm as job

    with user_errors():
        counts = job.export(input, output, tokenizer)
    console.print(f"{counts.output} of {counts.input} examples written to {output}")
    for reason, n in counts.dead_lettered.items():
        console.print(f"[red]not exported[/red] {reason}: {n} (see {output}{job.ERRORS_SUFFIX})")
    if counts.dead_lettered:
        raise typer.Exit(1)


@app.command("vision-decode")
def vision_decode(
    input: str = typer.Option(
        ..., "--input", help="Output directory of vision-codes, video, image or vision-sequences."
    ),
    output: str = typer.Option(..., "--output", help="Directory for the PNG frames / MP4s."),
    vqgan: str | None = typer.Option(None, help="VQ-GAN weights (default: the one the input's manifest names)."),
    vqgan_subfolder: str = typer.Option("", help="Subfolder of --vqgan holding the VQModel."),
    limit: int = typer.Option(8, help="Items to decode (0: all)."),
    mp4: bool = typer.Option(False, "--mp4", help="One MP4 per item instead of PNG frames."),
    fps: float = typer.Option(4.0, help="Frame rate of the MP4s."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Stored VQ-GAN codes -> PNG frames or MP4s, to look at what a dataset holds."""
    from lwm_data import outputs
    from lwm_data.vision import preview

    with user_errors():
        model = preview.vqgan_of(outputs.read_manifest(input), vqgan, vqgan_subfolder, device)
        written = preview.write_pictures(input, output, model, limit, mp4, fps)
    console.print(f"{len(written)} files written to {output}")


@app.command("convert-vqgan")
def convert_vqgan(
    input: str = typer.Option(
        ..., "--input", help="LWM's VQ-GAN checkpoint: the `vqgan` params pickle of its JAX release."
    ),
    output: str = typer.Option(..., "--output", help="Directory for the diffusers VQModel (any Beam filesystem)."),
) -> None:
    """LWM's VQ-GAN (JAX) -> a diffusers VQModel directory that --vqgan loads, encoder and decoder."""
    from lwm_data.tokenizers.lwm_vqgan import convert

    with user_errors():
        provenance = convert(input, output)
    console.print(f"{provenance['tensors']} tensors converted from {input} to {output}; pixels in [-1, 1] (recorded)")


@app.command("needle-score")
def needle_score(
    needles: str = typer.Option(..., "--needles", help="Output directory of `lwm-data needle`."),
    responses: str = typer.Option(
        ..., "--responses", help='JSONL of model outputs: {"example_id": ..., "response": ...}.'
    ),
    png: str | None = typer.Option(None, help="Heatmap to write (default: <responses>.accuracy.png)."),
) -> None:
    """Score model responses: print the context-by-depth accuracy grid and write its heatmap."""
    from lwm_data import files, outputs
    from lwm_data.errors import WrongInput
    from lwm_data.text.needle import accuracy_grid, plot_grid, read_responses, score_rows

    with user_errors():
        outputs.read_manifest(needles, ("needle",), "--needles")
        if not files.exists(responses):
            raise WrongInput(f"no responses file at {responses}")
        rows = outputs.read_table(needles, ["example_id", "context_length", "depth", "needles", "retrieve"]).to_pylist()
    with files.open(responses) as f:
        answers, bad = read_responses(f.read().decode().splitlines())
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
        cells = (
            "-" if grid.counts[i, j] == 0 else f"{grid.accuracy[i, j]:.2f}" for i in range(len(grid.context_lengths))
        )
        table.add_row(f"{depth:.0%}", *cells)
    console.print(table)
    console.print(f"mean accuracy {sum(r['score'] for r in scored) / len(scored):.3f}")
    png = png or f"{responses}.accuracy.png"
    plot_grid(grid, png)
    console.print(f"heatmap: {png}")


@app.command("eval-score")
def eval_score(
    input: str = typer.Option(..., "--input", help="Output directory of `lwm-data eval-run` (responses)."),
    output: str = typer.Option(..., "--output", help="Directory for summary.json, scores.jsonl and heatmaps."),
) -> None:
    """Score an eval set's responses with RULER's metrics: accuracy per task x length (x depth), RULER's
    average per length; writes summary.json, scores.jsonl and one heatmap per task."""
    import json

    from lwm_data import files, outputs
    from lwm_data.errors import WrongInput
    from lwm_data.text.evalscore import grids, scored_rows, summary
    from lwm_data.text.needle import plot_grid

    columns = ["example_id", "task", "context_length", "depth", "answers", "response"]
    with user_errors():
        outputs.read_manifest(input, ("eval-run",), "eval-score")
        rows = outputs.read_table(input, columns).to_pylist()
        if not rows:
            raise WrongInput(f"{input} holds no responses")
    scored = scored_rows(rows)
    result = summary(scored)
    files.write_json(files.join(output, "summary.json"), result)
    with files.create(files.join(output, "scores.jsonl")) as f:
        f.write("".join(json.dumps(r) + "\n" for r in scored).encode())
    lengths = list(result["average"])
    table = Table(title=f"eval accuracy ({len(scored)} responses)")
    table.add_column("task")
    for length in lengths:
        table.add_column(length, justify="right")
    for task, by_length in result["tasks"].items():
        table.add_row(task, *(f"{by_length[n]:.3f}" if n in by_length else "-" for n in lengths))
    table.add_row("average", *(f"{result['average'][n]:.3f}" for n in lengths))
    console.print(table)
    for task, grid in grids(scored).items():
        plot_grid(grid, files.join(output, f"{task}.png"), title=f"{task} accuracy")
    console.print(f"written to {output}: summary.json, scores.jsonl, {len(result['tasks'])} heatmaps")


@app.command("export-ruler")
def export_ruler(
    input: str = typer.Option(..., "--input", help="Output directory of `lwm-data evalset`."),
    output: str = typer.Option(..., "--output", help="Directory for <length>/<task>/validation.jsonl."),
) -> None:
    """An eval set in RULER's JSONL layout (`input`, `outputs`, `length`), for RULER's own harness."""
    from lwm_data.pipelines.evalset import export_ruler as job

    with user_errors():
        written = job(input, output)
    console.print(f"{sum(written.values())} prompts in {len(written)} files written to {output}")


@app.command("serve-llm", context_settings=BEAM_OPTIONS)
def serve_llm(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Model directory or Hugging Face name."),
    port: int = typer.Option(8000, help="Port on 127.0.0.1."),
    vllm_python: str | None = typer.Option(
        None, help="Python with vLLM installed (default: $LWM_VLLM_PYTHON or this one)."
    ),
) -> None:
    """Run vLLM's OpenAI server for `lwm-data qa --backend openai` (extra arguments go to vLLM)."""
    import os

    from lwm_data.text.llm import vllm_command

    command = vllm_command(model, port, vllm_python, tuple(ctx.args))
    console.print(" ".join(command))
    os.execvp(command[0], command)


@app.command()
def demo(
    output: Path = typer.Option(Path("lwm-data-demo"), help="Directory for the synthetic inputs and every output."),
    books: int = typer.Option(8, help="Synthetic books to generate."),
    words: int = typer.Option(30000, help="Mean words per book."),
    videos: int = typer.Option(6, help="Synthetic videos to generate."),
    steps: int = typer.Option(20, help="Training steps."),
    endpoint: str | None = typer.Option(
        None, help="OpenAI-compatible server (vLLM) for QA; default: the offline cloze backend."
    ),
    model: str | None = typer.Option(None, help="The served model's name, with --endpoint."),
    seed: int = typer.Option(0),
    inputs_only: bool = typer.Option(False, "--inputs-only", help="Only write the synthetic books and videos."),
) -> None:
    """Everything on synthetic data, offline: books -> 32K chat, videos -> VQ-GAN tokens, packing, training."""
    from lwm_data.cli.demo import DemoOptions, run_demo, summary_rows, write_inputs

    options = DemoOptions(output.resolve(), books, words, videos, steps, endpoint, model, seed)
    if inputs_only:
        for path in write_inputs(options.output, options):
            console.print(str(output / path.relative_to(options.output)))  # as the user named it
        return
    with user_errors(), progress.live():
        result = run_demo(options, report=lambda step: console.print(f"[bold]{step}[/bold]"))
    table = Table(title="lwm-data demo")
    for column in ("stage", "in", "out", "filtered", "dead", "rows", "tokens", "fill"):
        table.add_column(column, justify="left" if column == "stage" else "right", no_wrap=True)
    for row in summary_rows(result):
        table.add_row(*row)
    losses = result.losses
    console.print(table)
    evals = result.eval_losses
    console.print(
        f"train: {len(losses)} steps of the tiny model over a ring of 2, loss {losses[0]:.2f} -> {losses[-1]:.2f}, "
        f"held-out loss {evals[0]:.2f} -> {evals[-1]:.2f}"
    )
    for name, directory in result.directories.items():
        console.print(f"{name:<11} {directory}")
    console.print(f"{'stats plot':<11} {result.plot}")
    console.print(f"{'train plot':<11} {result.train_plot}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
