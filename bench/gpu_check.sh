#!/usr/bin/env bash
# The pending GPU checks (bench/RESULTS.md) as one device call, in order of priority,
# each under its own time limit, every output kept under $OUT.
#
# Prepare on the CPU machine (the GPU image has no lark or pydantic, so it cannot
# compile a spec; the kernel bench renders its own module with jinja2 alone):
#   dsvc compile tests/train_specs/bench_1b.dsv -o .gpu_build/bench_1b
# then call the device tool with
#   command: bash bench/gpu_check.sh    carry: [".gpu_build"]    timeout_s: 560
# and paste the tables into bench/RESULTS.md with the card and the date.
set -u
OUT=${OUT:-/tmp/dsvc_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv \
    2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    2>&1 | tee -a "$OUT/gpu.txt"
# 1. kernels (issue 6): correctness, then GEMMs, quantisers, grouped GEMMs; autotuned
timeout 310 "$PY" bench/kernels_gpu.py 2>&1 | tee "$OUT/kernels_gpu.txt"
# 2. the compiled ~1.1B trainer, FP8 with the generated kernels against BF16 eager
if [ -d .gpu_build/bench_1b ]; then
    timeout 140 "$PY" bench/trainer_gpu.py --build .gpu_build/bench_1b \
        --json "$OUT/trainer_gpu.json" 2>&1 | tee "$OUT/trainer_gpu.txt"
else
    echo "no .gpu_build/bench_1b: trainer bench skipped (see the top of this script)" \
        | tee "$OUT/trainer_gpu.txt"
fi
# 3. dual micro-batch overlap in the GPU-bound setting the first run had no time for
timeout 60 "$PY" bench/overlap_gpu.py --batch 4 --repeat 1,16 2>&1 | tee "$OUT/overlap_gpu.txt"
# 4. bf16 routed experts: grouped GEMMs against the per-expert loop, and no host sync
timeout 40 "$PY" bench/moe_gpu.py 2>&1 | tee "$OUT/moe_gpu.txt"
