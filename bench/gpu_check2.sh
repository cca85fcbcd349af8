#!/usr/bin/env bash
# The pending GPU checks, second device call (after bench/gpu_check.sh): the kernels
# against cuBLAS in the same run, the GPU-bound overlap bench and the grouped experts.
# Each step under its own time limit; outputs under $OUT (4 files come back).
#
# Prepare on the CPU machine (the GPU image cannot compile a spec; kernels_gpu.py renders
# its own module with jinja2):
#   dsvc compile bench/specs/overlap_layer.dsv -o .gpu_build/overlap_layer
# then call the device tool with
#   command: bash bench/gpu_check2.sh    carry: [".gpu_build"]    timeout_s: 560
#
# Step limits add up to 535 s, inside one 560 s call:
#   1. environment                                                          5 s
#   2. kernels: correctness, quantisers against copy bandwidth, grouped GEMMs and
#      GEMMs against cuBLAS block-scaled columns (autotuned, the warp-specialised
#      configs among the candidates and timed alone beside; GEMMs last: their
#      autotuning compiles the most, ~5 min on the first H200 run)         330 s
#   3. dual micro-batch overlap, GPU-bound: one V3-shaped MLA + MoE layer as the
#      generated program (FP8, grouped experts), 4 x 4096 tokens, 1x and 16x  120 s
#   4. bf16 routed experts: grouped GEMMs against the per-expert loop         80 s
. "$(dirname "$0")/gpu_env.sh" dsvc_gpu_check2
timeout 330 "$PY" bench/kernels_gpu.py 2>&1 | tee "$OUT/kernels_gpu.txt"
if [ -d .gpu_build/overlap_layer ]; then
    timeout 120 "$PY" bench/overlap_gpu.py --build .gpu_build/overlap_layer --repeat 1,16 \
        --iters 5 2>&1 | tee "$OUT/overlap_gpu.txt"
else  # not prepared: the eager bf16 layer at the same batch (its host syncs included)
    echo "no .gpu_build/overlap_layer: the eager bf16 layer instead" | tee "$OUT/overlap_gpu.txt"
    timeout 120 "$PY" bench/overlap_gpu.py --batch 4 --repeat 1,16 2>&1 | tee -a "$OUT/overlap_gpu.txt"
fi
timeout 80 "$PY" bench/moe_gpu.py 2>&1 | tee "$OUT/moe_gpu.txt"
