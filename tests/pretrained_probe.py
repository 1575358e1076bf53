"""Run under torchrun by tests/test_train_pretrained.py: build the model from `init_from` as the
trainer does (meta device, FSDP2 shards, each rank reading its slices), then print, per rank, one
JSON line: the bytes of its parameter shards, its peak anonymous memory growth while building
(sampled every millisecond from /proc: the safetensors files are memory-mapped, and their pages,
shared page cache, are not counted), and the per-token losses of fixed rows (every rank computes
them; they must agree with transformers'), into OUT_DIR/rank-N.json.

    torchrun --nproc-per-node N -m tests.pretrained_probe INIT_FROM ROWS_JSON OUT_DIR
"""

from __future__ import annotations

import json
import sys
import threading

import torch

from lwm_data.train import parallel
from lwm_data.train.config import TrainConfig
from lwm_data.train.inputs import model_inputs
from lwm_data.train.trainer import build_model


def anonymous_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakSampler(threading.Thread):
    """The largest anonymous resident memory seen while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = anonymous_bytes(), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, anonymous_bytes())


def main(init_from: str, rows_json: str, out_dir: str) -> None:
    par = parallel.setup(ring_size=1)
    config = TrainConfig(init_from=init_from, vision=False, attention_backend="torch")
    before, sampler = anonymous_bytes(), PeakSampler()
    sampler.start()
    model = build_model(config.model_config(), config, par, torch.float32)
    sampler.stop.set()
    sampler.join()
    grown = max(sampler.peak, anonymous_bytes()) - before
    shard_bytes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters()
    )
    batch = {name: torch.tensor(value) for name, value in json.loads(rows_json).items()}
    with torch.no_grad():
        losses = model(par.shard(model_inputs(batch)), per_token=True)
    record = {"rank": par.dp_rank, "shard_bytes": shard_bytes, "peak_growth": grown, "losses": losses.tolist()}
    with open(f"{out_dir}/rank-{par.dp_rank}.json", "w") as f:  # a file each: ranks' stdout lines interleave
        json.dump(record, f)
    parallel.teardown(par)


if __name__ == "__main__":
    main(*sys.argv[1:4])
