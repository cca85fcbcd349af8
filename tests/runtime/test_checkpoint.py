"""Checkpoints: atomic visibility, refusal of other models/layouts, corruption, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dsvc.runtime import checkpoint as ckpt

META = {"model_hash": "m1", "pipeline_layout": [[0, 1], [2, 3]]}


def test_save_then_load_roundtrip(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(7)}
    path = ckpt.save(str(tmp_path), 7, state, META)
    assert os.path.basename(path) == "step_00000007"
    assert ckpt.latest(str(tmp_path)) == path
    target = {"w": torch.zeros(2, 3), "step": torch.tensor(0)}
    meta = ckpt.load(path, target, META)
    assert meta["step"] == 7
    assert torch.equal(target["w"], state["w"]) and int(target["step"]) == 7


def test_partial_checkpoints_are_ignored(tmp_path):
    ckpt.save(str(tmp_path), 1, {"w": torch.ones(2)}, META)
    os.makedirs(tmp_path / "step_00000002.partial")
    (tmp_path / "step_00000002.partial" / "junk").write_text("half")
    assert ckpt.complete_steps(str(tmp_path)) == [1]


def test_refuses_other_model_and_layout(tmp_path):
    path = ckpt.save(str(tmp_path), 1, {"w": torch.ones(2)}, META)
    with pytest.raises(ckpt.CheckpointError, match="different model"):
        ckpt.load(path, {"w": torch.zeros(2)}, dict(META, model_hash="m2"))
    with pytest.raises(ckpt.CheckpointError, match="pipeline layout"):
        ckpt.load(path, {"w": torch.zeros(2)}, dict(META, pipeline_layout=[[0, 1, 2, 3]]))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = ckpt.save(str(tmp_path), 1, {"w": torch.ones(1000)}, META)
    for name in os.listdir(path):
        if name.endswith(".distcp"):
            with open(os.path.join(path, name), "r+b") as f:
                f.truncate(10)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load(path, {"w": torch.zeros(1000)}, META)
    (tmp_path / "step_00000001" / "dsvc.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load(path, {"w": torch.zeros(1000)}, META)


def test_a_record_that_is_not_a_regular_file_is_refused_not_read(tmp_path):
    path = ckpt.save(str(tmp_path), 1, {"w": torch.ones(4)}, META)
    record = os.path.join(path, ckpt.META)
    os.remove(record)
    os.mkfifo(record)  # open() for reading would wait for a writer forever
    with pytest.raises(ckpt.CheckpointError, match=r"unreadable \(is a FIFO"):
        ckpt.read_meta(path)
    os.remove(record)
    with open(record, "w") as f:
        f.write('{"step": ' + "9" * 5000 + "}")  # past the JSON integer limit
    with pytest.raises(ckpt.CheckpointError, match="a JSON integer of 5000 digits"):
        ckpt.read_meta(path)


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        from dsvc.runtime import checkpoint as ckpt
        meta = {META!r}
        ckpt.save({str(tmp_path)!r}, 1, {{"w": torch.ones(4)}}, meta)
        print("saved", flush=True)
        big = {{f"t{{i}}": torch.randn(1 << 20) for i in range(400)}}
        ckpt.save({str(tmp_path)!r}, 2, big, meta)
        print("saved2", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.stdout.readline().strip() == "saved"
    deadline = time.time() + 60
    while not (tmp_path / "step_00000002.partial").exists() and time.time() < deadline:
        time.sleep(0.01)
    assert (tmp_path / "step_00000002.partial").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.complete_steps(str(tmp_path)) == [1]
    target = {"w": torch.zeros(4)}
    ckpt.load(ckpt.latest(str(tmp_path)), target, META)
    assert torch.equal(target["w"], torch.ones(4))
