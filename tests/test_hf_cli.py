"""From a Hugging Face checkpoint to a trainer and back, on the command line (docs/hf.md):
`dsvc train SPEC --init-hf DIR` (every rank loads its own stages and experts before the
optimizer is built), then `dsvc export-hf RUN -o DIR`; transformers loads the export and
its logits equal the original's within the fp32 tolerance. Bad input is one line, exit 1,
nothing written. One launch of two processes (about 20 s on two loaded cores)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import pytest
import torch

from dsvc.compiler.cli import main as dsvc
from tests.test_train_support import SPECS, compile_spec, snapshot
from tests.tolerances import tol

SPEC = SPECS / "hf_init.dsv"


def run(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = dsvc(list(argv))
    return code, err.getvalue()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers DeepseekV3 of the spec's model, random weights, saved with one MTP layer
    in DeepSeek's naming; (its directory, its logits on fixed tokens)."""
    from dsvc.runtime.plan import load_plan
    from tests.runtime._hf_case import write_hf_checkpoint

    root = tmp_path_factory.mktemp("hf_cli")
    plan = load_plan(compile_spec(SPEC, root / "build") / "plan.json")
    hf, _ = write_hf_checkpoint(plan, root / "hf", std=0.1)
    tokens = torch.randint(0, plan.model.vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = hf(tokens).logits
    return root / "hf", tokens, logits


@pytest.mark.slow
def test_init_hf_then_export_hf_round_trips(hf_dir, tmp_path, monkeypatch, capfd):
    from safetensors.torch import load_file
    from transformers import DeepseekV3ForCausalLM

    src, tokens, want = hf_dir
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    code = dsvc(["train", str(SPEC), "--init-hf", str(src), "--run-dir", str(run_dir),
                 "--build-dir", str(tmp_path / "build")])
    err = capfd.readouterr().err  # the trainer's processes write to the terminal itself
    assert code == 0, err
    assert f"[dsvc] weights from {src}:" in err
    code, err = run("export-hf", str(run_dir), "-o", str(out), "--dtype", "fp32")
    assert code == 0, err
    original, exported = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)  # MTP layer 3 in DeepSeek's naming included
    changed = [k for k in original if not torch.equal(original[k], exported[k])]
    assert changed == []  # every tensor, routed experts from both EP ranks, bit for bit
    hf = DeepseekV3ForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = hf(tokens).logits
    rtol, atol = tol("hf_logits")
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_bad_input_is_one_line_and_writes_nothing(hf_dir, tmp_path):
    src = hf_dir[0]
    code, err = run("train", str(SPEC), "--init-hf", str(tmp_path / "nope"),
                    "--run-dir", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1 and "--init-hf" in err
    assert not (tmp_path / "run").exists()
    code, err = run("export-hf", str(tmp_path / "no_run"), "-o", str(tmp_path / "out"))
    assert code == 1 and err.count("\n") == 1 and "no such directory" in err
    run_dir = tmp_path / "run2"
    (run_dir / "checkpoints" / "step_00000001").mkdir(parents=True)
    code, err = run("export-hf", str(run_dir), "-o", str(tmp_path / "out"))
    assert code == 1 and err.count("\n") == 1 and "no complete checkpoint" in err
    # a checkpoint record that names no plan, and one whose plan is not its model's
    step = run_dir / "checkpoints" / "step_00000001"
    (step / "dsvc.json").write_text(json.dumps({"step": 1, "model_hash": "x"}))
    code, err = run("export-hf", str(step), "-o", str(tmp_path / "out"))
    assert code == 1 and "records no plan" in err
    plan = {"model": {"vocab": 1}}
    (step / "dsvc.json").write_text(json.dumps({"step": 1, "model_hash": "x", "plan": plan}))
    code, err = run("export-hf", str(step), "-o", str(tmp_path / "out"))
    assert code == 1 and "refusing to export" in err
    assert not (tmp_path / "out").exists()
    before = snapshot(tmp_path)
    code, err = run("export-hf", str(step), "-o", str(src))  # exists: not replaced
    assert code == 2 and "--force" in err and snapshot(tmp_path) == before


def test_init_hf_of_another_model_lists_every_mismatch(hf_dir, tmp_path):
    """The checkpoint of another spec: one error line naming every difference, before any
    process group exists; no run directory written."""
    from dsvc.runtime.loop import main

    other = tmp_path / "other.dsv"
    text = SPEC.read_text().replace("routed = 8", "routed = 16")
    for old, new in (("intermediate = 128", "intermediate = 96"), ("gpus_per_node = 2",
                     "gpus_per_node = 1"), ("domain = 2", "domain = 1"), ("expert = 2", "expert = 1")):
        text = text.replace(old, new)  # and on one process, to run here
    other.write_text(text)
    build = compile_spec(other, tmp_path / "build")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(str(build), ["--init-hf", str(hf_dir[0]), "--run-dir", str(tmp_path / "run")])
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("[dsvc] error")]
    assert code == 1 and len(lines) == 1, err.getvalue()
    for needle in ("n_routed_experts is 8 in the checkpoint, 16 in the plan",
                   "intermediate_size is 128 in the checkpoint, 96 in the plan",
                   "missing", "wrong shape"):
        assert needle in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "run")


def test_export_unstacks_experts_by_placement(tmp_path):
    """An offline export of a checkpoint written by EP 2 (experts in `.ep0`/`.ep1` stacks, a
    permuted placement) puts each slice under its global expert id."""
    import torch.distributed.checkpoint as dcp

    from dsvc.runtime.hf import export_hf_from_checkpoint
    from dsvc.runtime.model import build_full_model
    from dsvc.runtime.plan import parse_plan
    from dsvc.runtime.tiny import tiny_plan

    raw = tiny_plan(pp=1, dp=2, ep=2, precision="fp32", num_layers=2, mtp_depth=0)
    raw["experts"]["moe"]["per_rank"] = [[5, 0, 7, 2], [1, 6, 3, 4]]
    plan = parse_plan(raw)
    full = build_full_model(plan)
    with torch.no_grad():
        for i, t in enumerate(full.state_dict().values()):
            t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) + i)
    state = {}
    for name, t in full.state_dict().items():
        if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            for k, ids in enumerate(plan.experts["moe"].per_rank):
                state[f"model.{name}.ep{k}"] = t[list(ids)].clone()
        else:
            state[f"model.{name}"] = t.clone()
    ckpt = tmp_path / "step_00000001"
    with warnings.catch_warnings():  # "assuming ... a single process": it is one here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(ckpt))
    out = export_hf_from_checkpoint(ckpt, plan, tmp_path / "hf", dtype="fp32")
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    stacked = full.state_dict()["layers.1.mlp.experts.up_proj"]
    for e in range(8):
        assert torch.equal(got[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], stacked[e])
    assert json.loads((out / "config.json").read_text())["n_routed_experts"] == 8
    (ckpt / "__0_0.distcp").write_bytes(b"garbage")  # a corrupt shard: an error, nothing left
    from dsvc.runtime.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="corrupt"):
        export_hf_from_checkpoint(ckpt, plan, tmp_path / "hf2", dtype="fp32")
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf2.partial").exists()
