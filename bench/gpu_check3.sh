#!/usr/bin/env bash
# The pending GPU checks, third device call (after bench/gpu_check.sh and gpu_check2.sh):
# the seed's FP8 claim, FP8 training within 0.25% of BF16 on natural text
# (bench/fp8_loss_gpu.py: the bench spec trained in FP8, in BF16, and in BF16 on another
# stretch of the text as the noise floor, from the same weights; held-out losses compared).
#
# Prepare on the CPU machine as for gpu_check.sh (the GPU image cannot compile a spec):
#   dsvc compile tests/train_specs/bench_1b.dsv -o .gpu_build/bench_1b
# then call the device tool with
#   command: bash bench/gpu_check3.sh    carry: [".gpu_build"]    timeout_s: 560
# The text is the device image's own Python standard library, tokenised by the bench.
#
# Step limits add up to 545 s, inside one 560 s call:
#   1. environment                                                            5 s
#   2. three runs of 200 steps (8 x 2048 tokens each; ~0.4-0.5 s a step on an H200
#      in bench/RESULTS.md) and their held-out losses                       540 s
. "$(dirname "$0")/gpu_env.sh" dsvc_gpu_check3
BUILD=.gpu_build/bench_1b
need_build "$BUILD"
timeout 540 "$PY" bench/fp8_loss_gpu.py --build "$BUILD" --steps 200 --json "$OUT/fp8_loss.json" \
    2>&1 | tee "$OUT/fp8_loss.txt"
