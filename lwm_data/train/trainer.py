"""The training loop: progressive-context phases over packed shards, read top to bottom.

For each phase: set its RoPE theta, open its data at its seq_len, make a fresh AdamW and run `steps`
optimizer steps of `grad_accum` micro-batches, warmup then constant or cosine. The loss is LWM's:
0.5 x (text-head loss over text targets) + 0.5 x (vision-head loss over vision targets), each a
weighted mean over the whole global batch (every rank, every micro-batch); a batch with targets of
one kind only uses that kind's loss alone. Because the denominators are global, the loss and its
gradient do not depend on how the batch is split over ranks, rings and micro-batches.

Logged per optimizer step (rank 0: progress bar and the JSONL metrics file): step, loss, lr,
grad_norm, tokens_per_s and MFU (model FLOPs, attention counted over allowed query-key pairs only,
against --peak-tflops per device).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lwm_data.errors import ConfigError, NotAStageOutput
from lwm_data.train import checkpoint, parallel
from lwm_data.train.config import PhaseConfig, TrainConfig
from lwm_data.train.data import PackedDataset, PackedLoader, list_packed_shards
from lwm_data.train.inputs import ModelInputs, model_inputs
from lwm_data.train.model import ModelConfig, Transformer, training_flops
from lwm_data.train.parallel import Parallel


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def learning_rate(step: int, phase_steps: int, peak: float, config: TrainConfig) -> float:
    """The lr of optimizer step `step` (0-based) of a phase: linear warmup, then constant or cosine."""
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    decay_steps = max(1, phase_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = peak * config.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices and embeddings decay, norm weights don't."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8)


def loss_coefficients(batches: list[ModelInputs], par: Parallel) -> tuple[float, float]:
    """Multipliers of the text and vision weighted loss sums that make LWM's loss over the global batch:
    0.5 / (global text weight) and 0.5 / (global vision weight), or 1 / total where only one kind has
    targets. Needs only the inputs, so it is known before any forward pass."""
    local = torch.zeros(2, dtype=torch.float64)
    for inputs in batches:
        vision = inputs.target_vision.cpu()
        weights = inputs.weights.cpu().double()
        local += torch.stack([(weights * ~vision).sum(), (weights * vision).sum()])
    text, vision = par.all_reduce(local.to(par.device)).tolist()
    if text > 0 and vision > 0:
        return 0.5 / text, 0.5 / vision
    return (1.0 / text if text > 0 else 0.0), (1.0 / vision if vision > 0 else 0.0)


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class MetricsLog:
    """The JSONL metrics file and progress bar, on rank 0 only."""

    def __init__(self, config: TrainConfig, total_steps: int, first_step: int, enabled: bool):
        self.file = None
        if enabled and config.metrics:
            os.makedirs(os.path.dirname(os.path.abspath(config.metrics)), exist_ok=True)
            self.file = open(config.metrics, "a")
        self.progress = None
        if enabled and config.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, status="")

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.progress:
            mfu = f" mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
            status = f"loss {record['loss']:.4f} {record['tokens_per_s']:,.0f} tok/s{mfu}"
            self.progress.update(self.task, advance=1, status=status)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.progress:
            self.progress.stop()


def check_phase_data(phases: tuple[PhaseConfig, ...]) -> None:
    """Fail before training starts if any phase's data is missing."""
    for i, phase in enumerate(phases, start=1):
        try:
            list_packed_shards(phase.data)
        except NotAStageOutput as error:
            raise ConfigError(f"phase {i} (seq_len {phase.seq_len}): its data is missing: {error}") from None


def build_model(model_config: ModelConfig, config: TrainConfig, par: Parallel, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(config.seed)
    model = Transformer(model_config)
    model.init_weights(config.seed)
    model.to(par.device)
    return parallel.parallelize(model, par, dtype, config.activation_checkpointing)


def train(config: TrainConfig) -> list[dict[str, Any]]:
    """Run every phase; returns this rank's metric records (rank 0 also writes them to config.metrics)."""
    phases = config.resolved_phases()
    check_phase_data(phases)
    par = parallel.setup(config.ring_size)
    try:
        return _train(config, phases, par)
    finally:
        parallel.teardown(par)


def _train(config: TrainConfig, phases: tuple[PhaseConfig, ...], par: Parallel) -> list[dict[str, Any]]:
    dtype = resolve_dtype(config.dtype, par.device)
    model_config = config.model_config()
    model = build_model(model_config, config, par, dtype)
    resume_from = checkpoint.latest(config.checkpoint_dir) if config.resume else None
    if config.resume and resume_from is None:
        raise ConfigError(f"--resume: no complete checkpoint in {config.checkpoint_dir}")
    start = checkpoint.read_progress(resume_from) if resume_from else {"phase": 0, "step": 0}
    offsets = [sum(p.steps for p in phases[:i]) for i in range(len(phases))]
    log = MetricsLog(config, sum(p.steps for p in phases), offsets[start["phase"]] + start["step"], par.is_main)
    records: list[dict[str, Any]] = []
    try:
        for index in range(start["phase"], len(phases)):
            records += run_phase(
                model,
                model_config,
                config,
                phases,
                index,
                par,
                dtype,
                log,
                resume_from if index == start["phase"] else None,
                offsets[index],
            )
        if config.export:
            checkpoint.export_safetensors(config.export, model, model_config, phases[-1].rope_theta, phases[-1].seq_len)
    finally:
        log.close()
    return records


def micro_batches(batches: Iterator[dict[str, Tensor]], count: int) -> list[ModelInputs]:
    return [model_inputs(next(batches)) for _ in range(count)]


def run_phase(
    model: nn.Module,
    model_config: ModelConfig,
    config: TrainConfig,
    phases: tuple[PhaseConfig, ...],
    index: int,
    par: Parallel,
    dtype: torch.dtype,
    log: MetricsLog,
    resume_from: str | None,
    step_offset: int,
) -> list[dict[str, Any]]:
    phase = phases[index]
    model.rope_theta = phase.rope_theta
    dataset = PackedDataset(
        phase.data,
        seq_len=phase.seq_len,
        seed=config.seed + index,
        batch_size=config.batch_size,
        rank=par.dp_rank,
        world_size=par.dp_size,
    )
    loader = PackedLoader(dataset, config.num_workers)
    optimizer = make_optimizer(model, config)
    first = 0
    if resume_from is not None:
        restored = checkpoint.load(resume_from, model, optimizer, loader.state_dict())
        loader.load_state_dict(restored["data"])
        first = restored["progress"]["step"]
    # bf16 without FSDP (world 1): autocast; with FSDP its mixed-precision policy casts the parameters.
    autocast = torch.autocast(par.device.type, dtype) if dtype != torch.float32 and par.mesh is None else nullcontext()
    peak_lr = config.phase_lr(phase)
    fsdp = hasattr(model, "set_requires_gradient_sync")
    batches = iter(loader)
    records = []
    for step in range(first, phase.steps):
        started = time.perf_counter()
        lr = learning_rate(step, phase.steps, peak_lr, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = micro_batches(batches, config.grad_accum)
        shards = [par.shard(inputs) for inputs in rows]
        text_scale, vision_scale = loss_coefficients(shards, par)
        loss_sum = torch.zeros((), device=par.device, dtype=torch.float64)
        for i, inputs in enumerate(shards):
            if fsdp:
                model.set_requires_gradient_sync(i == len(shards) - 1)
            with autocast:
                text_sum, vision_sum = model(inputs)
            loss = text_sum * text_scale + vision_sum * vision_scale
            (loss * par.world_size).backward()  # FSDP averages gradients over the world; we want the sum
            loss_sum += loss.detach().double()
        grad_norm = clip_gradients(model, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        flops = sum(training_flops(model_config, inputs) for inputs in rows) / par.ring_size
        tokens = sum(inputs.tokens.numel() for inputs in rows) / par.ring_size
        totals = par.all_reduce(torch.tensor([float(loss_sum), flops, tokens], dtype=torch.float64, device=par.device))
        if par.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        loss_value, step_flops, step_tokens = totals.tolist()
        mfu = step_flops / elapsed / (config.peak_tflops * 1e12 * par.world_size) if config.peak_tflops else None
        record = {
            "step": step_offset + step + 1,
            "phase": index + 1,
            "phase_step": step + 1,
            "seq_len": phase.seq_len,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(step_tokens),
            "tokens_per_s": step_tokens / elapsed,
            "flops": step_flops,
            "mfu": mfu,
            "seconds": elapsed,
        }
        records.append(record)
        log.write(record)
        done = step + 1 == phase.steps
        if config.checkpoint_dir and (done or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
            path = checkpoint.step_path(config.checkpoint_dir, step_offset + step + 1)
            checkpoint.save(path, model, optimizer, {"phase": index, "step": step + 1}, loader.state_dict())
    return records
