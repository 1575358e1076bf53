#!/usr/bin/env bash
# The vision stage's GPU figures in one run (H100/H200): the full aMUSEd VQ-GAN in bf16 at 256 px,
# batch 64, eager and torch.compile'd encode, decode vs bare decord, and the whole vision-codes job.
# Goal: >= 2,000 frames/s encode (stretch 2,500); an H200's bf16 bound is about 3,600 (216 GFLOP a frame).
#   bash benchmarks/gpu_vision.sh            (after `make setup`; about 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name())"
exec "$PY" benchmarks/bench_vision.py --configs amused --device cuda --videos 16 --frames 256 --batch-size 64 --repeats 3
