"""A compiled DualPipe trainer end to end: two model copies on two processes.

`small` on pipeline 2 under `schedule = dualpipe`: each pipeline rank holds stage r of
copy A and stage 1 - r of copy B, each copy running half the micro-batches. What the
copies share must be counted once: the expert-load file's tokens, and a checkpoint's
state (a run stopped and resumed gives the uninterrupted run's losses bit for bit).
"""

from __future__ import annotations

import json

import pytest

from dsvc.runtime import checkpoint as ckpt
from tests.test_train_support import SPECS, compile_spec, losses, torchrun


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    spec_dir = tmp_path_factory.mktemp("spec")
    (spec_dir / "small.dsv").write_text((SPECS / "small.dsv").read_text())
    pp2 = (SPECS / "pp2.dsv").read_text()
    assert "schedule = 1f1b" in pp2
    (spec_dir / "dualpipe.dsv").write_text(pp2.replace("schedule = 1f1b", "schedule = dualpipe"))
    return compile_spec(spec_dir / "dualpipe.dsv", tmp_path_factory.mktemp("build") / "dp")


@pytest.fixture(scope="module")
def straight(build, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = torchrun(build, 2, "--run-dir", str(run), "--fp32", "--steps", "4")
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.mark.slow
def test_expert_load_counts_each_token_once_across_the_copies(build, straight):
    plan = json.loads((build / "plan.json").read_text())
    top_k = plan["model"]["ffn"]["moe"]["top_k"]
    experts = plan["model"]["ffn"]["moe"]["routed"]
    record = json.loads((straight / "expert_load.json").read_text())
    assert record["steps"] == [1, 4]
    tokens = 4 * record["tokens_per_step"]
    layers = record["layers"]
    moe = [i for i, layer in enumerate(plan["model"]["layers"]) if layer["ffn"] == "moe"]
    assert moe and all(str(i) in layers for i in moe), (moe, sorted(layers))
    for key, counts in layers.items():
        assert len(counts) == experts and sum(counts) == top_k * tokens, (key, sum(counts))


@pytest.mark.slow
def test_stop_and_resume_under_dualpipe_is_bitwise(build, straight, tmp_path):
    run = tmp_path / "run"
    args = ("--run-dir", str(run), "--fp32", "--checkpoint-every", "2")
    first = torchrun(build, 2, *args, "--steps", "2")
    assert first.returncode == 0, first.stderr
    assert ckpt.complete_steps(str(run / "checkpoints")) == [2]
    second = torchrun(build, 2, *args, "--steps", "4", "--resume")
    assert second.returncode == 0, second.stderr
    assert "at step 2" in second.stderr
    resumed, whole = losses(run), losses(straight)
    assert [resumed[s] for s in (3, 4)] == [whole[s] for s in (3, 4)]


def test_the_pair_holding_the_same_stages_writes_its_state_once(build, straight):
    # pipeline ranks 0 and 1 hold stages {0, 1} both: one set of optimizer keys
    import torch.distributed.checkpoint as dcp

    path = ckpt.step_dir(str(straight / "checkpoints"), 4)
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    groups = {k.rsplit(".", 1)[0] for k in keys if k.startswith("optim.")}
    assert groups == {"optim.pp0.dense", "optim.pp0.expert"}, groups


@pytest.mark.slow
def test_dualpipe_with_data_parallel_shards_resumes_bitwise(tmp_path):
    # examples/tiny.dsv under DualPipe: pipeline 2 x data 2, experts over 2 ranks. Each
    # pipeline pair writes its ZeRO-1 shards under one key (DCP keeps one copy of each
    # data-parallel chunk); a stop at 2 and resume to 4 gives the straight run's bits.
    import shutil

    import torch.distributed.checkpoint as dcp

    from tests.test_train_support import EXAMPLES

    spec_dir = tmp_path / "spec"
    shutil.copytree(EXAMPLES / "clusters", spec_dir / "clusters")
    tiny = (EXAMPLES / "tiny.dsv").read_text()
    assert "schedule = 1f1b" in tiny
    (spec_dir / "tiny.dsv").write_text(tiny.replace("schedule = 1f1b", "schedule = dualpipe"))
    build = compile_spec(spec_dir / "tiny.dsv", tmp_path / "build")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = ("--fp32", "--checkpoint-every", "2")
    for run, steps, extra in ((straight, 4, ()), (stopped, 2, ()), (stopped, 4, ("--resume",))):
        proc = torchrun(build, 4, "--run-dir", str(run), *common, "--steps", str(steps), *extra,
                        timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    assert [losses(stopped)[s] for s in (3, 4)] == [losses(straight)[s] for s in (3, 4)]
    meta = dcp.FileSystemReader(ckpt.step_dir(str(straight / "checkpoints"), 4)).read_metadata()
    optim = {k: v for k, v in meta.state_dict_metadata.items() if k.startswith("optim.")}
    assert {k.rsplit(".", 1)[0] for k in optim} == {
        "optim.pp0.dense", "optim.pp0.expert.ep0", "optim.pp0.expert.ep1"
    }  # fmt: skip
    dense = optim["optim.pp0.dense.exp_avg"]
    assert len(dense.chunks) == 2 and sum(c.sizes[0] for c in dense.chunks) == dense.size[0]
