"""How `dsvc report` grows with the counts `dsvc check` bounds: layers, and stages x micro-batches.

    python bench/scaling.py [--repeat 3] [--quick]

Three series of specs, each doubling one count up to its limit (dsl/limits.py)
with the rest held: decoder layers 16 -> 256 (pipeline 4, 16 micro-batches); and
schedule chunks (stages per copy x micro-batches, 1F1B) 512 -> 8,192, once by
micro-batches (16 stages, 64 layers), once by stages (128 micro-batches, 128
layers). For each point it prints the report's CPU time in this process (the best
of --repeat; imports are paid once, before the first point), the time per unit of
the count, and the growth from the point before: t(2n) / t(n), which is 2.0 for
linear growth and 4.0 for quadratic. The reference is the series' first point,
measured in the same run: the last line gives the exponent from it to the limit,
log(t_max / t_0) / log(n_max / n_0), at most 1 when the work is at most linear
(a fixed part of the time makes it smaller). It fails (exit 1) above 1.15, and
when the report at the limit takes over 10 s.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import source_tree  # noqa: F401  (dsvc from this tree, installed or not)

from dsvc import dsl
from dsvc.compiler.driver import build_report
from dsvc.dsl.limits import MAX_LAYERS, MAX_SCHEDULE_CHUNKS

MAX_EXPONENT = 1.15  # noise allowance over linear
MAX_SECONDS = 10.0


def spec_text(layers: int, pipeline: int, micro_batches: int) -> str:
    """A DeepSeek-V3-shaped small model (MLA, MoE with shared experts, MTP) on `pipeline`
    ranks of one data-parallel replica, 1F1B, `micro_batches` per step."""
    return f"""
model m {{
  vocab = 4096
  hidden = 256
  attention mla {{ heads = 4, q_lora_rank = 128, kv_lora_rank = 128, qk_nope_dim = 32,
                  qk_rope_dim = 16, v_dim = 32 }}
  ffn dense {{ intermediate = 512 }}
  ffn moe {{ routed = 16, shared = 1, top_k = 2, intermediate = 128 }}
  layers {{
    0 = block(mla, dense)
    1..{layers - 1} = block(mla, moe)
  }}
  mtp {{ depth = 1, loss_weight = 0.3 }}
}}
cluster c {{
  nodes = {pipeline}
  gpus_per_node = 8
  gpu = h800 {{ bf16 = 989 TFLOPS, fp8 = 1979 TFLOPS, memory = 80 GB, hbm = 3.35 TB/s }}
  nvlink {{ bandwidth = 400 GB/s, effective = 160 GB/s }}
  network infiniband {{ nic = 400 Gb/s, effective = 40 GB/s }}
}}
parallel {{ pipeline = {pipeline}, expert = 8, schedule = 1f1b }}
train {{ seq_len = 4096, global_batch = {8 * micro_batches}, micro_batch = 1 }}
"""


def report_seconds(text: str, repeat: int) -> float:
    spec = dsl.loads(text, "scaling.dsv")
    best = math.inf
    for _ in range(repeat):
        start = time.process_time()
        build_report(spec)
        best = min(best, time.process_time() - start)
    return best


def series(name: str, unit: str, points: list[tuple[int, str]], repeat: int) -> tuple[float, float]:
    """Print one series; returns (exponent from the first point to the last, last time)."""
    print(f"\n{name}")
    print(f"  {unit:>8}  {'report s':>9}  {'ms/' + unit.rstrip('s'):>10}  {'t(2n)/t(n)':>10}")
    first = prev = None
    for n, text in points:
        t = report_seconds(text, repeat)
        growth = f"{t / prev[1]:10.2f}" if prev else f"{'(ref)':>10}"
        print(f"  {n:8d}  {t:9.3f}  {1e3 * t / n:10.3f}  {growth}")
        first = first or (n, t)
        prev = (n, t)
    exponent = math.log(prev[1] / first[1]) / math.log(prev[0] / first[0])
    print(f"  growth exponent {first[0]} -> {prev[0]}: {exponent:.2f} (1.00 = linear, 2.00 = "
          f"quadratic); at the limit {prev[1]:.2f} s")
    return exponent, prev[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per point (the best counts)")
    ap.add_argument("--quick", action="store_true", help="two small points per series")
    args = ap.parse_args()
    build_report(dsl.loads(spec_text(4, 2, 4), "warm.dsv"))  # imports, caches
    layers = [16, 32, 64, 128, MAX_LAYERS] if not args.quick else [8, 16]
    chunks = [512, 1024, 2048, 4096, MAX_SCHEDULE_CHUNKS] if not args.quick else [64, 128]
    stages = 16 if not args.quick else 4
    per_stage = 128 if not args.quick else 16
    print(f"dsvc report, CPU time in one process, best of {args.repeat}")
    results = [
        series("layers (pipeline 4, 16 micro-batches)", "layers",
               [(n, spec_text(n, 4, 16)) for n in layers], args.repeat),
        series(f"stages x micro-batches: micro-batches grow ({stages} stages, 1F1B, 64 layers)",
               "chunks", [(n, spec_text(64, stages, n // stages)) for n in chunks], args.repeat),
        series(f"stages x micro-batches: stages grow ({per_stage} micro-batches, 1F1B, "
               f"{MAX_LAYERS // 2} layers)", "chunks",
               [(n, spec_text(MAX_LAYERS // 2, n // per_stage, per_stage)) for n in chunks],
               args.repeat),
    ]
    ok = all(e <= MAX_EXPONENT and t <= MAX_SECONDS for e, t in results)
    print(f"\nat most linear (exponent <= {MAX_EXPONENT}) and under {MAX_SECONDS:.0f} s at the "
          f"limits: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
