"""A failing rank ends the job quickly, non-zero, naming the rank and its error."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

from dsvc.runtime.launch import WorkerFailure, spawn
from dsvc.runtime.tiny import tiny_plan
from tests.runtime._workers import fail_at_step

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_spawned_job_reports_the_failing_rank():
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as info:
        spawn(fail_at_step, 4, (tiny_plan(num_layers=2, mtp_depth=0), 2), timeout_s=300)
    # named by the failing rank itself (a hang would end in the job timeout, rank None)
    assert info.value.rank == 2
    assert "injected failure in step 1" in str(info.value)
    assert time.monotonic() - start < 150


@pytest.mark.slow
def test_torchrun_job_exits_nonzero_with_rank_and_error():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--monitor-interval=0.2", str(ROOT / "tests" / "runtime" / "_torchrun_fail.py"),
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "[dsvc] rank 1 failed: ValueError: injected failure on purpose" in output
    assert elapsed < 90, output[-2000:]  # the collective timeout is 60 s: torchrun stopped rank 0
