"""Hugging Face DeepSeek-V3 checkpoints in and out of the runtime (runtime/hf.py): numerics.

A tiny DeepSeek-V3 built with the public `transformers` implementation (random
weights: MLA, sigmoid routing with groups and a correction bias, shared experts,
a dense first layer, YaRN; fp32; see _hf_case.py) is loaded into the runtime's
unpartitioned model and must give the same logits; exported back, transformers
loads it and gives them again. Also: FP8 checkpoints (e4m3 + weight_scale_inv)
and a pipeline/EP rank reading only its part. Errors: test_hf_errors.py.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsvc.runtime.hf import export_hf_checkpoint, load_hf_checkpoint, model_logits
from dsvc.runtime.hf_names import schema
from dsvc.runtime.init import init_parameters
from dsvc.runtime.model import build_full_model
from tests.runtime._hf_case import NUM_LAYERS, SEQ, get_case, make_plan
from tests.tolerances import tol


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return {rope: get_case(tmp_path_factory, rope) for rope in ("yarn", "yarn_v2", "plain")}


@pytest.fixture(scope="module")
def case(cases):
    return cases["yarn"]


def _close(actual, expected, key):
    rtol, atol = tol(key)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# -- transformers -> runtime -> transformers ------------------------------------------------


@pytest.mark.parametrize("rope", ["yarn", "yarn_v2", "plain"])
def test_load_gives_transformers_logits(cases, rope):
    c = cases[rope]
    rt, report = c.load()
    assert set(report.loaded) == set(schema(c.plan)) and report.dequantized == []
    _close(model_logits(rt, c.tokens), c.logits, "hf_logits")
    # the comparison can fail: the same model with its own initial weights is far off
    fresh = build_full_model(c.plan)
    init_parameters(fresh, 0, c.plan.model.init_std)
    assert (model_logits(fresh, c.tokens) - c.logits).abs().max() > 100 * tol("hf_logits")[1]


def test_mtp_weights_load_exactly(case):
    rt, _ = case.load()
    layer = case.mtp.layers[0]
    assert torch.equal(rt.mtp[0].eh_proj.weight, layer.eh_proj.weight)
    assert torch.equal(rt.mtp[0].hnorm.weight, layer.hnorm.weight)
    assert torch.equal(rt.mtp[0].shared_head.norm.weight, layer.post_norm.weight)
    gate_up = layer.mtp_block.mlp.experts.gate_up_proj
    inter = gate_up.shape[1] // 2
    assert torch.equal(rt.mtp[0].block.mlp.experts.up_proj, gate_up[:, inter:])
    assert torch.equal(
        rt.mtp[0].block.self_attn.kv_b_proj.weight, layer.mtp_block.self_attn.kv_b_proj.weight
    )


def test_mtp_logits_match_transformers(case):
    rt, _ = case.load()
    _, mtp_logits = model_logits(rt, case.tokens, mtp=True)
    positions = torch.arange(1, SEQ).unsqueeze(0)
    with torch.no_grad():
        h = case.mtp.forward_layer(
            0, case.last_hidden[:, :-1], positions, None, input_ids=case.tokens[:, 1:]
        )
        expected = case.mtp._project_to_logits(h)
    _close(mtp_logits[0][:, :-1], expected, "hf_logits")


@pytest.mark.parametrize("rope", ["yarn", "plain"])
def test_export_loads_in_transformers_with_the_same_logits(cases, rope, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    c = cases[rope]
    rt, _ = c.load()
    out = export_hf_checkpoint(rt, c.plan, tmp_path / "export", dtype="fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .partial left behind
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_nextn_predict_layers"] == 1
    assert cfg["dsvc"]["model"]["ffn"]["moe"]["bias_update_rate"] == 0.001
    with torch.no_grad():
        again = DeepseekV3ForCausalLM.from_pretrained(out).eval()(c.tokens).logits
    _close(again, c.logits, "hf_logits")
    # and back into the runtime, bit for bit (fp32), MTP included
    rt2, _ = c.load(out)
    for (n1, t1), (n2, t2) in zip(rt.state_dict().items(), rt2.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1


def test_tied_embeddings_round_trip(tmp_path):
    """A plan whose head is the embedding: no lm_head tensor, transformers ties it back."""
    from transformers import DeepseekV3ForCausalLM

    from dsvc.runtime.plan import parse_plan
    from tests.runtime._hf_case import plan_dict

    raw = plan_dict("yarn")
    raw["model"]["tie_embeddings"] = True
    plan = parse_plan(raw)
    rt = build_full_model(plan)
    init_parameters(rt, 0, plan.model.init_std)
    out = export_hf_checkpoint(rt, plan, tmp_path / "tied", dtype="fp32")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    tokens = torch.randint(
        0, plan.model.vocab, (2, SEQ), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        hf_logits = DeepseekV3ForCausalLM.from_pretrained(out).eval()(tokens).logits
    _close(model_logits(rt, tokens), hf_logits, "hf_logits")
    rt2 = build_full_model(plan)
    load_hf_checkpoint(out, rt2, plan)
    assert all(
        torch.equal(a, b) for a, b in zip(rt.state_dict().values(), rt2.state_dict().values())
    )


def test_a_load_after_the_optimizer_is_built_reaches_its_master(tmp_path):
    """docs/hf.md: the optimizer's master shard is the parameters' storage, so a load
    after it is built updates the master it steps (nothing stale to copy again)."""
    from dsvc.runtime.mesh import ProcessMesh
    from dsvc.runtime.optim import ZeroAdamW
    from tests.runtime.test_optim import CFG

    plan = make_plan()
    src = build_full_model(plan)
    init_parameters(src, 0, plan.model.init_std)
    out = export_hf_checkpoint(src, plan, tmp_path / "src", dtype="fp32")
    dst = build_full_model(plan)
    init_parameters(dst, 1, plan.model.init_std)
    opt = ZeroAdamW(list(dst.named_parameters()), [], CFG, torch.float32, ProcessMesh())
    base = opt.dense.params.data_ptr()
    load_hf_checkpoint(out, dst, plan)
    assert opt.dense.params.data_ptr() == base
    want = torch.cat([p.detach().reshape(-1) for _, p in sorted(src.named_parameters())])
    assert torch.equal(opt.dense.master[: want.numel()], want)


def test_sharded_export_and_a_rank_reads_only_its_part(case, tmp_path):
    rt, _ = case.load()
    out = export_hf_checkpoint(
        rt, case.plan, tmp_path / "sharded", dtype="fp32", max_shard_bytes=64 * 1024
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 4 and "model.layers.3.embed_tokens.weight" in index["weight_map"]
    # pipeline rank 1 of PP 2 x DP 2 (EP 2) at EP rank 1: layer 2, the head, MTP; experts 4..7
    from dsvc.runtime.ep import ExpertComm
    from dsvc.runtime.model import StageModule

    plan = make_plan(pp=2, dp=2, ep=2)
    stage = plan.stages[1]
    comm = ExpertComm(plan.experts["moe"], ep_rank=1)
    mod = StageModule(plan, stage, {"moe": comm})
    report = load_hf_checkpoint(out, mod, plan)
    experts = {n.split(".experts.")[1].split(".")[0] for n in report.loaded if ".experts." in n}
    layers = {n.split(".")[2] for n in report.loaded if n.startswith("model.layers.")}
    assert experts == {"4", "5", "6", "7"} and layers == {"2", "3"}
    assert "model.embed_tokens.weight" in report.loaded  # the MTP modules share it
    assert set(report.files) < set(files)  # shards holding only layers 0-1 were never opened
    full = rt.state_dict()
    for name, t in mod.state_dict().items():
        if ".experts." in name:
            assert torch.equal(t, full[name][4:8]), name
        else:
            assert torch.equal(t, full[name]), name


# -- FP8 --------------------------------------------------------------------------------------


def _is_fp8_linear(name: str) -> bool:
    return (
        name.startswith("model.layers.")
        and name.endswith("_proj.weight")
        and ".eh_proj." not in name
    )


def test_fp8_checkpoint_is_dequantized_on_load(case, tmp_path):
    from dsvc.runtime.fp8 import dequantize_weight, quantize_weight

    path = case.copy(tmp_path / "fp8")
    weights, quantized = load_file(path / "model.safetensors"), {}
    for name in [n for n in weights if _is_fp8_linear(n)]:
        q, s = quantize_weight(weights[name], 128)
        weights[name], weights[name + "_scale_inv"] = q, s
        quantized[name] = dequantize_weight(q, s, 128)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    rt, report = case.load(path)
    assert set(report.dequantized) == set(quantized)
    assert torch.equal(
        rt.layers["1"].self_attn.q_b_proj.weight,
        quantized["model.layers.1.self_attn.q_b_proj.weight"],
    )
    assert torch.equal(
        rt.layers["2"].mlp.experts.down_proj[5],
        quantized["model.layers.2.mlp.experts.5.down_proj.weight"],
    )
    # transformers running the same dequantised weights gives the same logits ...
    from transformers import DeepseekV3ForCausalLM

    out = export_hf_checkpoint(rt, case.plan, tmp_path / "dequantized", dtype="fp32")
    logits = model_logits(rt, case.tokens)
    with torch.no_grad():
        _close(
            logits,
            DeepseekV3ForCausalLM.from_pretrained(out).eval()(case.tokens).logits,
            "hf_logits",
        )
    # ... and they differ from the fp32 original's by what e4m3 weights do to this model
    err = (logits - case.logits).norm() / case.logits.norm()
    assert 0 < err <= tol("hf_fp8_logits_rel")[0]


def test_fp8_export_roundtrip(case, tmp_path):
    from dsvc.runtime.fp8 import dequantize_weight, quantize_weight

    rt, _ = case.load()
    out = export_hf_checkpoint(rt, case.plan, tmp_path / "fp8", dtype="fp8")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}  # noqa: SIM118
    assert dtypes["model.layers.2.mlp.experts.3.gate_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.2.mlp.experts.3.gate_proj.weight_scale_inv"] == "F32"
    assert dtypes["model.layers.2.mlp.gate.weight"] == "BF16"
    assert dtypes["model.layers.2.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.3.eh_proj.weight"] == "BF16"
    rt2, report = case.load(out)
    assert len(report.dequantized) == sum(1 for n in dtypes if n.endswith("_scale_inv"))
    w = rt.layers["0"].mlp.down_proj.weight
    assert torch.equal(
        rt2.layers["0"].mlp.down_proj.weight, dequantize_weight(*quantize_weight(w, 128), 128)
    )
    assert torch.equal(rt2.norm.weight, rt.norm.weight.to(torch.bfloat16).float())


def test_dequantize_blocks_matches_the_fp8_reference():
    from dsvc.runtime.fp8 import dequantize_weight, quantize_weight
    from dsvc.runtime.hf_names import dequantize_blocks

    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(0))
    q, s = quantize_weight(w, 128)
    assert s.shape == (3, 3)
    assert torch.equal(dequantize_blocks(q, s, (128, 128)), dequantize_weight(q, s, 128))
    # a rectangular block size (quantization_config.weight_block_size), against a plain loop
    s2 = torch.rand(5, 3) + 0.5
    ref = q.float().clone()
    for i in range(300):
        for j in range(0, 260, 128):
            ref[i, j : j + 128] *= s2[i // 64, j // 128]
    assert torch.equal(dequantize_blocks(q, s2, (64, 128)), ref)


SCHEDULES = ("1f1b", "dualpipev")


@pytest.fixture(scope="module")
def distributed(case, tmp_path_factory):
    """One spawned job, world 4 = PP 2 x DP 2 (EP 2) under gloo, per schedule: every rank
    loads its part of the checkpoint and the collective export writes it back."""
    from dsvc.runtime.launch import spawn
    from tests.runtime._hf_case import load_and_export, plan_dict

    root = tmp_path_factory.mktemp("dist")
    scenarios = [
        (plan_dict(pp=2, dp=2, ep=2, schedule=s), str(root / s / "out")) for s in SCHEDULES
    ]
    results = spawn(load_and_export, 4, (scenarios, str(case.dir)), timeout_s=400)
    return {s: ([r[i] for r in results], root / s) for i, s in enumerate(SCHEDULES)}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_distributed_load_and_export(case, distributed, schedule):
    """Each rank read only its stages and its EP rank's experts; together everything; the
    export wrote each tensor once (one file per pipeline x EP rank) and equals the checkpoint."""
    results, root = distributed[schedule]
    everything = set(schema(case.plan))
    plan = make_plan(pp=2, dp=2, ep=2, schedule=schedule)
    for r in results:
        pp_rank, _, ep_rank = r["coords"]
        experts = {n.split(".experts.")[1].split(".")[0] for n in r["loaded"] if ".experts." in n}
        assert experts == {str(e) for e in range(4 * ep_rank, 4 * ep_rank + 4)}, r["coords"]
        stages = plan.stages_of_rank(pp_rank)
        layers = {i for s in stages for i in s.layers} | (
            {NUM_LAYERS} if any(s.mtp for s in stages) else set()
        )
        assert {
            int(n.split(".")[2]) for n in r["loaded"] if n.startswith("model.layers.")
        } == layers
    assert set().union(*(set(r["loaded"]) for r in results)) == everything
    out = root / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    assert sorted(p.name for p in root.iterdir()) == ["out"]  # no .partial left behind
    reference, _ = case.load()
    again, _ = case.load(out)
    for (n1, t1), (n2, t2) in zip(reference.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
