"""runtime/init.py: what each kind of parameter starts at."""

from __future__ import annotations

import torch

from dsvc.runtime.init import _normal, init_parameters
from dsvc.runtime.model import build_full_model
from dsvc.runtime.plan import parse_plan
from dsvc.runtime.tiny import tiny_plan


def _qwen2_like_model():
    """Two GQA layers with q/k/v biases (Qwen2's attention) in front of the tiny MoE stack."""
    raw = tiny_plan(pp=1, dp=1, ep=1, num_layers=2, mtp_depth=0)
    raw["model"]["attention"] = {
        "gqa": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 16, "qkv_bias": True}
    }
    raw["model"]["layers"] = [{"attention": "gqa", "ffn": f} for f in ("dense", "moe")]
    return build_full_model(parse_plan(raw))


def test_biases_start_at_zero_norms_at_one_and_weights_at_std():
    model = _qwen2_like_model()
    for p in model.parameters():
        torch.nn.init.constant_(p, 7.0)  # whatever init_parameters does not set stays 7
    init_parameters(model, 0, 0.02)
    params = dict(model.named_parameters())
    biases = sorted(n for n in params if n.endswith(".bias"))
    assert biases == [f"layers.{i}.self_attn.{p}_proj.bias" for i in (0, 1) for p in "kqv"]
    for name in biases:
        assert params[name].dim() == 1 and not params[name].any(), name
    for name, p in params.items():
        if name.endswith("norm.weight"):
            assert (p == 1).all(), name
        elif ".experts." in name:  # (E, ...) stacks, one generator per expert: drawn, not 7
            assert p.any() and not (p == 7).any(), name
        elif name not in biases:  # N(0, std) from the generator of the parameter's name
            assert torch.equal(p, _normal(p.shape, 0.02, 0, name)), name
    # the router's correction bias is a buffer (balancing state), not a parameter: zero too
    assert not model.layers["1"].mlp.gate.e_score_correction_bias.any()


def test_zero_biases_leave_the_weights_drawn_as_before():
    """Weights come from per-name generators, so zeroing biases changes no other number."""
    with_bias = _qwen2_like_model()
    init_parameters(with_bias, 3, 0.02)
    raw = tiny_plan(pp=1, dp=1, ep=1, num_layers=2, mtp_depth=0)
    raw["model"]["attention"] = {"gqa": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 16}}
    raw["model"]["layers"] = [{"attention": "gqa", "ffn": f} for f in ("dense", "moe")]
    without = build_full_model(parse_plan(raw))
    init_parameters(without, 3, 0.02)
    a = dict(with_bias.named_parameters())
    for name, p in without.named_parameters():
        assert torch.equal(p, a[name]), name
