#!/usr/bin/env bash
# The pending GPU checks, first device call (issue 16's headline figures), in order of
# priority, each step under its own time limit, every output kept under $OUT (at most
# 8 files come back: this call writes 8). The second call is bench/gpu_check2.sh.
#
# Prepare on the CPU machine (the GPU image has no lark or pydantic, so it cannot
# compile a spec; the kernel bench renders its own module with jinja2 alone):
#   dsvc compile tests/train_specs/bench_1b.dsv -o .gpu_build/bench_1b
# then call the device tool with
#   command: bash bench/gpu_check.sh    carry: [".gpu_build"]    timeout_s: 560
# and paste the tables into bench/RESULTS.md with the card and the date. Then add the
# fp8, fp8-eager and bf16 runs (with their `program` and `profile` from trainer_gpu.json)
# to bench/trainer_measurements.json and run `python bench/simulate_vs_measured.py
# --calibrate`: the model beside the measured step by kind of kernel, the fused kernels
# beside the simulator's bytes for them, their measured rates written to calibration.json.
#
# Step limits add up to 530 s (+ ~10 s of start-up), inside one 560 s call:
#   1. environment                                                    5 s
#   2. trainer: FP8 generated program / FP8 eager / BF16 / BF16 compiled, 310 s
#      one step of FP8 and of BF16 profiled (GPU time by kind, idle time)
#   3. memory by category at the peak, FP8 generated and eager        130 s
#   4. which fused SDPA kernel MLA's 192/128 head dims get             85 s
. "$(dirname "$0")/gpu_env.sh" dsvc_gpu_check
BUILD=.gpu_build/bench_1b
need_build "$BUILD"
# 2. the compiled ~1.1B trainer: the generated program (fused kernels) against the FP8
#    eager modules, BF16 eager and BF16 under regional torch.compile, same weights and
#    batches; tokens/s, MFU, peak memory. bf16-compile last: its compile time is the
#    step most likely to run out. One more step of fp8 and of bf16 under torch.profiler:
#    where the step's time goes (GPU time by kind of kernel, the GPU's idle time: the
#    simulator's 0.49x), the traces kept (trace_fp8.json.gz, trace_bf16.json.gz)
timeout 310 "$PY" bench/trainer_gpu.py --build "$BUILD" --steps 4 --warmup 2 \
    --modes fp8,fp8-eager,bf16,bf16-compile --json "$OUT/trainer_gpu.json" \
    --profile fp8,bf16 --trace-dir "$OUT" \
    2>&1 | tee "$OUT/trainer_gpu.txt"
# 3. the 56 GB peak explained: bytes by category at the allocator's peak, per mode
timeout 130 "$PY" bench/memory_gpu.py --build "$BUILD" --modes fp8,fp8-eager --steps 2 \
    2>&1 | tee "$OUT/memory_gpu.txt"
# 4. the attention core's kernel for MLA's unequal q/k and v head dimensions (and the
#    flash kernel on v zero-padded to the q/k width, which it would take)
timeout 85 "$PY" bench/attention_gpu.py 2>&1 | tee "$OUT/attention_gpu.txt"
