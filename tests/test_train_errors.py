"""Bad input to a compiled trainer: one clear line, a non-zero exit, nothing overwritten.

A missing token file, a token file of the wrong dtype, a corrupt checkpoint, a
launch with the wrong world size, a fresh start over another run's
checkpoints, and (through `dsvc train`) a spec naming a missing token file.
Each case checks the message, the exit code and that the run directory is
byte for byte what it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dsvc.compiler.cli import main as dsvc
from tests.test_train_support import (
    ROOT,
    SPECS,
    child_env,
    compile_spec,
    error_lines,
    snapshot,
    torchrun,
    train_here,
)


@pytest.fixture(scope="module")
def w1(tmp_path_factory):
    return compile_spec(SPECS / "w1.dsv", tmp_path_factory.mktemp("w1") / "build")


@pytest.fixture(scope="module")
def trained(w1, tmp_path_factory):
    """A run directory with metrics and a complete checkpoint at step 2."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train_here(w1, "--run-dir", str(run), "--steps", "2", "--checkpoint-every", "2") == 0
    return run


def _fails_cleanly(capsys, build, run, *args, expect: str) -> None:
    before = snapshot(run) if os.path.exists(run) else None
    capsys.readouterr()
    assert train_here(build, "--run-dir", str(run), *args) == 1
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("[dsvc] error: "), err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in err
    if before is None:
        assert not os.path.exists(run)
    else:
        assert snapshot(run) == before


def test_missing_token_file(w1, trained, tmp_path, capsys):
    missing = str(tmp_path / "nowhere.bin")
    _fails_cleanly(
        capsys,
        w1,
        trained,
        "--resume",
        "--data",
        missing,
        expect=f"token file not found: '{missing}'",
    )


def test_token_file_with_the_wrong_dtype(w1, trained, tmp_path, capsys):
    ids = (np.arange(4096) * 7 % 256).astype(np.uint32)  # valid ids, written as uint32
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    _fails_cleanly(
        capsys,
        w1,
        trained,
        "--resume",
        "--data",
        str(path),
        "--data-dtype",
        "uint16",
        expect="is the dtype right (uint32)?",
    )
    # uint16 ids read as uint32 pair up into ids far outside the vocabulary
    ids.astype(np.uint16).tofile(path)
    _fails_cleanly(
        capsys,
        w1,
        trained,
        "--resume",
        "--data",
        str(path),
        "--data-dtype",
        "uint32",
        expect="may hold uint16 tokens",
    )
    # and the right dtype trains
    assert (
        train_here(
            w1,
            "--run-dir",
            str(tmp_path / "ok"),
            "--steps",
            "1",
            "--data",
            str(path),
            "--data-dtype",
            "uint16",
        )
        == 0
    )


def test_corrupt_checkpoint_data(w1, trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    step = run / "checkpoints" / "step_00000002"
    for name in os.listdir(step):
        if name.endswith(".distcp"):
            with open(step / name, "r+b") as f:
                f.truncate(100)
    _fails_cleanly(capsys, w1, run, "--resume", "--steps", "4", expect="is corrupt or incomplete")


def test_corrupt_checkpoint_record(w1, trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "step_00000002" / "dsvc.json").write_text("{half a rec")
    _fails_cleanly(capsys, w1, run, "--resume", "--steps", "4", expect="dsvc.json is unreadable")


def test_a_run_directory_under_a_file_is_refused_before_any_process_group(w1, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    _fails_cleanly(capsys, w1, tmp_path / "afile" / "run", "--steps", "2",
                   expect="is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "x"


def test_fresh_start_over_another_runs_checkpoints(w1, trained, capsys):
    _fails_cleanly(capsys, w1, trained, "--steps", "4", expect="pass --resume to continue")


def test_world_size_that_does_not_match_the_plan(tmp_path):
    build = compile_spec(SPECS / "w2.dsv", tmp_path / "w2")
    run = tmp_path / "run"
    proc = subprocess.run(  # noqa: PLW1510 - the exit code is the test
        [sys.executable, str(build / "train.py"), "--run-dir", str(run)],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    expected = (
        "[dsvc] error: this plan needs 2 processes (pipeline 1 x data 2), launched with 1: "
        f"run `torchrun --nproc-per-node 2 {build / 'train.py'}`"
    )
    assert proc.stderr.strip().splitlines() == [expected]
    assert not run.exists()


def test_dsvc_train_checks_the_token_file_before_compiling(tmp_path, capsys):
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    (spec_dir / "w1.dsv").write_text((SPECS / "w1.dsv").read_text())
    small = (SPECS / "small.dsv").read_text()
    (spec_dir / "small.dsv").write_text(
        small.replace("data = synthetic", 'data = tokens("missing.bin", dtype = uint16)')
    )
    build = tmp_path / "build"
    assert (
        dsvc(
            [
                "train",
                str(spec_dir / "w1.dsv"),
                "--build-dir",
                str(build),
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert f"small.dsv:{_line_of(small, 'data = synthetic')}:" in err
    assert f"token file not found: {spec_dir / 'missing.bin'}" in err
    assert not build.exists() and not (tmp_path / "run").exists()


def test_dsvc_train_overrides_are_checked_before_compiling(tmp_path, capsys):
    build, run = tmp_path / "build", tmp_path / "run"
    argv = ["train", str(SPECS / "w1.dsv"), "--build-dir", str(build), "--run-dir", str(run)]
    assert dsvc([*argv, "--set", "train.sed=1"]) == 1
    err = capsys.readouterr().err
    assert "--set:1:1: error: unknown key 'sed' in `train`" in err and "did you mean `seed`" in err
    assert not build.exists() and not run.exists()


def test_dsvc_train_passes_overrides_and_the_program_choice_on(tmp_path, monkeypatch, capsys):
    """--set reaches the compiled plan (and the build's hash), --program the trainer."""
    import subprocess as sp

    launched = []
    monkeypatch.setattr(sp, "run", lambda cmd, **kw: launched.append(cmd) or sp.CompletedProcess(
        cmd, 3))
    build = tmp_path / "build"
    argv = ["train", str(SPECS / "w1.dsv"), "--build-dir", str(build), "--run-dir",
            str(tmp_path / "run"), "--set", "train.seed=7", "--program", "eager"]
    assert dsvc(argv) == 3
    (cmd,) = launched
    assert cmd[-2:] == ["--program", "eager"]
    assert json.loads((build / "plan.json").read_text())["train"]["seed"] == 7


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_usage_errors_exit_2(w1, tmp_path):
    for args in (["--steps", "0"], ["--checkpoint-every", "-1"], ["--backend", "cuda"]):
        proc = subprocess.run(  # noqa: PLW1510 - the exit code is the test
            [sys.executable, str(w1 / "train.py"), "--run-dir", str(tmp_path / "r"), *args],
            env=child_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert "error:" in proc.stderr.splitlines()[-1]


def test_a_diverged_run_stops_without_saving_the_bad_step(
    w1, trained, tmp_path, capsys, monkeypatch
):
    import json
    import shutil

    from dsvc.runtime import trainer as trainer_module

    real_step = trainer_module.Trainer.step

    def step(self):
        metrics = real_step(self)
        if self.step_index == 4:  # the step that just ran, counted from 1
            metrics["loss"] = float("nan")
        return metrics

    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    capsys.readouterr()
    code = train_here(
        w1, "--run-dir", str(run), "--resume", "--steps", "6", "--checkpoint-every", "1"
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("[dsvc] error: training diverged at step 4")
    # step 3 was good and saved; step 4 is in the metrics but no checkpoint holds it
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000002", "step_00000003"]
    def strict(constant):  # the file is strict JSON: no NaN or Infinity literals
        raise AssertionError(f"metrics.jsonl holds {constant}")

    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(line, parse_constant=strict) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] is None
    # the routing up to the divergence is kept, counted from the run's first step
    assert json.loads((run / "expert_load.json").read_text())["steps"] == [1, 4]


def test_an_unwritable_expert_load_file_warns_and_training_goes_on(w1, tmp_path, capsys):
    run = tmp_path / "run"
    # directories where the file goes and where an earlier run's would be moved aside
    (run / "expert_load.json").mkdir(parents=True)
    (run / "expert_load.json.prev" / "x").mkdir(parents=True)
    capsys.readouterr()
    assert train_here(w1, "--run-dir", str(run), "--steps", "1", "--checkpoint-every", "0") == 0
    err = capsys.readouterr().err
    assert "[dsvc] warning: could not write" in err and "Traceback" not in err
    names = sorted(os.listdir(run))  # no temp file left behind
    assert names == ["expert_load.json", "expert_load.json.prev", "metrics.jsonl"]


def test_a_diverged_run_on_two_processes_stops_every_rank(tmp_path):
    # a learning rate of 1e30 blows the weights up at the first update: the all-reduced
    # gradient norm of step 2 is NaN on both ranks, which stop together (no hang, no
    # traceback, one error line, from rank 0)
    import json

    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    (spec_dir / "w2.dsv").write_text((SPECS / "w2.dsv").read_text())
    small = (SPECS / "small.dsv").read_text()
    assert "adamw(lr = 3e-3" in small
    (spec_dir / "small.dsv").write_text(small.replace("adamw(lr = 3e-3", "adamw(lr = 1e30"))
    build = compile_spec(spec_dir / "w2.dsv", tmp_path / "build")
    run = tmp_path / "run"
    proc = torchrun(build, 2, "--run-dir", str(run), "--steps", "6", "--checkpoint-every", "1",
                    timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "training diverged at step 2" in lines[0], proc.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["grad_norm"] is None
    assert ckpt_steps(run) == [1]  # step 1 saved, the diverged step not


def ckpt_steps(run) -> list[int]:
    from dsvc.runtime import checkpoint as ckpt

    return ckpt.complete_steps(str(run / "checkpoints"))
