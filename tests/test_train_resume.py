"""Resuming compiled trainers: another data-parallel degree, refusals, a killed save.

The specs differ only where the test says: w2 trains the `small` model on two
processes (data parallel 2), w1 on one, pp2 on a two-stage pipeline; all three
have the same model hash. (The tiny example's bitwise stop-and-resume test is
in test_train_tiny.py.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from runtime import checkpoint as ckpt
from runtime import train_state
from tests.test_train_support import (
    SPECS,
    child_env,
    compile_spec,
    error_lines,
    losses,
    snapshot,
    torchrun,
    train_here,
)
from tests.tolerances import tol


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("builds")
    return {name: compile_spec(SPECS / f"{name}.dsv", root / name) for name in ("w1", "w2", "pp2")}


@pytest.fixture(scope="module")
def w2_run(builds, tmp_path_factory):
    """Four FP32 steps on two data-parallel processes, checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("w2") / "run"
    proc = torchrun(
        builds["w2"], 2, "--run-dir", str(run), "--fp32", "--steps", "4", "--checkpoint-every", "2"
    )
    assert proc.returncode == 0, proc.stderr
    return run


def _run_from_checkpoint(src_run, step: int, dest):
    """A run directory holding only `src_run`'s checkpoint of `step`."""
    name = os.path.basename(ckpt.step_dir("", step))
    shutil.copytree(src_run / "checkpoints" / name, dest / "checkpoints" / name)
    return dest


def test_same_model_hash_across_layouts(builds):
    raws = {n: json.loads((b / "plan.json").read_text()) for n, b in builds.items()}
    hashes = {n: train_state.model_hash(r) for n, r in raws.items()}
    assert len(set(hashes.values())) == 1, hashes
    layouts = {n: train_state.pipeline_layout(r) for n, r in raws.items()}
    assert layouts["w1"] == layouts["w2"] != layouts["pp2"]


@pytest.mark.slow
def test_resume_with_another_data_parallel_degree(builds, w2_run, tmp_path, capsys):
    run = _run_from_checkpoint(w2_run, 2, tmp_path / "run")
    assert (
        train_here(builds["w1"], "--run-dir", str(run), "--fp32", "--steps", "4", "--resume") == 0
    )
    assert "at step 2 (written by 2 processes)" in capsys.readouterr().err
    one, two = losses(run), losses(w2_run)
    assert sorted(one) == [3, 4]
    rtol, atol = tol("fp32_equivalence")
    for step in (3, 4):  # DP 2 -> 1 changes only the order of the gradient sums
        assert math.isclose(one[step], two[step], rel_tol=rtol, abs_tol=atol), (step, one, two)


@pytest.mark.slow
def test_another_pipeline_layout_is_refused(builds, w2_run, tmp_path, capsys):
    run = _run_from_checkpoint(w2_run, 2, tmp_path / "run")
    before = snapshot(run)
    assert train_here(builds["pp2"], "--run-dir", str(run), "--resume") == 1
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "another pipeline layout" in err
    assert "can change its data-parallel degree" in err
    assert snapshot(run) == before


def test_another_model_is_refused(builds, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        train_here(builds["w1"], "--run-dir", str(run), "--steps", "1", "--checkpoint-every", "1")
        == 0
    )
    other_dir = tmp_path / "spec"
    other_dir.mkdir()
    shutil.copy(SPECS / "w1.dsv", other_dir / "w1.dsv")
    small = (SPECS / "small.dsv").read_text().replace("vocab = 256", "vocab = 384")
    (other_dir / "small.dsv").write_text(small)
    other = compile_spec(other_dir / "w1.dsv", tmp_path / "other")
    before = snapshot(run)
    capsys.readouterr()
    assert train_here(other, "--run-dir", str(run), "--resume") == 1
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "checkpoint of a different model" in err
    assert snapshot(run) == before


def _kill_during_a_save(build, run, resume: bool) -> bool:
    """Train with a checkpoint every step; SIGKILL once a save is under way after the first
    complete one. True if the save was still in progress when the process died."""
    cmd = [
        sys.executable,
        str(build / "train.py"),
        "--run-dir",
        str(run),
        "--steps",
        "1000",
        "--checkpoint-every",
        "1",
    ] + (["--resume"] if resume else [])
    proc = subprocess.Popen(
        cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    root = run / "checkpoints"
    first = len(ckpt.complete_steps(str(root)))
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(ckpt.complete_steps(str(root))) > first and any(
                p.endswith(".partial") for p in os.listdir(root)
            ):
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return any(p.endswith(".partial") for p in os.listdir(root))


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(builds, tmp_path):
    run = tmp_path / "run"
    # the save may finish between seeing it and the kill landing: then try again
    for attempt in range(4):
        if _kill_during_a_save(builds["w1"], run, resume=attempt > 0):
            break
    else:
        pytest.fail("no kill landed during a save in 4 attempts")
    root = run / "checkpoints"
    last = ckpt.complete_steps(str(root))[-1]
    partial = [p for p in os.listdir(root) if p.endswith(".partial")]
    assert partial == [os.path.basename(ckpt.step_dir("", last + 1)) + ".partial"]
    assert ckpt.latest(str(root)) == ckpt.step_dir(str(root), last)  # the partial is ignored
    assert (
        train_here(builds["w1"], "--run-dir", str(run), "--resume", "--steps", str(last + 1)) == 0
    )
    assert max(losses(run)) == last + 1
