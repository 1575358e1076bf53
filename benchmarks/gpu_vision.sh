#!/usr/bin/env bash
# The vision stage's GPU figures in one run (H100/H200): LWM's exact frame path against LWM's own loop,
# the fast path against bare decord, the share of fast-path codes equal to exact ones, the share of
# bf16 codes equal to fp32 (TF32 off) ones on real media (full aMUSEd shape), then the full aMUSEd
# VQ-GAN in bf16 at 256 px, batch 64: eager and torch.compile'd encode, and the whole vision-codes job.
# Goal: >= 2,000 frames/s encode (stretch 2,500); an H200's bf16 bound is about 3,600 (216 GFLOP a frame).
#   bash benchmarks/gpu_vision.sh            (after `make setup`; about 6 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name())"
exec "$PY" benchmarks/bench_vision.py --configs amused --device cuda --videos 16 --frames 256 --batch-size 64 --repeats 3
