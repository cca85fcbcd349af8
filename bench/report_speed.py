"""Wall time of `dsvc report` beside `dsvc check` of the same spec, start-up included.

    python bench/report_speed.py [--spec examples/deepseek_v3.dsv] [--runs 7]

Each command runs as a fresh process (`python -m dsvc.compiler.cli ...`, Python
start-up and imports included), the two alternating so that machine noise hits
both alike; it prints the median of each, their ratio, `--symbolic` for
reference, and the target (report under 2 s). It also checks that the report
process imported neither torch nor sympy (nor pydantic).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET_S = 2.0


def wall(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dsvc.compiler.cli", *argv], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          check=False)
    took = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"dsvc {' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return took


def heavy_imports(spec: str) -> list[str]:
    code = (f"import sys; from dsvc.compiler.cli import main; main(['report', {spec!r}]); "
            "print('loaded:', *(m for m in ('torch', 'sympy', 'pydantic') if m in sys.modules), "
            "file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    line = [x for x in done.stderr.splitlines() if x.startswith("loaded:")][-1]
    return line.split()[1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="examples/deepseek_v3.dsv")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    wall(["report", args.spec])  # warm the file cache and bytecode
    times: dict[str, list[float]] = {"check": [], "report": [], "report --symbolic": []}
    for _ in range(args.runs):
        times["check"].append(wall(["check", args.spec]))
        times["report"].append(wall(["report", args.spec]))
        times["report --symbolic"].append(wall(["report", args.spec, "--symbolic"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"spec: {args.spec}   runs: {args.runs} (median wall time, start-up included)")
    for name, t in med.items():
        print(f"  dsvc {name:<18} {t:6.3f} s   {t / med['check']:5.2f}x check")
    loaded = heavy_imports(args.spec)
    print(f"  report imports torch/sympy/pydantic: {', '.join(loaded) if loaded else 'none'}")
    ok = med["report"] < TARGET_S and not loaded
    print(f"target: report < {TARGET_S:.1f} s without torch or sympy: "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
