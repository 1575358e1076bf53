"""`lwm-data run books|video --config FILE.toml`: a whole pipeline as ONE Beam job.

The TOML holds the stage settings, one table per stage, keys named as the stage's own options (the
same config dataclasses the stage commands derive from), plus a top-level `output` under which each
stage writes `<output>/<stage>` unless its table names its own `output`:

    output = "out/books"
    [chunk]
    input = "books/*.jsonl.zst"
    [qa]
    backend = "cloze"
    [chat]
    context_lengths = [32768]
    [pack]
    seq_len = 32768
    mix = { chat = 0.84, text = 0.16 }

Inputs between stages are wired here (qa reads chunk's output, ...): a table may not set them.
Command-line overrides take `--output DIR` (the top-level `output`) and `--<stage>.<option> VALUE`
(`--qa.backend openai`, `--pack.seq-len 65536`); everything else is passed to Beam. The effective
config of each stage goes into its manifest; pack's manifest also holds every stage's counts
(`pipeline.stages`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lwm_data import config as settings
from lwm_data.errors import ConfigError
from lwm_data.pipelines.common import Job, check_beam_args
from lwm_data.pipelines.registry import STAGES
from lwm_data.recipes import books, video

Values = dict[str, dict[str, Any]]  # stage -> option name -> value


@dataclass(frozen=True)
class WholePipeline:
    name: str
    stages: tuple[str, ...]  # in order: the TOML tables, the override prefixes
    wiring: Callable[[dict[str, str]], dict[str, dict[str, Any]]]  # stage -> its input options, from the outputs
    job: Callable[[dict[str, Any], list[str] | None, bool], Job]  # configs by stage, Beam args, keep intermediate


PIPELINES = {
    p.name: p
    for p in (
        WholePipeline("books", books.STAGES, books.wiring, books.job),
        WholePipeline("video", video.STAGES, video.wiring, video.job),
    )
}


def split_overrides(args: list[str], pipeline: WholePipeline) -> tuple[Values, list[str]]:
    """`--<stage>.<option> V` / `--<stage>.<option>=V` pairs, and the rest (Beam's options)."""
    overrides: Values = {}
    beam_args: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        stage, dot, rest = arg.removeprefix("--").partition(".")
        if not (arg.startswith("--") and dot and stage in pipeline.stages):
            beam_args.append(arg)
            i += 1
            continue
        name, eq, value = rest.partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            value, i = args[i + 1], i + 1
        overrides.setdefault(stage, {})[name.replace("-", "_")] = _typed(stage, name.replace("-", "_"), value)
        i += 1
    return overrides, beam_args


def _typed(stage: str, name: str, text: str) -> Any:
    option = {o.name: o for o in settings.options(STAGES[stage].config)}.get(name)
    if option is None:
        return text  # `build` names the unknown setting
    if option.base_type is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"--{stage}.{name} takes true or false, not {text!r}")
        return text.lower() in ("true", "1")
    return text if option.base_type is str else option.from_text(text)


def stage_configs(pipeline: WholePipeline, document: dict[str, Any], overrides: Values | None = None) -> dict[str, Any]:
    """Each stage's config from the TOML document and the overrides, inputs wired."""
    unknown = sorted(set(document) - {"output", *pipeline.stages})
    if unknown:
        raise ConfigError(
            f"unknown tables or keys {unknown}; `run {pipeline.name}` has: output, {', '.join(pipeline.stages)}"
        )
    root = document.get("output")
    values: Values = {}
    for stage in pipeline.stages:
        table = {**document.get(stage, {}), **(overrides or {}).get(stage, {})}
        if "output" not in table:
            if root is None:
                raise ConfigError(f"[{stage}] has no output and the config no top-level output")
            table["output"] = f"{root.rstrip('/')}/{stage}"
        values[stage] = table
    for stage, wired in pipeline.wiring({s: values[s]["output"] for s in values}).items():
        clash = sorted(set(wired) & set(values[stage]))
        if clash:
            raise ConfigError(f"[{stage}] {', '.join(clash)}: set by the pipeline (the upstream stage's output)")
        values[stage].update(wired)
    configs = {}
    for stage in pipeline.stages:
        try:
            configs[stage] = settings.build(STAGES[stage].config, values[stage])
        except ConfigError as error:
            raise ConfigError(f"[{stage}] {error}") from None
    return configs


def load(path: str) -> dict[str, Any]:
    from lwm_data import files

    try:
        with files.open(path) as f:
            return tomllib.loads(f.read().decode("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read the config {path}: {error}") from None


def run(
    name: str, config: str | dict[str, Any], args: list[str], keep_intermediate: bool, output: str | None = None
) -> list[dict]:
    """Build and run a whole pipeline from a TOML path or an already parsed document (its tables as
    dicts), `output` replacing its top-level `output`; returns the manifests of what it wrote (pack's last)."""
    pipeline, overrides, beam_args = _checked_arguments(name, args)  # before reading: a typo fails first
    document = load(config) if isinstance(config, str) else config
    if output is not None:
        document = {**document, "output": output}
    configs = stage_configs(pipeline, document, overrides)
    return pipeline.job(configs, beam_args, keep_intermediate).run()


def _checked_arguments(name: str, args: list[str]) -> tuple[WholePipeline, Values, list[str]]:
    if name not in PIPELINES:
        raise ConfigError(f"no pipeline {name!r}; known: {', '.join(PIPELINES)}")
    pipeline = PIPELINES[name]
    overrides, beam_args = split_overrides(args, pipeline)
    check_beam_args(beam_args, [f"--{stage}.<option>" for stage in pipeline.stages])
    return pipeline, overrides, beam_args
