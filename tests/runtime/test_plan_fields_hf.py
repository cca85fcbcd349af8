"""The plan keys beyond DeepSeek-V3 against transformers: logits of tiny Qwen2 and DeepSeek-V2 models.

Qwen2 exercises `qkv_bias` (q/k/v biases, rotate-half RoPE, GQA); DeepSeek-V2
exercises `renormalize = false` (softmax gates times route_scale, not
renormalised; V2-Lite's routing) and YaRN with `mscale` != `mscale_all_dim`
(softmax scale from mscale_all_dim, cos/sin times their ratio). Both are built
by transformers with random fp32 weights, copied by name into the runtime's
`build_full_model`, and compared logit for logit (tolerance `hf_logits`).
"""

from __future__ import annotations

import copy

import pytest
import torch

from dsvc.runtime.model import build_full_model
from dsvc.runtime.plan import parse_plan
from dsvc.runtime.tiny import tiny_plan
from tests.runtime._hf_case import _randomize_
from tests.tolerances import tol

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, SEQ = 256, 64, 40


def _plan(attention: dict, ffns: dict, layers: list[str], rope: dict) -> dict:
    raw = tiny_plan(pp=1, dp=1, ep=1, precision="fp32", num_layers=len(layers), mtp_depth=0)
    m = raw["model"]
    m.update(rope=rope, attention={"attn": attention}, ffn=ffns)
    m["layers"] = [{"attention": "attn", "ffn": f} for f in layers]
    if "moe" not in ffns:
        raw["experts"] = {}
    return raw


def _runtime_logits(raw: dict, hf_state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The runtime model of plan `raw` with transformers' weights, renamed, -> logits."""
    rt = build_full_model(parse_plan(raw))
    state = {}
    for name, t in hf_state.items():
        name = name.removeprefix("model.")
        if name.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, D), gate rows first
            gate, up = t.chunk(2, dim=1)
            state[name.replace("gate_up_proj", "gate_proj")] = gate
            state[name.replace("gate_up_proj", "up_proj")] = up
        else:
            state[name] = t
    missing, unexpected = rt.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("e_score_correction_bias") for k in missing), missing  # stays zero
    with torch.no_grad():
        h = rt.embed(tokens)
        for layer in rt.layers.values():
            h = layer(h)
        return rt.logits(rt.norm(h))


def _compare(hf_model, raw: dict) -> float:
    _randomize_(hf_model, 1, 0.1)
    hf_model.eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf_model(tokens).logits
    got = _runtime_logits(raw, hf_model.state_dict(), tokens)
    rtol, atol = tol("hf_logits")
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return float(want.abs().max())


def test_qwen2_with_qkv_bias_matches_transformers():
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    hf = transformers.Qwen2ForCausalLM(cfg)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    raw = _plan(
        {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 16, "qkv_bias": True},
        {"dense": {"kind": "dense", "intermediate": 128}},
        ["dense", "dense"],
        {"kind": "plain", "theta": 10000.0},
    )
    assert _compare(hf, raw) > 0.5  # logits far from zero: the comparison means something


def test_deepseek_v2_softmax_routing_and_yarn_mscale_match_transformers():
    rope = {"factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
            "mscale_all_dim": 0.707}  # fmt: skip
    cfg = transformers.DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=32, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=2.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                         "original_max_position_embeddings": 16, **rope},
    )  # fmt: skip
    hf = transformers.DeepseekV2ForCausalLM(cfg)
    moe = {"kind": "moe", "routed": 8, "shared": 1, "top_k": 2, "intermediate": 32,
           "shared_intermediate": 32, "score": "softmax", "groups": 1, "top_groups": 1,
           "route_scale": 2.0, "renormalize": False}  # fmt: skip
    raw = _plan(
        {"kind": "mla", "heads": 4, "q_lora_rank": 0, "kv_lora_rank": 32, "qk_nope_dim": 16,
         "qk_rope_dim": 8, "v_dim": 16},
        {"dense": {"kind": "dense", "intermediate": 128}, "moe": moe},
        ["dense", "moe"],
        {"kind": "yarn", "theta": 10000.0, "original_max_seq": 16, **rope},  # 64 > 16: active
    )  # fmt: skip
    raw["experts"]["moe"]["group_of_expert"] = [0] * 8
    assert _compare(hf, raw) > 0.5
    # each key matters: with the gates renormalised, or without mscale_all_dim (a v1 plan:
    # softmax scale from mscale, cos/sin unscaled), the same weights give other logits
    renormalised = copy.deepcopy(raw)
    renormalised["model"]["ffn"]["moe"]["renormalize"] = True
    v1_rope = copy.deepcopy(raw)
    del v1_rope["model"]["rope"]["mscale_all_dim"]
    for other in (renormalised, v1_rope):
        with pytest.raises(AssertionError):
            _compare(hf, other)
