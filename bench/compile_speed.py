"""Compile speed: lowering and the graph passes for the full DeepSeek-V3 plan.

    python bench/compile_speed.py [SPEC] [--repeat N]

Prints, for the spec (default examples/deepseek_v3.dsv: 61 layers, 256
experts, 2048 GPUs), the wall time of `dsvc check` (the reference: parsing
and checking alone) beside
  - each graph pass in-process (best of N), and their total;
  - `dsvc inspect SPEC --format json` end to end in a fresh process, start-up
    and imports included, with its peak memory (target: < 3 s, < 1 GB).
Later passes (schedule, simulate) add their rows through `EXTRA_ROWS`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_S, TARGET_BYTES = 3.0, 1 << 30

# Extra in-process rows: (label, function(spec) -> None). The schedule pass appends here.
EXTRA_ROWS: list = []

_CHILD = ("import resource, subprocess, sys, time\n"
          "t = time.perf_counter()\n"
          "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
          "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
          "print(time.perf_counter() - t, u.ru_maxrss, r.returncode, u.ru_utime + u.ru_stime)\n")


def run_cli(*argv: str) -> tuple[float, int, float]:
    """(wall seconds, peak resident bytes, CPU seconds) of `dsvc ARGV` in a fresh process."""
    cmd = [sys.executable, "-c", _CHILD, sys.executable, "-m", "dsvc.compiler.cli", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    if out[2] != "0":
        raise SystemExit(f"dsvc {' '.join(argv)} failed with exit code {out[2]}")
    return float(out[0]), int(out[1]) * 1024, float(out[3])  # ru_maxrss is in KiB on Linux


def best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="examples/deepseek_v3.dsv")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from dsvc import dsl
    from dsvc.compiler.driver import GRAPH_PASSES, PASSES

    spec = dsl.load(os.path.join(ROOT, args.spec))
    rows = []
    check_s, check_mem, check_cpu = run_cli("check", args.spec)
    rows.append(("dsvc check (reference)", check_s, (check_mem, check_cpu)))
    graph, total = None, 0.0
    for name, runner, _ in PASSES:
        if name not in GRAPH_PASSES:
            break
        prev = graph
        seconds = best_of(args.repeat, functools.partial(runner, spec, prev, {"expert_load": None}))
        graph = runner(spec, prev, {"expert_load": None})
        total += seconds
        rows.append((f"  pass {name}", seconds, None))
    rows.append(("lowering + passes to insert_comm", total, None))
    for label, fn in EXTRA_ROWS:
        rows.append((label, best_of(args.repeat, functools.partial(fn, spec)), None))
    inspect_s, inspect_mem, inspect_cpu = min((run_cli("inspect", args.spec, "--format", "json")
                                               for _ in range(args.repeat)), key=lambda r: r[0])
    rows.append(("dsvc inspect --format json (end to end)", inspect_s, (inspect_mem, inspect_cpu)))
    print(f"{args.spec}: {len(graph)} ops after insert_comm, "
          f"{len(graph.partition.stages)} pipeline stages, {len(graph.placements())} MoE layers")
    for label, seconds, proc in rows:
        extra = f"  peak {proc[0] / 2**20:6.1f} MiB, CPU {proc[1]:.2f} s" if proc else ""
        print(f"  {label:<44} {seconds:7.3f} s{extra}")
    ok = inspect_s < TARGET_S and inspect_mem < TARGET_BYTES
    load = os.getloadavg()[0]
    print(f"  target: inspect < {TARGET_S:.0f} s and < 1 GiB: {'met' if ok else 'MISSED'}; "
          f"inspect / check = {inspect_s / check_s:.1f}x; load average {load:.1f} on "
          f"{os.cpu_count()} CPUs (wall times stretch on a busy machine, CPU times do not)")
    print(json.dumps({"check_s": check_s, "passes_s": total, "inspect_s": inspect_s,
                      "inspect_cpu_s": inspect_cpu, "inspect_peak_bytes": inspect_mem}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
