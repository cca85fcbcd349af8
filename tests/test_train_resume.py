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
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dsvc.runtime import checkpoint as ckpt
from dsvc.runtime import train_state
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


def test_optimizer_state_is_written_as_each_ranks_shard(w2_run):
    # ZeRO-1 state leaves as the shards the ranks hold (no all-gather at save): every
    # optimizer vector of the two-rank run is stored as two chunks, rank 0's first
    import torch.distributed.checkpoint as dcp

    path = ckpt.step_dir(str(w2_run / "checkpoints"), 2)
    assert ckpt.read_meta(path)["checkpoint_format"] == train_state.FORMAT == 3
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    optim = {k: v for k, v in meta.items() if k.startswith("optim.")}
    assert {k.rsplit(".", 1)[0] for k in optim} == {"optim.pp0.dense", "optim.pp0.expert"}
    # the moments only: the master weights are the parameters (`model.*`), written once
    assert {k.rsplit(".", 1)[1] for k in optim} == set(train_state.PARTS) == {
        "exp_avg", "exp_avg_sq"
    }  # fmt: skip
    for key, entry in optim.items():
        (numel,) = entry.size
        chunks = sorted((c.offsets[0], c.sizes[0]) for c in entry.chunks)
        half = -(-numel // 2)
        assert chunks == [(0, half), (half, numel - half)], (key, numel, chunks)


@pytest.mark.slow
def test_resume_on_more_data_parallel_ranks(builds, w2_run, tmp_path):
    # the other way round: one rank's whole vectors are read as two ranks' shards
    run = tmp_path / "run"
    args = ("--run-dir", str(run), "--fp32", "--checkpoint-every", "2")
    assert train_here(builds["w1"], *args, "--steps", "2") == 0
    proc = torchrun(builds["w2"], 2, *args, "--steps", "4", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "at step 2 (written by 1 processes)" in proc.stderr
    two, resumed = losses(w2_run), losses(run)
    rtol, atol = tol("fp32_equivalence")
    for step in (3, 4):
        assert math.isclose(resumed[step], two[step], rel_tol=rtol, abs_tol=atol), (step, resumed)


def test_format_1_checkpoints_still_resume(builds, tmp_path, monkeypatch):
    # A checkpoint of the earlier format (each parameter's full optimizer state, no
    # `checkpoint_format` in dsvc.json) resumes to the same losses as a run never stopped.
    save_v2 = train_state.state_for_save

    def save_v1(trainer):
        out = {k: v for k, v in save_v2(trainer).items() if not k.startswith("optim.")}
        for shard in trainer.optimizer.shards:
            off = 0
            for name, p in shard.named:
                for part in train_state.parts(1):
                    flat = getattr(shard, part).float()
                    key = f"optim.{part}.{train_state._key(trainer, name)}"
                    out[key] = flat[off : off + p.numel()].view_as(p).clone()
                off += p.numel()
        return out

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert train_here(builds["w1"], "--run-dir", str(whole), "--fp32", "--steps", "4") == 0
    with monkeypatch.context() as m:
        m.setattr(train_state, "state_for_save", save_v1)
        args = ("--run-dir", str(stopped), "--fp32", "--steps", "2", "--checkpoint-every", "2")
        assert train_here(builds["w1"], *args) == 0
    record = pathlib.Path(ckpt.latest(str(stopped / "checkpoints"))) / ckpt.META
    meta = json.loads(record.read_text())
    del meta["checkpoint_format"]  # format 1 records did not name their format
    record.write_text(json.dumps(meta))
    assert train_here(builds["w1"], "--run-dir", str(stopped), "--fp32", "--steps", "4",
                      "--resume") == 0  # fmt: skip
    assert {s: losses(stopped)[s] for s in (3, 4)} == {s: losses(whole)[s] for s in (3, 4)}


def test_format_2_checkpoints_still_resume(builds, tmp_path, monkeypatch):
    # Format 2 also wrote each ZeRO-1 group's master vector (the parameters' bits). Such a
    # checkpoint, its master perturbed so that reading it shows, resumes from its master:
    # step 3's loss moves with it, and unperturbed it resumes to the unstopped run's bits.
    save_v3 = train_state.state_for_save

    def save_v2(trainer, shift=0.0):
        out = save_v3(trainer)
        for key, shard, mesh in train_state._flat_groups(trainer):
            master = shard.master[: train_state._owned(shard)] + shift
            out[f"{key}.master"] = train_state._flat(shard, master, mesh)
        return out

    def stop_at_2(run, shift):
        with monkeypatch.context() as m:
            m.setattr(train_state, "state_for_save", lambda t: save_v2(t, shift))
            args = ("--run-dir", str(run), "--fp32", "--steps", "2", "--checkpoint-every", "2")
            assert train_here(builds["w1"], *args) == 0
        record = pathlib.Path(ckpt.latest(str(run / "checkpoints"))) / ckpt.META
        meta = json.loads(record.read_text())
        assert meta["checkpoint_format"] == 3
        record.write_text(json.dumps(dict(meta, checkpoint_format=2)))
        assert train_here(builds["w1"], "--run-dir", str(run), "--fp32", "--steps", "4",
                          "--resume") == 0  # fmt: skip
        return losses(run)

    whole = tmp_path / "whole"
    assert train_here(builds["w1"], "--run-dir", str(whole), "--fp32", "--steps", "4") == 0
    same, shifted = stop_at_2(tmp_path / "same", 0.0), stop_at_2(tmp_path / "shifted", 0.01)
    assert {s: same[s] for s in (3, 4)} == {s: losses(whole)[s] for s in (3, 4)}
    assert shifted[3] != same[3]


def test_a_checkpoint_of_a_newer_format_is_refused(builds, tmp_path, capsys):
    run = tmp_path / "run"
    args = ("--run-dir", str(run), "--steps", "1", "--checkpoint-every", "1")
    assert train_here(builds["w1"], *args) == 0
    path = pathlib.Path(ckpt.latest(str(run / "checkpoints")))
    record = json.loads((path / ckpt.META).read_text())
    (path / ckpt.META).write_text(json.dumps(dict(record, checkpoint_format=99)))
    before = snapshot(run)
    capsys.readouterr()
    assert train_here(builds["w1"], "--run-dir", str(run), "--steps", "2", "--resume") == 1
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "checkpoint format 99" in err, err
    assert snapshot(run) == before
