#!/usr/bin/env bash
# The pending GPU checks, second device call (after bench/gpu_check.sh): the kernels
# against cuBLAS in the same run, the GPU-bound overlap bench and the grouped experts.
# Each step under its own time limit; outputs under $OUT (4 files come back).
#
# Needs nothing prepared (kernels_gpu.py renders its own module with jinja2):
#   command: bash bench/gpu_check2.sh    timeout_s: 560
#
# Step limits add up to 535 s, inside one 560 s call:
#   1. environment                                                          5 s
#   2. kernels: correctness, quantisers against copy bandwidth, GEMMs and grouped
#      GEMMs against cuBLAS block-scaled columns (autotuned)                 330 s
#   3. dual micro-batch overlap, GPU-bound (4 sequences, 1x and 16x volume)  120 s
#   4. bf16 routed experts: grouped GEMMs against the per-expert loop         80 s
set -u
OUT=${OUT:-/tmp/dsvc_gpu_check2}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
timeout 5 nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv \
    2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tee -a "$OUT/gpu.txt"
date -u +"date %Y-%m-%d %H:%M UTC" | tee -a "$OUT/gpu.txt"
timeout 330 "$PY" bench/kernels_gpu.py 2>&1 | tee "$OUT/kernels_gpu.txt"
timeout 120 "$PY" bench/overlap_gpu.py --batch 4 --repeat 1,16 2>&1 | tee "$OUT/overlap_gpu.txt"
timeout 80 "$PY" bench/moe_gpu.py 2>&1 | tee "$OUT/moe_gpu.txt"
