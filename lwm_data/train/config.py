"""The trainer's one job config: TOML keys and `lwm-train` flags are the field names of TrainConfig
(lwm_data.config derives both); `[[phases]]` tables are the progressive-context phases (LWM's
32K -> 1M schedule: one phase per context length).

    model = "tiny"
    ring_size = 2
    [[phases]]
    seq_len = 1024
    steps = 100
    rope_theta = 1e6

`--data` and `--steps` on the command line apply to every phase (a one-phase config is the usual
case). "Phase", not "stage": a stage is a data command (`lwm-data chunk`, ...). Configs written
before the rename say `[[stages]]`; they still load, with a warning.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, replace
from typing import Any

from lwm_data import config as settings
from lwm_data.config import setting
from lwm_data.errors import ConfigError
from lwm_data.train.model import PRESETS, ModelConfig, preset

log = logging.getLogger(__name__)
SCHEDULES = ("constant", "cosine")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class PhaseConfig:
    """One context-length phase; it starts from the previous phase's weights with a fresh optimizer."""

    seq_len: int = setting(help="Tokens per row (the packed shards' length).")
    steps: int = setting(help="Optimizer steps in this phase.")
    rope_theta: float | None = setting(
        None, "RoPE base for this phase (LWM: 1e6 at 32K ... 5e7 at 1M); default: the model's (init_from's)."
    )
    lr: float | None = setting(None, "Peak learning rate for this phase (default: the job's lr).")
    data: str = setting("", "Packed directory of this phase (default: the job's data).")


@dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = setting("tiny", f"Model preset: {', '.join(PRESETS)} (ignored with init_from).")
    init_from: str = setting(
        "", "Hugging Face LLaMA checkpoint dir to start from (config.json + safetensors): the model's shape too."
    )
    vision: bool = setting(
        True, "LWM's vision embedding and head (vision vocab 8448); on a text-only init_from, LWM's Stage II."
    )
    attention_backend: str = setting("auto", "block/ring attention backend: auto, torch or triton.")
    # parallelism
    ring_size: int = setting(1, "Ranks per ring (sequence parallel); data-parallel ranks = world size / ring_size.")
    activation_checkpointing: bool = setting(False, "Recompute each block in the backward pass.")
    dtype: str = setting("auto", "float32, bfloat16, or auto (bfloat16 on GPU, float32 on CPU).")
    # batch and optimizer
    batch_size: int = setting(1, "Rows per data-parallel rank per micro-batch.")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    lr: float = setting(3e-4, "Peak learning rate.")
    schedule: str = setting("cosine", "After warmup: constant, or cosine down to min_lr_ratio * lr at the phase's end.")
    warmup_steps: int = setting(0, "Linear warmup steps at the start of every phase.")
    min_lr_ratio: float = setting(0.1, "Cosine schedule's final learning rate, as a fraction of lr.")
    weight_decay: float = setting(0.1, "AdamW weight decay (matrices and embeddings; not norms).")
    beta1: float = setting(0.9, "AdamW beta1.")
    beta2: float = setting(0.95, "AdamW beta2.")
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this (0: no clipping).")
    seed: int = setting(0, "Seed of the initialisation and of the data order.")
    # data
    data: str = setting("", "Packed directory for every phase (overrides the phases' own).")
    steps: int | None = setting(None, "Steps of every phase (overrides the phases' own).")
    num_workers: int = setting(2, "DataLoader worker processes per rank.")
    # outputs
    checkpoint_dir: str = setting("", "Directory of DCP checkpoints (step-N/); empty: no checkpoints.")
    checkpoint_every: int = setting(0, "Checkpoint every N steps as well as at each phase's end (0: ends only).")
    resume: bool = setting(False, "Continue from the latest checkpoint in checkpoint_dir.")
    metrics: str = setting("", "JSONL file: one line per optimizer step (step, loss, tokens_per_s, mfu, ...).")
    log_every: int = setting(10, "Gather metrics (a host sync) every N steps; they are still written for each step.")
    eval_data: str = setting(
        "", "Packed directory of held-out rows: eval loss at step 0, every eval_every, each phase end."
    )
    eval_every: int = setting(0, "Evaluate every N steps (0: only at step 0 and at each phase's end).")
    eval_batches: int = setting(0, "Global batches per evaluation (0: every row).")
    peak_tflops: float | None = setting(None, "Peak TFLOP/s of one device, for MFU (e.g. 989 for H100/H200 bf16).")
    export: str = setting("", "Directory for the final weights as safetensors (Hugging Face LLaMA layout).")
    progress: bool = setting(True, "Progress bar on rank 0.")
    phases: tuple[PhaseConfig, ...] = ()

    def model_config(self) -> ModelConfig:
        """The init_from checkpoint's shape, else the preset's."""
        if self.init_from:
            from lwm_data.train import pretrained

            return pretrained.model_config(self.init_from, self.vision, self.attention_backend)
        return preset(
            self.model,
            vision_vocab_size=PRESETS[self.model].vision_vocab_size if self.vision else 0,
            attention_backend=self.attention_backend,
        )

    def phase_lr(self, phase: PhaseConfig) -> float:
        return phase.lr if phase.lr is not None else self.lr

    def resolved_phases(self) -> tuple[PhaseConfig, ...]:
        """Phases with the job-wide data and steps applied."""
        phases = []
        for i, phase in enumerate(self.phases, start=1):
            phase = replace(
                phase, data=self.data or phase.data, steps=self.steps if self.steps is not None else phase.steps
            )
            if not phase.data:
                raise ConfigError(
                    f"phase {i} (seq_len {phase.seq_len}) names no data: set its `data` or pass --data DIR"
                )
            phases.append(phase)
        return tuple(phases)

    def validate(self) -> None:
        if self.model not in PRESETS:
            raise ConfigError(f"model must be one of {sorted(PRESETS)}, got {self.model!r}")
        if self.schedule not in SCHEDULES or self.dtype not in DTYPES:
            raise ConfigError(f"schedule must be one of {SCHEDULES} and dtype one of {DTYPES}")
        if min(self.ring_size, self.batch_size, self.grad_accum, self.log_every) < 1 or self.num_workers < 0:
            raise ConfigError("ring_size, batch_size, grad_accum and log_every must be >= 1 and num_workers >= 0")
        if min(self.eval_every, self.eval_batches) < 0:
            raise ConfigError("eval_every and eval_batches must be >= 0")
        if not self.phases:
            raise ConfigError("the config lists no [[phases]]: add one table per context length (seq_len, steps)")
        for i, phase in enumerate(self.resolved_phases(), start=1):
            if phase.seq_len % (2 * self.ring_size):
                raise ConfigError(
                    f"phase {i}: seq_len {phase.seq_len} is not divisible by 2 x ring_size = {2 * self.ring_size} "
                    "(the zigzag layout gives each rank two equal chunks)"
                )
            if phase.steps < 1:
                raise ConfigError(f"phase {i}: steps must be >= 1, got {phase.steps}")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("--resume needs a checkpoint_dir")


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a TOML file (or none) with command-line values on top; validated."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: {error}") from None
    phase_tables = _phase_tables(values, path)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    phases = tuple(settings.build(PhaseConfig, table) for table in phase_tables)
    config = replace(settings.build(TrainConfig, values), phases=phases)
    config.validate()
    return config


def _phase_tables(values: dict[str, Any], path: str | None) -> list[dict[str, Any]]:
    """The `[[phases]]` tables, taken out of `values` (from a config of before the rename, its
    `[[stages]]` tables, with a warning)."""
    if "stages" in values:
        if "phases" in values:
            raise ConfigError(f"{path}: both [[phases]] and [[stages]]; [[stages]] is the old name of [[phases]]")
        log.warning("%s: [[stages]] is deprecated, call the tables [[phases]] (a stage is a data command)", path)
        values["phases"] = values.pop("stages")
    tables = values.pop("phases", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("`phases` must be an array of tables: [[phases]]")
    return tables


def options() -> list[settings.Option]:
    """TrainConfig's settings, as TOML keys and flags (phases are TOML only)."""
    return [o for o in settings.options(TrainConfig) if o.name != "phases"]
