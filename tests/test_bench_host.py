"""bench/host_cpu.py: a block's host time with the GPU's work stubbed (its run, not its times)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.test_train_support import ROOT


def test_host_bench_runs_both_blocks_with_every_launch_stubbed():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(  # noqa: PLW1510 - the exit code is checked below
        [sys.executable, str(ROOT / "bench" / "host_cpu.py"), "--spec",
         str(ROOT / "examples" / "tiny.dsv"), "--reps", "3"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = dict(re.findall(r"^\| (eager modules|generated program) \|.*\| (\d+) \|$",
                           proc.stdout, re.M))  # fmt: skip
    # both blocks issued their kernels, none of which ran (a CPU has no GPU to run them)
    assert set(rows) == {"eager modules", "generated program"}
    assert all(int(n) > 10 for n in rows.values()), proc.stdout
    assert re.search(r"program / eager: \d+\.\d\dx", proc.stdout)
