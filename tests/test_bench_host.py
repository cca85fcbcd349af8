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
    # the constants it derives for the simulator: the program's launches as the simulator
    # counts them, which are the launches the run made
    found = re.search(r"host_s_per_op (\d+\.\d) us \(the (\d+) eager host ops.*"
                      r"program_host_s_per_launch (\d+\.\d) us \(the (\d+) launches", proc.stdout)
    assert found, proc.stdout
    assert int(found.group(4)) == int(rows["generated program"])
    assert float(found.group(1)) > 0 and float(found.group(3)) > 0
