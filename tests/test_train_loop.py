"""The trainer end to end on CPU: world 1 in-process, and torchrun over gloo with 1 x 2 and 2 x 2
(data x ring) processes through the real command line. One launch per world runs every check."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lwm_data.errors import ConfigError
from lwm_data.train import checkpoint
from lwm_data.train.__main__ import app
from lwm_data.train.config import PhaseConfig, load_config
from lwm_data.train.inputs import model_inputs
from lwm_data.train.parallel import Parallel, setup
from lwm_data.train.trainer import learning_rate, loss_coefficients, train
from tests.helpers import write_packed_rows

REPO = Path(__file__).resolve().parents[1]
TINY_CPU = str(REPO / "configs" / "tiny_cpu.toml")
SEQ_LEN, STEPS, GLOBAL_BATCH = 128, 8, 4


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> str:
    """Text and vision rows of 128 tokens: enough for STEPS steps of GLOBAL_BATCH rows, no epoch wrap."""
    return write_packed_rows(tmp_path_factory.mktemp("packed"), rows=40, seq_len=SEQ_LEN, vision=True, shards=3)


def job_flags(data: str, out: Path, **overrides) -> dict:
    flags = {
        "data": data,
        "steps": STEPS,
        "checkpoint_dir": str(out / "ckpt"),
        "metrics": str(out / "metrics.jsonl"),
        "checkpoint_every": 4,
        "progress": False,
        "lr": 3e-3,
        "warmup_steps": 2,
    }
    return {**flags, **overrides}


def job(data: str, out: Path, **overrides):
    config = load_config(TINY_CPU, job_flags(data, out, **overrides))
    return replace(config, phases=tuple(replace(s, seq_len=SEQ_LEN) for s in config.phases))


def read_metrics(path: Path) -> list[dict]:
    """The training steps' records (held-out evaluations are records of their own)."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, data: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """`torchrun -m lwm_data.train --config configs/tiny_cpu.toml` with 128-token rows."""
    config = out / "job.toml"
    config.write_text(Path(TINY_CPU).read_text().replace("seq_len = 1024", f"seq_len = {SEQ_LEN}"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        "-m",
        "lwm_data.train",
        "--config",
        str(config),
        "--data",
        data,
        "--steps",
        str(STEPS),
        "--checkpoint-dir",
        str(out / "ckpt"),
        "--metrics",
        str(out / "metrics.jsonl"),
        "--checkpoint-every",
        "4",
        "--no-progress",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        *flags,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def world_one_run(packed, tmp_path_factory) -> tuple[list[dict], Path]:
    """World 1: one process, ring of 1, the whole global batch per step, two DataLoader workers."""
    out = tmp_path_factory.mktemp("world1")
    return train(job(packed, out, ring_size=1, batch_size=GLOBAL_BATCH, export=str(out / "hf"))), out


@pytest.fixture(scope="module")
def world_one(world_one_run) -> list[dict]:
    return world_one_run[0]


# ---------------------------------------------------------------------------------------------------
# World 1, in-process


def test_loss_decreases_and_metrics_are_written(world_one, packed, tmp_path):
    losses = [r["loss"] for r in world_one]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.5
    record = world_one[-1]
    assert record["step"] == STEPS and record["tokens"] == GLOBAL_BATCH * SEQ_LEN and record["tokens_per_s"] > 0
    assert record["mfu"] is None  # no --peak-tflops


def test_resume_continues_bit_exactly(world_one_run, packed, tmp_path):
    """Stopped after step 4 (its checkpoint kept, the later one removed), resumed in a fresh model."""
    uninterrupted, first_run = world_one_run
    shutil.copytree(first_run / "ckpt", tmp_path / "ckpt")
    shutil.rmtree(checkpoint.step_path(str(tmp_path / "ckpt"), STEPS))
    resumed = train(job(packed, tmp_path, ring_size=1, batch_size=GLOBAL_BATCH, resume=True))
    assert [r["step"] for r in resumed] == list(range(5, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted[4:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in uninterrupted[4:]]


def test_progressive_phases_run_in_order_from_the_previous_weights(packed, tmp_path):
    config = job(packed, tmp_path, ring_size=1, batch_size=2, steps=None, checkpoint_dir="", metrics="")
    phases = (
        PhaseConfig(seq_len=128, steps=3, rope_theta=1e6, data=packed),
        PhaseConfig(seq_len=256, steps=2, rope_theta=1e7, lr=1e-3, data=packed),
    )
    records = train(replace(config, phases=phases, data=""))
    assert [(r["phase"], r["phase_step"], r["seq_len"]) for r in records] == [
        (1, 1, 128),
        (1, 2, 128),
        (1, 3, 128),
        (2, 1, 256),
        (2, 2, 256),
    ]
    assert records[3]["loss"] < records[0]["loss"]  # phase 2 starts from phase 1's weights


def test_export_loads_in_transformers_with_the_same_logits(world_one_run):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from lwm_data.train.model import Transformer, preset

    hf_dir = world_one_run[1] / "hf"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    ours = Transformer(preset("tiny", attention_backend="torch"))
    state = {name: tensor for name, tensor in load_file(hf_dir / "vision.safetensors").items()}
    text = load_file(hf_dir / "model.safetensors")
    state.update({name: text[checkpoint.hf_name(name)] for name in ours.state_dict() if name not in state})
    ours.load_state_dict(state)
    ours.rope_theta = json.loads((hf_dir / "config.json").read_text())["rope_theta"]
    tokens = torch.randint(3, 200, (1, 48))
    inputs = model_inputs(
        {
            "tokens": tokens,
            "vision_mask": torch.zeros_like(tokens, dtype=torch.bool),
            "loss_weights": torch.ones(1, 48),
            "segment_ids": torch.ones_like(tokens),
            "positions": torch.arange(48)[None],
        }
    )
    with torch.no_grad():
        expected = ours.head(ours.hidden(inputs))
        logits = hf(tokens).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_gradient_accumulation_matches_one_big_batch(packed, tmp_path):
    """2 micro-batches of 2 rows are the same optimizer step as 1 batch of 4 (global loss denominators)."""
    records = train(
        job(
            packed,
            tmp_path,
            ring_size=1,
            batch_size=GLOBAL_BATCH // 2,
            grad_accum=2,
            steps=3,
            checkpoint_dir="",
            metrics="",
        )
    )
    expected = train(
        job(packed, tmp_path, ring_size=1, batch_size=GLOBAL_BATCH, steps=3, checkpoint_dir="", metrics="")
    )
    assert [r["tokens"] for r in records] == [GLOBAL_BATCH * SEQ_LEN] * 3
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in expected], rel=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    from lwm_data.train.model import Transformer, preset
    from lwm_data.train.parallel import parallelize

    config = preset("tiny", attention_backend="torch")
    tokens = torch.randint(3, 200, (2, 32))
    inputs = model_inputs(
        {
            "tokens": tokens,
            "vision_mask": tokens < 50,
            "loss_weights": torch.ones(2, 32),
            "segment_ids": torch.ones_like(tokens),
            "positions": torch.arange(32).expand(2, -1),
        }
    )
    grads = []
    for checkpointing in (False, True):
        model = Transformer(config)
        model.init_weights(0)
        model = parallelize(model, Parallel(torch.device("cpu"), None), torch.float32, checkpointing)
        sum(model(inputs)).backward()
        grads.append({name.replace("_checkpoint_wrapped_module.", ""): p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7)


def test_learning_rate_warms_up_then_follows_the_schedule(packed, tmp_path):
    config = job(packed, tmp_path, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, 100, 1.0, config) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, config) == pytest.approx(1.0)
    assert learning_rate(99, 100, 1.0, config) == pytest.approx(0.1, abs=1e-3)
    assert learning_rate(50, 100, 1.0, replace(config, schedule="constant")) == 1.0


def test_loss_is_half_text_half_vision_or_text_alone():
    par = Parallel(torch.device("cpu"), None)
    tokens = torch.ones(1, 6, dtype=torch.int32)
    batch = {
        "tokens": tokens,
        "loss_weights": torch.ones(1, 6),
        "segment_ids": torch.ones_like(tokens),
        "positions": torch.arange(6)[None],
        "vision_mask": torch.tensor([[0, 0, 1, 1, 0, 0]], dtype=torch.bool),
    }
    inputs = model_inputs(batch)  # targets 1..5: vision at 1 and 2, text at 0, 3, 4 (5 predicts nothing)
    assert loss_coefficients([inputs], par).tolist() == [0.5 / 3, 0.5 / 2]
    text_only = model_inputs({**batch, "vision_mask": torch.zeros(1, 6, dtype=torch.bool)})
    assert loss_coefficients([text_only, text_only], par).tolist() == [1 / 10, 0.0]


# ---------------------------------------------------------------------------------------------------
# Clear errors


def test_clear_errors(packed, tmp_path, monkeypatch):
    config = load_config(TINY_CPU, {"data": packed})
    with pytest.raises(ConfigError, match="not divisible by 2 x ring_size = 4"):
        replace(config, phases=(PhaseConfig(seq_len=1026, steps=1),)).validate()
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3 cannot be split into rings of 2"):
        setup(2)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="phase 1 .* its data is missing"):
        train(job(str(tmp_path / "absent"), tmp_path))
    with pytest.raises(ConfigError, match="names no data"):
        load_config(TINY_CPU, {})
    with pytest.raises(ConfigError, match="longer than the phase's seq_len 64"):
        config = job(packed, tmp_path, ring_size=1)
        train(replace(config, phases=(replace(config.phases[0], seq_len=64),)))


def test_old_stages_tables_still_load_with_a_warning(tmp_path, caplog):
    """`[[stages]]` was the name of `[[phases]]` (before "stage" meant only a data command)."""
    old = tmp_path / "old.toml"
    old.write_text(Path(TINY_CPU).read_text().replace("[[phases]]", "[[stages]]"))
    with caplog.at_level("WARNING", logger="lwm_data.train.config"):
        assert load_config(str(old), {"data": "d"}).phases == load_config(TINY_CPU, {"data": "d"}).phases
    assert "[[stages]] is deprecated" in caplog.text
    both = tmp_path / "both.toml"
    both.write_text(Path(TINY_CPU).read_text() + "\n[[stages]]\nseq_len = 64\nsteps = 1\n")
    with pytest.raises(ConfigError, match="both \\[\\[phases\\]\\] and \\[\\[stages\\]\\]"):
        load_config(str(both), {"data": "d"})


def test_command_line_prints_errors_and_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["--config", TINY_CPU, "--data", str(tmp_path / "absent")])
    assert result.exit_code == 2 and "data is missing" in result.output
    result = CliRunner().invoke(app, ["--data", str(tmp_path)])  # no config: no phases
    assert result.exit_code == 2 and "lists no [[phases]]" in result.output  # brackets printed, not markup


# ---------------------------------------------------------------------------------------------------
# torchrun over gloo: 1 data x 2 ring, and 2 x 2


@pytest.fixture(scope="module")
def gloo_runs(packed, tmp_path_factory) -> dict[str, Path]:
    """2 x 2 also evaluates (steps 0, 4, 8) between its steps and checkpoints: FSDP2 must reshard after
    the forwards without backward, and evaluating must not change what is trained."""
    runs = {}
    for name, nproc, batch in (("1x2", 2, GLOBAL_BATCH), ("2x2", 4, GLOBAL_BATCH // 2)):
        out = tmp_path_factory.mktemp(name)
        evals = ("--eval-data", packed, "--eval-every", "4", "--eval-batches", "2") if name == "2x2" else ()
        torchrun(nproc, packed, out, "--batch-size", str(batch), *evals)
        runs[name] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["1x2", "2x2"])
def test_ring_runs_match_world_one(gloo_runs, world_one, name):
    """Same global batches, same loss: exactly the same at step 1, within fp tolerance after updates."""
    records = read_metrics(gloo_runs[name] / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses, expected = [r["loss"] for r in records], [r["loss"] for r in world_one]
    assert losses[0] == pytest.approx(expected[0], rel=1e-6)
    assert losses == pytest.approx(expected, rel=1e-4)
    assert losses[-1] < losses[0] - 0.5
    assert records[0]["tokens"] == GLOBAL_BATCH * SEQ_LEN
    if name == "2x2":
        evals = [json.loads(line) for line in (gloo_runs[name] / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in evals if "eval_loss" in r] == [0, 4, 8]


@pytest.mark.slow
def test_sharded_resume_over_gloo_is_bit_exact(gloo_runs, packed):
    """2 x 2 (parameters and optimizer sharded by FSDP2): resumed from step 4, the same losses."""
    out = gloo_runs["2x2"]
    uninterrupted = read_metrics(out / "metrics.jsonl")
    shutil.rmtree(checkpoint.step_path(str(out / "ckpt"), STEPS))
    (out / "metrics.jsonl").rename(out / "first.jsonl")
    torchrun(4, packed, out, "--batch-size", str(GLOBAL_BATCH // 2), "--resume")
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(5, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted[4:]]
