"""The exported config.json computes in transformers what the runtime computes (runtime/hf_export.py).

The keys that are not DeepSeek-V3's fixed values: YaRN with `mscale` != `mscale_all_dim`
(softmax scale x m(mscale_all_dim)^2, cos/sin x m(mscale) / m(mscale_all_dim), as
runtime/layers.py) and `norm_topk_prob` following the plan's `renormalize`. A tiny
DeepSeek-V3 plan is initialised, exported, loaded by transformers and compared logit
for logit; the config a wrong mapping would write gives other logits and is flagged.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from dsvc.runtime.hf import check_hf_config, export_hf_checkpoint, hf_config_from_plan, model_logits
from dsvc.runtime.init import init_parameters
from dsvc.runtime.model import build_full_model
from dsvc.runtime.plan import parse_plan
from tests.runtime._hf_case import SEQ, plan_dict
from tests.tolerances import tol

# (rope keys, renormalize): DeepSeek-V2's 1.0 / 0.707 split with unnormalised gates, and a
# zero mscale, which transformers would read as "infer m(factor)" without attention_factor
CASES = [
    ({"mscale": 1.0, "mscale_all_dim": 0.707}, False),
    ({"mscale": 0.0, "mscale_all_dim": 1.0}, True),
]


def _plan(rope: dict, renormalize: bool):
    raw = plan_dict("yarn")  # YaRN active: max_seq_len 64 > original 16, factor 4
    raw["model"]["rope"].update(rope)
    raw["model"]["ffn"]["moe"]["renormalize"] = renormalize
    return parse_plan(raw)


def _hf_logits(checkpoint, tokens, tmp_path, **config_changes):
    """transformers' logits for `checkpoint`, its config.json changed by `config_changes`."""
    from transformers import DeepseekV3ForCausalLM

    if config_changes:
        changed = tmp_path / "changed"
        shutil.copytree(checkpoint, changed)
        cfg = json.loads((changed / "config.json").read_text())
        cfg.update(config_changes)
        (changed / "config.json").write_text(json.dumps(cfg))
        checkpoint = changed
    with torch.no_grad():
        return DeepseekV3ForCausalLM.from_pretrained(checkpoint).eval()(tokens).logits


@pytest.mark.parametrize("rope, renormalize", CASES, ids=["v2_mscales", "zero_mscale"])
def test_exported_config_computes_the_runtimes_logits_in_transformers(tmp_path, rope, renormalize):
    plan = _plan(rope, renormalize)
    rt = build_full_model(plan)
    init_parameters(rt, 0, plan.model.init_std)
    out = export_hf_checkpoint(rt, plan, tmp_path / "export", dtype="fp32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm_topk_prob"] is renormalize
    assert cfg["rope_scaling"]["mscale"] == rope["mscale"]
    assert cfg["rope_scaling"]["mscale_all_dim"] == rope["mscale_all_dim"]
    assert check_hf_config(plan, cfg) == []
    tokens = torch.randint(
        0, plan.model.vocab, (2, SEQ), generator=torch.Generator().manual_seed(0)
    )
    want = model_logits(rt, tokens)
    rtol, atol = tol("hf_logits")
    torch.testing.assert_close(_hf_logits(out, tokens, tmp_path), want, rtol=rtol, atol=atol)
    # what the old mapping wrote (one mscale for both, gates always renormalised) computes
    # other logits, and the config check says so
    old_scaling = {k: v for k, v in cfg["rope_scaling"].items() if k != "attention_factor"}
    old_scaling["mscale_all_dim"] = old_scaling["mscale"]
    for change, key in (
        ({"rope_scaling": old_scaling, "rope_parameters": None}, "RoPE computed"),
        ({"norm_topk_prob": not renormalize}, "norm_topk_prob"),
    ):
        problems = check_hf_config(plan, {**cfg, **change})
        assert len(problems) == 1 and key in problems[0], (change, problems)
        shutil.rmtree(tmp_path / "changed", ignore_errors=True)
        other = _hf_logits(out, tokens, tmp_path, **change)
        assert (other - want).abs().max() > 100 * atol, change


def test_released_deepseek_v3_convention_is_unchanged():
    """mscale = mscale_all_dim (V3, V2-Lite): no attention_factor, cos/sin unscaled."""
    raw = plan_dict("yarn")
    raw["model"]["rope"].update(mscale=0.707, mscale_all_dim=0.707)
    cfg = hf_config_from_plan(parse_plan(raw))
    assert "attention_factor" not in cfg["rope_scaling"] and cfg["norm_topk_prob"] is True
    # a plan without mscale_all_dim (plan v1) means the same: one factor for both
    del raw["model"]["rope"]["mscale_all_dim"]
    assert hf_config_from_plan(parse_plan(raw))["rope_scaling"] == cfg["rope_scaling"]


def test_check_lists_format_problems_and_every_mismatch_together():
    """A plan the format cannot express (softmax routing) and a config that differs in two
    values and a wrong-typed third: all of it in one list, not one per run."""
    from dsvc.runtime.hf import check_hf_config, hf_config_from_plan
    from dsvc.runtime.plan import parse_plan
    from dsvc.runtime.tiny import tiny_plan

    sigmoid = parse_plan(tiny_plan(pp=1, dp=1, ep=1, precision="fp32"))
    cfg = {k: v for k, v in hf_config_from_plan(sigmoid, "float32").items() if k != "dsvc"}
    cfg.update(vocab_size=512, n_group=2, rms_norm_eps="small")
    raw = tiny_plan(pp=1, dp=1, ep=1, precision="fp32")
    raw["model"]["ffn"]["moe"]["score"] = "softmax"
    softmax = parse_plan(raw)
    problems = check_hf_config(softmax, cfg, source="c.json")
    text = "\n".join(problems)
    assert "c.json: routing score softmax: DeepseekV3 routes with sigmoid scores" in text
    assert "c.json: vocab_size is 512 in the checkpoint, 256 in the plan" in text
    assert "c.json: n_group is 2 in the checkpoint, 4 in the plan" in text
    assert 'c.json: rms_norm_eps: must be a number, got "small" (a string)' in text
    # and what softmax routing changes: its gates are not renormalised by default
    assert "c.json: norm_topk_prob is True in the checkpoint, False in the plan" in text
    assert len(problems) == 5
