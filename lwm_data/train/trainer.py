"""The training loop: progressive-context phases over packed shards, read top to bottom.

`Trainer` builds the model (random, or `init_from` a checkpoint, loaded shard by shard), made ready
for the parallel layout, then runs each phase: set its RoPE theta (or keep the model's), open its data
at its seq_len, make a fresh AdamW and run `steps` optimizer steps (`train_step`: `grad_accum`
micro-batches, forward and backward, gradient clipping), warmup then constant or cosine.

The loss is LWM's: 0.5 x (text-head loss over text targets) + 0.5 x (vision-head loss over vision
targets), each a weighted mean over the whole global batch (every rank, every micro-batch); a batch
with targets of one kind only uses that kind's loss alone. Because the denominators are global, the
loss and its gradient do not depend on how the batch is split over ranks, rings and micro-batches.

Metrics stay on the device until every `log_every` steps (and before a checkpoint or an evaluation),
when one all-reduce and one host sync bring them over; then each step's record is written (rank 0:
progress bar and the JSONL metrics file): step, loss, lr, grad_norm, and over the window,
tokens_per_s and MFU (model FLOPs, attention counted over allowed query-key pairs only, against
--peak-tflops per device). A non-finite loss or gradient norm stops training with the step and its
rows named; at a sync step that is before the update (so with log_every 1, always), otherwise at the
next sync, and no checkpoint is written after it. With `eval_data`, the held-out loss
(lwm_data.train.evaluate) is measured before the first step (step 0), every `eval_every` steps and at
each phase's end, and written as its own record.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lwm_data.errors import ConfigError, NotAStageOutput, UserError
from lwm_data.train import checkpoint, parallel, pretrained
from lwm_data.train.config import PhaseConfig, TrainConfig
from lwm_data.train.data import PackedDataset, PackedLoader, list_packed_shards
from lwm_data.train.evaluate import Evaluator
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


def loss_coefficients(batches: list[ModelInputs], par: Parallel) -> Tensor:
    """Multipliers (text, vision) of the weighted loss sums that make LWM's loss over the global batch:
    0.5 / (global text weight) and 0.5 / (global vision weight), or 1 / total where only one kind has
    targets. Needs only the inputs, so it is known before any forward pass; stays on the device."""
    local = torch.zeros(2, dtype=torch.float64)
    for inputs in batches:
        vision = inputs.target_vision.cpu()
        weights = inputs.weights.cpu().double()
        local += torch.stack([(weights * ~vision).sum(), (weights * vision).sum()])
    totals = par.all_reduce(local.to(par.device))
    both = (totals > 0).all()
    inverse = torch.where(totals > 0, 1.0 / totals.clamp(min=1e-300), torch.zeros_like(totals))
    return torch.where(both, 0.5 * inverse, inverse)


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """The global gradient norm (before clipping), on the device."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class TrainingDiverged(UserError):
    """A step's loss or gradient norm is not finite."""


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
        if "eval_loss" in record:
            self.say(f"step {record['step']}: eval loss {record['eval_loss']:.4f}")
        elif self.progress:
            mfu = f" mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
            status = f"loss {record['loss']:.4f} {record['tokens_per_s']:,.0f} tok/s{mfu}"
            self.progress.update(self.task, advance=1, status=status)

    def say(self, text: str) -> None:
        """A line above the progress bar (none with --no-progress)."""
        if self.progress:
            self.progress.console.print(text)

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
    """The model on its device, parallelized. From `init_from`: built on the meta device, sharded, given
    empty storage, then filled by each rank reading its own slices (no rank holds the whole model)."""
    if not config.init_from:
        torch.manual_seed(config.seed)
        model = Transformer(model_config)
        model.init_weights(config.seed)
        model.to(par.device)
        return parallel.parallelize(model, par, dtype, config.activation_checkpointing)
    with torch.device("meta"):
        model = Transformer(model_config)
    model = parallel.parallelize(model, par, dtype, config.activation_checkpointing)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # parameters keep their identity: ties hold
    try:
        model.to_empty(device=par.device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    pretrained.load(model, config.init_from, config.seed)
    return model


@dataclass
class StepResult:
    """One optimizer step whose numbers are still on the device."""

    step: int  # global, 1-based
    phase: int  # 1-based
    phase_step: int
    seq_len: int
    lr: float
    totals: Tensor | None  # this rank's [loss share, model FLOPs, tokens] (float64), once the step ran
    grad_norm: Tensor | None  # the global norm
    example_ids: list[str]  # this rank's rows


class Trainer:
    def __init__(self, config: TrainConfig, par: Parallel):
        self.config, self.par = config, par
        self.dtype = resolve_dtype(config.dtype, par.device)
        self.model_config = config.model_config()
        self.model = build_model(self.model_config, config, par, self.dtype)
        self.vocabulary = (self.model_config.vocab_size, self.model_config.vision_vocab_size)
        # bf16 without FSDP (world 1): autocast; with FSDP its mixed-precision policy casts the parameters.
        bf16_alone = self.dtype != torch.float32 and par.mesh is None
        self.autocast = torch.autocast(par.device.type, self.dtype) if bf16_alone else nullcontext()
        self.evaluator = (
            Evaluator(config.eval_data, config.eval_batches, config.batch_size, par, self.vocabulary)
            if config.eval_data
            else None
        )
        self.records: list[dict[str, Any]] = []

    # ---- the run ----

    def fit(self, phases: tuple[PhaseConfig, ...]) -> list[dict[str, Any]]:
        """Every phase, resumed from the newest checkpoint if asked; returns this rank's records."""
        config = self.config
        resume_from = checkpoint.latest(config.checkpoint_dir) if config.resume else None
        if config.resume and resume_from is None:
            raise ConfigError(f"--resume: no complete checkpoint in {config.checkpoint_dir}")
        start = checkpoint.read_progress(resume_from) if resume_from else {"phase": 0, "step": 0}
        offsets = [sum(p.steps for p in phases[:i]) for i in range(len(phases))]
        first_step = offsets[start["phase"]] + start["step"]
        self.log = MetricsLog(config, sum(p.steps for p in phases), first_step, self.par.is_main)
        try:
            if resume_from is None:
                self.evaluate(0, phases[0])
            for index in range(start["phase"], len(phases)):
                resumed = resume_from if index == start["phase"] else None
                self.run_phase(phases, index, resumed, offsets[index])
            if config.export:
                self.export(phases[-1])
        finally:
            self.log.close()
        return self.records

    def export(self, last: PhaseConfig) -> None:
        """The final weights in Hugging Face's layout, with the starting checkpoint's tokenizer."""
        config, positions = self.config, last.seq_len
        if config.init_from:  # never fewer positions than the model came with
            positions = max(positions, pretrained.read_config(config.init_from).get("max_position_embeddings", 0))
        checkpoint.export_safetensors(
            config.export, self.model, self.model_config, self.model.rope_theta, positions, config.init_from
        )
        vision = ", LWM's vision weights in vision.safetensors" if self.model_config.vision_vocab_size else ""
        self.log.say(f"exported {config.export}: Hugging Face's LLaMA layout{vision}")

    def run_phase(self, phases: tuple[PhaseConfig, ...], index: int, resume_from: str | None, offset: int) -> None:
        config, phase = self.config, phases[index]
        self.model.rope_theta = phase.rope_theta if phase.rope_theta is not None else self.model_config.rope_theta
        dataset = PackedDataset(
            phase.data,
            seq_len=phase.seq_len,
            seed=config.seed + index,
            batch_size=config.batch_size,
            rank=self.par.dp_rank,
            world_size=self.par.dp_size,
            vocabulary=self.vocabulary,
        )
        loader = PackedLoader(dataset, config.num_workers)
        optimizer = make_optimizer(self.model, config)
        first = 0
        if resume_from is not None:
            restored = checkpoint.load(resume_from, self.model, optimizer, loader.state_dict())
            loader.load_state_dict(restored["data"])
            first = restored["progress"]["step"]
        peak_lr = config.phase_lr(phase)
        batches = iter(loader)
        pending: list[StepResult] = []
        window = time.perf_counter()
        for step in range(first, phase.steps):
            lr = learning_rate(step, phase.steps, peak_lr, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            result = StepResult(offset + step + 1, index + 1, step + 1, phase.seq_len, lr, None, None, [])
            pending.append(self.train_step(batches, result))
            done = step + 1 == phase.steps
            save = bool(config.checkpoint_dir) and (done or self._every(config.checkpoint_every, step + 1))
            evaluate = self.evaluator is not None and (done or self._every(config.eval_every, offset + step + 1))
            if save or evaluate or done or len(pending) == config.log_every:
                self.flush(pending, time.perf_counter() - window)  # raises on a non-finite step
                pending = []
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if save:
                path = checkpoint.step_path(config.checkpoint_dir, offset + step + 1)
                checkpoint.save(path, self.model, optimizer, {"phase": index, "step": step + 1}, loader.state_dict())
                self.log.say(f"checkpoint {path}")
            if evaluate:
                self.evaluate(offset + step + 1, phase)
            if not pending:
                window = time.perf_counter()

    # ---- one step ----

    @staticmethod
    def _every(period: int, count: int) -> bool:
        return bool(period) and count % period == 0

    def train_step(self, batches: Iterator[dict[str, Any]], result: StepResult) -> StepResult:
        """Forward and backward over `grad_accum` micro-batches, then gradient clipping; the optimizer
        steps later, once the step is known to be finite where it is checked."""
        model, par, config = self.model, self.par, self.config
        rows = [next(batches) for _ in range(config.grad_accum)]
        inputs = [model_inputs(batch) for batch in rows]
        shards = [par.shard(micro) for micro in inputs]
        scales = loss_coefficients(shards, par)
        fsdp = hasattr(model, "set_requires_gradient_sync")
        loss_sum = torch.zeros((), device=par.device, dtype=torch.float64)
        for i, shard in enumerate(shards):
            if fsdp:
                model.set_requires_gradient_sync(i == len(shards) - 1)
            with self.autocast:
                text_sum, vision_sum = model(shard)
            loss = text_sum * scales[0] + vision_sum * scales[1]
            (loss * par.world_size).backward()  # FSDP averages gradients over the world; we want the sum
            loss_sum += loss.detach().double()
        result.grad_norm = clip_gradients(model, config.grad_clip)
        flops = sum(training_flops(self.model_config, micro) for micro in inputs) / par.ring_size
        tokens = sum(micro.tokens.numel() for micro in inputs) / par.ring_size
        counts = torch.tensor([flops, tokens], dtype=torch.float64, device=par.device)
        result.totals = torch.cat([loss_sum[None], counts])
        result.example_ids = [ids for batch in rows for ids in batch["example_ids"]]
        return result

    # ---- metrics, checks, evaluation ----

    def flush(self, pending: list[StepResult], seconds: float) -> None:
        """The pending steps' metrics, gathered in one all-reduce and one host sync; their records
        written; a non-finite step stops training here."""
        totals = self.par.all_reduce(torch.stack([r.totals for r in pending]))
        norms = torch.stack([r.grad_norm.to(torch.float64) for r in pending])
        values, grad_norms = totals.tolist(), norms.tolist()
        for result, (loss, _, _), norm in zip(pending, values, grad_norms):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise TrainingDiverged(self._divergence(result, loss, norm, pending[-1].step - result.step))
        window_flops, window_tokens = sum(v[1] for v in values), sum(v[2] for v in values)
        peak = self.config.peak_tflops
        for result, (loss, flops, tokens), norm in zip(pending, values, grad_norms):
            record = {
                "step": result.step,
                "phase": result.phase,
                "phase_step": result.phase_step,
                "seq_len": result.seq_len,
                "loss": loss,
                "lr": result.lr,
                "grad_norm": norm,
                "tokens": int(tokens),
                "tokens_per_s": window_tokens / seconds,
                "flops": flops,
                "mfu": window_flops / seconds / (peak * 1e12 * self.par.world_size) if peak else None,
                "seconds": seconds / len(pending),
            }
            self.records.append(record)
            self.log.write(record)

    @staticmethod
    def _divergence(result: StepResult, loss: float, norm: float, steps_since: int) -> str:
        rows = "; ".join(ids.replace("\n", ", ") for ids in result.example_ids)[:2000]
        when = (
            "before this step's update"
            if steps_since == 0
            else f"{steps_since} steps later (steps are checked every log_every), and no checkpoint holds them"
        )
        return (
            f"step {result.step} (phase {result.phase}): loss {loss}, gradient norm {norm}: training stopped {when}. "
            f"Rows of this rank: {rows}. Lower the learning rate, or check them."
        )

    def evaluate(self, step: int, phase: PhaseConfig) -> None:
        if self.evaluator is None:
            return
        record = {"step": step, **self.evaluator(self.model, phase.seq_len, self.autocast)}
        self.records.append(record)
        self.log.write(record)


def train(config: TrainConfig) -> list[dict[str, Any]]:
    """Run every phase; returns this rank's metric records (rank 0 also writes them to config.metrics)."""
    phases = config.resolved_phases()
    check_phase_data(phases)
    if config.eval_data:
        check_phase_data((replace(phases[0], data=config.eval_data),))
    par = parallel.setup(config.ring_size)
    try:
        return Trainer(config, par).fit(phases)
    finally:
        parallel.teardown(par)
