"""Start-up latency of `dsvc check` beside the bare interpreter's, measured in the same run.

    python bench/cli_latency.py [--spec examples/deepseek_v3.dsv] [--repeats 21]

Runs `python -c pass` and `dsvc check -q SPEC` alternately (so both see the
same machine load), after one warm-up each, and prints the median wall time of
each and their ratio; the target is under 4x. Two settings are measured:

- with a bytecode cache, as any installed package has (a private
  PYTHONPYCACHEPREFIX, so the checkout is not touched);
- without one (PYTHONDONTWRITEBYTECODE=1, every module compiled from source on
  every run), as some sandboxes are configured.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGET = 4.0


def dsvc_command() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "dsvc"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dsvc.compiler.cli"]


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return took


def measure(commands: dict[str, list[str]], env: dict[str, str], repeats: int) -> dict:
    for cmd in commands.values():  # warm-up: fills the bytecode cache and the page cache
        wall(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            times[name].append(wall(cmd, env))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="examples/deepseek_v3.dsv")
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args(argv)
    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                f"dsvc check {args.spec}": dsvc_command() + ["check", "-q", args.spec]}
    version = sys.version.split()[0]
    print(f"start-up latency, median of {args.repeats} alternating runs (python {version})")
    with tempfile.TemporaryDirectory(prefix="dsvc-pyc-") as cache:
        cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = cache
        uncached = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
        uncached["PYTHONDONTWRITEBYTECODE"] = "1"
        for label, env in (("with a bytecode cache", cached),
                           ("without a bytecode cache", uncached)):
            t = measure(commands, env, args.repeats)
            base, check = t["python -c pass"], t[f"dsvc check {args.spec}"]
            ratio = check / base
            print(f"  {label}:")
            print(f"    {'python -c pass':<40} {base * 1e3:7.1f} ms")
            print(f"    {'dsvc check ' + args.spec:<40} {check * 1e3:7.1f} ms   {ratio:.2f}x "
                  f"(target < {TARGET:g}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
