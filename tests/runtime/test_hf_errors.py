"""runtime/hf.py: bad checkpoints, bad exports and the config.json mapping.

Every bad checkpoint is refused with all of its problems listed together, each
naming the tensor and its file, and leaves the model untouched; the config
check compares what transformers would compute (YaRN included) with the plan.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file

from dsvc.runtime.hf import (
    HFCheckpointError,
    HFFormatError,
    check_hf_config,
    export_hf_checkpoint,
    hf_config_from_plan,
    load_hf_checkpoint,
)
from dsvc.runtime.init import init_parameters
from dsvc.runtime.model import build_full_model
from dsvc.runtime.plan import parse_plan
from dsvc.runtime.tiny import tiny_plan
from tests.runtime._hf_case import get_case

# deepseek-ai/DeepSeek-V3 config.json (the released model), the keys that describe the network
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "num_nextn_predict_layers": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16",
}  # fmt: skip


def v3_plan(max_seq_len: int):
    """DeepSeek-V3's shape as a plan (parsed only: never built)."""
    raw = tiny_plan(pp=1, dp=1, ep=1, num_layers=61)
    m = raw["model"]
    m.update(vocab=129280, hidden=7168, max_seq_len=max_seq_len)
    m["rope"].update(factor=40.0, original_max_seq=4096)
    m["attention"]["mla"].update(
        heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_dim=128
    )
    m["ffn"]["dense"]["intermediate"] = 18432
    m["ffn"]["moe"].update(
        routed=256, top_k=8, intermediate=2048, shared_intermediate=2048, groups=8, top_groups=4
    )
    m["layers"] = [{"attention": "mla", "ffn": "dense" if i < 3 else "moe"} for i in range(61)]
    raw["experts"]["moe"] = {
        "per_rank": [list(range(256))],
        "group_of_expert": [e // 32 for e in range(256)],
    }
    return parse_plan(raw)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return get_case(tmp_path_factory, "yarn")


def _rewrite(path, edit) -> None:
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def _refused(case, path, *needles, **kw) -> HFCheckpointError:
    """Loading `path` fails naming every needle, and changes no parameter."""
    rt = build_full_model(case.plan)
    init_parameters(rt, 0, 0.02)
    before = {k: v.clone() for k, v in rt.state_dict().items()}
    with pytest.raises(HFCheckpointError) as info:
        load_hf_checkpoint(path, rt, case.plan, **kw)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    after = rt.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return info.value


# -- bad checkpoints --------------------------------------------------------------------------


def test_missing_and_wrong_shape_are_listed_together(case, tmp_path):
    path = case.copy(tmp_path / "bad")

    def edit(w):
        del w["model.layers.1.mlp.gate.weight"], w["model.layers.2.mlp.experts.5.up_proj.weight"]
        w["model.layers.0.self_attn.q_a_proj.weight"] = torch.zeros(31, 64)

    _rewrite(path, edit)
    err = _refused(
        case,
        path,
        "missing",
        "model.layers.1.mlp.gate.weight",
        "model.layers.2.mlp.experts.5.up_proj.weight",
        "model.layers.0.self_attn.q_a_proj.weight in model.safetensors: shape [31, 64], the plan needs [32, 64]",
    )
    assert len(err.problems) == 3


def test_unexpected_tensor_is_an_error_unless_not_strict(case, tmp_path):
    path = case.copy(tmp_path / "extra")
    _rewrite(path, lambda w: w.update({"model.layers.1.mlp.foo.weight": torch.zeros(2)}))
    _refused(case, path, "unexpected", "model.layers.1.mlp.foo.weight (in model.safetensors)")
    with pytest.warns(UserWarning, match="model.layers.1.mlp.foo.weight"):
        _, report = case.load(path, strict=False)
    assert "model.layers.1.mlp.foo.weight" not in report.loaded


def test_sharded_checkpoint_problems_name_the_shard(case, tmp_path):
    rt, _ = case.load()
    out = export_hf_checkpoint(
        rt, case.plan, tmp_path / "sharded", dtype="fp32", max_shard_bytes=64 * 1024
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    shard = out / index["weight_map"][name]
    weights = load_file(shard)
    weights[name] = torch.zeros(3, 3)
    save_file(weights, shard, metadata={"format": "pt"})
    _refused(case, out, f"{name} in {shard.name}: shape [3, 3]")
    shard.unlink()
    _refused(case, out, f"{shard.name}: listed in model.safetensors.index.json but missing")


def test_fp8_weight_without_scale_is_refused(case, tmp_path):
    path = case.copy(tmp_path / "noscale")
    name = "model.layers.1.self_attn.o_proj.weight"
    _rewrite(path, lambda w: w.update({name: w[name].to(torch.float8_e4m3fn)}))
    _refused(case, path, f"{name} in model.safetensors: F8_E4M3 without a 2-D {name}_scale_inv")


def test_config_mismatch_is_refused(case, tmp_path):
    path = case.copy(tmp_path / "cfg")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(n_group=2, routed_scaling_factor=1.0)
    (path / "config.json").write_text(json.dumps(cfg))
    err = _refused(
        case, path, "n_group is 2 in the checkpoint, 4 in the plan", "routed_scaling_factor"
    )
    assert len(err.problems) == 2
    with pytest.warns(UserWarning) as caught:
        case.load(path, strict=False)
    assert sorted(str(w.message).split(": ")[1].split()[0] for w in caught) == [
        "n_group",
        "routed_scaling_factor",
    ]
    case.load(path, check_config=False)


def test_not_a_checkpoint(case, tmp_path):
    _refused(case, tmp_path / "nowhere", "no such file or directory")
    _refused(case, tmp_path, "no model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    _refused(case, tmp_path, "model.safetensors: not a readable safetensors file")


# -- bad exports ------------------------------------------------------------------------------


def test_export_refuses_an_existing_directory_and_replaces_it_when_asked(case, tmp_path):
    rt, _ = case.load()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HFCheckpointError, match="exists"):
        export_hf_checkpoint(rt, case.plan, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    export_hf_checkpoint(rt, case.plan, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_refuses_what_deepseek_v3_cannot_express(tmp_path):
    raw = tiny_plan(pp=1, dp=1, ep=1)
    raw["model"]["ffn"]["moe"].update(score="softmax", shared_intermediate=48)
    raw["model"]["layers"][2]["ffn"] = "dense"
    plan = parse_plan(raw)
    with pytest.raises(HFFormatError) as info:
        export_hf_checkpoint(build_full_model(plan), plan, tmp_path / "out")
    text = str(info.value)
    assert "sigmoid" in text and "dense FFN layers first" in text and "n_shared_experts" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# -- config.json ------------------------------------------------------------------------------


def test_config_round_trip(case):
    assert check_hf_config(case.plan, hf_config_from_plan(case.plan)) == []
    cfg = json.loads((case.dir / "config.json").read_text())  # as transformers saved it
    assert check_hf_config(case.plan, cfg) == []


def test_deepseek_v3_config_matches_a_v3_plan_only_where_yarn_applies():
    cfg = hf_config_from_plan(v3_plan(163840))
    for key in (
        "first_k_dense_replace",
        "n_group",
        "topk_group",
        "q_lora_rank",
        "moe_intermediate_size",
    ):
        assert cfg[key] == DEEPSEEK_V3_CONFIG[key], key
    assert cfg["rope_scaling"]["factor"] == 40 and cfg["rope_scaling"]["mscale_all_dim"] == 1.0
    assert check_hf_config(v3_plan(163840), DEEPSEEK_V3_CONFIG) == []
    # pre-training at 4K: the runtime computes plain RoPE there, the released model YaRN
    problems = check_hf_config(v3_plan(4096), DEEPSEEK_V3_CONFIG)
    assert len(problems) == 1 and "applies YaRN only when max_seq_len 4096 exceeds" in problems[0]
    assert hf_config_from_plan(v3_plan(4096))["rope_parameters"] == {
        "rope_type": "default",
        "rope_theta": 10000.0,
    }


def test_config_check_catches_rope_and_routing_semantics():
    plan = v3_plan(163840)
    for change, needle in (
        (
            {"rope_scaling": {**DEEPSEEK_V3_CONFIG["rope_scaling"], "mscale": 0.707}},
            "cos_sin_scale",
        ),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"n_group": None}, "n_group"),
    ):
        cfg = {**DEEPSEEK_V3_CONFIG, **change}
        problems = check_hf_config(plan, cfg)
        assert len(problems) == 1 and needle in problems[0], (change, problems)
    cfg = {
        k: v for k, v in DEEPSEEK_V3_CONFIG.items() if k != "topk_group"
    }  # transformers' default 4
    assert check_hf_config(plan, cfg) == []
