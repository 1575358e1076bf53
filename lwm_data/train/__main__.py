"""`torchrun --nproc-per-node N -m lwm_data.train --config CONFIG.toml [flags]`, also `lwm-train`.

Every TrainConfig setting is a flag (`--ring-size 2`, `--resume`, ...) that overrides the TOML.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from lwm_data.config import Option
from lwm_data.errors import UserError
from lwm_data.train.config import load_config, options

console = Console(stderr=True)


def _flag(option: Option) -> inspect.Parameter:
    """A flag whose absence leaves the TOML's value (default None)."""
    dashed = option.name.replace("_", "-")
    decls = [f"--{dashed}/--no-{dashed}"] if option.base_type is bool else option.cli_flags
    annotation = (bool if option.base_type is bool else option.base_type) | None
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=annotation,
        default=typer.Option(None, *decls, help=f"{option.help} [config default: {option.default}]"),
    )


def command(ctx: typer.Context, config: str | None = None, **values: Any) -> None:
    """Train LLaMA (with LWM's vision heads) on packed shards: data x ring parallel, progressive context.
    `lwm-train plot METRICS.jsonl --output FIG.png` draws a run's metrics."""
    if ctx.invoked_subcommand is not None:
        return
    from lwm_data.train.trainer import train

    try:
        train(load_config(config, values))
    except UserError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None


_context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
_config = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=str | None,
    default=typer.Option(
        None, "--config", help="TOML job config: keys are the flags' names, plus one table per context phase."
    ),
)
command.__signature__ = inspect.Signature([_context, _config] + [_flag(o) for o in options()])


app = typer.Typer(
    add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
)  # plain help: no cut names
app.callback(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})(command)


@app.command()
def plot(
    metrics: Path = typer.Argument(..., help="A run's metrics JSONL (--metrics)."),
    output: Path = typer.Option(..., "--output", help="PNG to write."),
) -> None:
    """Training and eval loss by step, and the eval loss by position per evaluation, in one PNG."""
    from lwm_data.train.plot import plot_metrics

    try:
        titles = plot_metrics(metrics, output)
    except (OSError, ValueError) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(2) from None
    console.print(f"{output}: {', '.join(titles)}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":
    main()
