"""Plan keys beyond DeepSeek-V3's shape: `renormalize`, `qkv_bias`, `mscale_all_dim`, linear `pad`.

Each key is read from plan.json, honoured by the runtime layer that owns it, and
written by the compiler (DeepSeek-V2-Lite: softmax gates not renormalised, YaRN
mscale 0.707 / 0.707, dense K 10944 padded; LLaMA-3 8B / a Qwen2-style variant:
GQA with and without q/k/v biases). Plans that omit a key keep the old behaviour.
Logits against transformers (Qwen2, DeepSeek-V2) are in test_plan_fields_hf.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from dsvc import dsl
from dsvc.compiler.driver import build_plan
from dsvc.runtime import fp8_torch
from dsvc.runtime.attention import GQA, MLA
from dsvc.runtime.fp8 import fp8_grouped_swiglu_ffn, fp8_linear
from dsvc.runtime.fp8_triton import PROTOCOL
from dsvc.runtime.layers import Linear, RotaryEmbedding, rope_frequencies, yarn_mscale
from dsvc.runtime.model import build_full_model
from dsvc.runtime.moe import RoutedExperts, Router
from dsvc.runtime.plan import Ffn, LinearFormat, PlanError, parse_plan
from dsvc.runtime.tiny import tiny_plan
from tests.conftest import EXAMPLES, ROOT
from tests.tolerances import tol

# -- plans --------------------------------------------------------------------------------


def _v2_lite_shaped(renormalize=None) -> dict:
    """The tiny plan with DeepSeek-V2-Lite's routing: softmax scores, no groups, route_scale 1."""
    raw = tiny_plan(pp=1, dp=1, ep=1, precision="fp32", num_layers=2, mtp_depth=0)
    moe = raw["model"]["ffn"]["moe"]
    moe.update(score="softmax", groups=1, top_groups=1, route_scale=1.0, bias_update_rate=0.0)
    if renormalize is not None:
        moe["renormalize"] = renormalize
    raw["experts"]["moe"]["group_of_expert"] = [0] * moe["routed"]
    return raw


def _gqa_plan(qkv_bias: bool | None, precision: str = "fp32") -> dict:
    """The tiny plan turned into a dense GQA model (4 heads over 2 kv heads, head_dim 16)."""
    raw = tiny_plan(pp=1, dp=1, ep=1, precision=precision, num_layers=2, mtp_depth=0)
    gqa = {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 16}
    if qkv_bias is not None:
        gqa["qkv_bias"] = qkv_bias
    raw["model"]["attention"] = {"gqa": gqa}
    raw["model"]["layers"] = [{"attention": "gqa", "ffn": "dense"}] * 2
    raw["experts"] = {}
    return raw


def _yarn_plan(max_seq_len: int, **rope) -> dict:
    raw = tiny_plan(pp=1, dp=1, ep=1, precision="fp32", num_layers=2, mtp_depth=0)
    raw["model"]["max_seq_len"] = max_seq_len
    raw["model"]["rope"].update(rope)  # yarn, factor 40, original 4096 (DeepSeek-V3's)
    return raw


# -- renormalize ---------------------------------------------------------------------------


def _gates(ffn: Ffn, seed: int = 0):
    torch.manual_seed(seed)
    router = Router(64, ffn, torch.float32)
    torch.nn.init.normal_(router.weight, std=0.3)
    return router(torch.randn(200, 64))


def test_v2_lite_gates_sum_to_the_top_k_probabilities_not_one():
    plan = parse_plan(_v2_lite_shaped(renormalize=False))
    ffn = plan.model.ffn["moe"]
    assert ffn.renormalize is False and ffn.score == "softmax"
    w, idx, scores = _gates(ffn)
    torch.testing.assert_close(scores.sum(-1), torch.ones(200))
    top_k_mass = scores.gather(1, idx).sum(-1)
    torch.testing.assert_close(w, scores.gather(1, idx) * ffn.route_scale)
    torch.testing.assert_close(w.sum(-1), top_k_mass)
    assert (w.sum(-1) < 1).all()  # 2 of 8 softmax probabilities: well below one
    # the same plan with renormalize = true: the gates of every token sum to route_scale
    renorm = parse_plan(_v2_lite_shaped(renormalize=True)).model.ffn["moe"]
    w2, idx2, _ = _gates(renorm)
    assert torch.equal(idx2, idx)
    torch.testing.assert_close(w2.sum(-1), torch.full((200,), renorm.route_scale))
    torch.testing.assert_close(w2, w / top_k_mass.unsqueeze(-1))


def test_route_scale_multiplies_raw_softmax_gates():
    raw = _v2_lite_shaped(renormalize=False)
    raw["model"]["ffn"]["moe"]["route_scale"] = 16.0  # DeepSeek-V2's routed_scaling_factor
    ffn = parse_plan(raw).model.ffn["moe"]
    w, idx, scores = _gates(ffn)
    torch.testing.assert_close(w, scores.gather(1, idx) * 16.0)


def test_renormalize_absent_keeps_the_v1_rule():
    softmax = parse_plan(_v2_lite_shaped()).model.ffn["moe"]
    sigmoid = parse_plan(tiny_plan(pp=1, dp=1, ep=1)).model.ffn["moe"]
    assert softmax.renormalize is None and sigmoid.renormalize is None
    assert softmax.effective_renormalize is False and sigmoid.effective_renormalize is True
    # the rule follows the score (a replaced score is not stuck with the old answer)
    assert dataclasses.replace(sigmoid, score="softmax").effective_renormalize is False
    w, idx, scores = _gates(sigmoid)
    chosen = scores.gather(1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True) * sigmoid.route_scale)
    bad = _v2_lite_shaped()
    bad["model"]["ffn"]["moe"]["renormalize"] = "no"
    with pytest.raises(PlanError, match=r"model\.ffn\.moe\.renormalize: expected true or false"):
        parse_plan(bad)


# -- qkv_bias --------------------------------------------------------------------------------


def _gqa(raw: dict, seed: int = 0) -> GQA:
    plan = parse_plan(raw)
    torch.manual_seed(seed)
    mod = GQA(plan.model, plan.model.attention["gqa"], plan.precision)
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return mod


def _gqa_reference(mod: GQA, x):
    """q/k/v = x W^T + b, rotate-half RoPE, causal softmax attention written out."""
    sp = mod.spec
    b, s, _ = x.shape

    def proj(lin, heads):
        return F.linear(x, lin.weight, lin.bias).view(b, s, heads, sp.head_dim)

    q, k = mod.rotary(proj(mod.q_proj, sp.heads)), mod.rotary(proj(mod.k_proj, sp.kv_heads))
    v = proj(mod.v_proj, sp.kv_heads)
    rep = sp.heads // sp.kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bshd,bthd->bsht", q, k) * sp.head_dim**-0.5
    scores = scores + torch.full((s, s), float("-inf")).triu(1).unsqueeze(1)
    out = torch.einsum("bsht,bthd->bshd", scores.softmax(-1), v)
    return F.linear(out.flatten(2), mod.o_proj.weight)


def test_gqa_qkv_bias_parameters_and_output():
    mod = _gqa(_gqa_plan(qkv_bias=True))
    names = {n for n, _ in mod.named_parameters()}
    assert {"q_proj.bias", "k_proj.bias", "v_proj.bias"} <= names
    assert "o_proj.bias" not in names
    assert mod.k_proj.bias.shape == (2 * 16,)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        y = mod(x)
        rtol, atol = tol("runtime_layer")
        torch.testing.assert_close(y, _gqa_reference(mod, x), rtol=rtol, atol=atol)
        for name in ("q_proj", "k_proj", "v_proj"):  # each bias on its own changes the output
            lin = getattr(mod, name)
            saved = lin.bias.clone()
            lin.bias.zero_()
            assert not torch.allclose(mod(x), y)
            lin.bias.copy_(saved)


def test_gqa_without_qkv_bias_has_no_biases():
    for raw in (_gqa_plan(qkv_bias=None), _gqa_plan(qkv_bias=False)):
        names = {n for n, _ in build_full_model(parse_plan(raw)).named_parameters()}
        assert not any(n.endswith(".bias") for n in names)
    full = {n for n, _ in build_full_model(parse_plan(_gqa_plan(True))).named_parameters()}
    expected = {f"layers.{i}.self_attn.{p}_proj.bias" for i in (0, 1) for p in ("q", "k", "v")}
    assert {n for n in full if n.endswith(".bias")} == expected


def test_fp8_linear_bias_trains():
    mod = _gqa(_gqa_plan(qkv_bias=True, precision="fp8"))
    assert mod.q_proj.fmt.format == "fp8_e4m3"
    y = mod(torch.randn(2, 8, 64))
    dy = torch.randn_like(y)
    y.backward(dy)
    for name in ("q_proj", "k_proj", "v_proj"):
        g = getattr(mod, name).bias.grad
        assert g is not None and g.abs().sum() > 0


def test_qkv_bias_only_for_gqa():
    raw = tiny_plan(pp=1, dp=1, ep=1)
    raw["model"]["attention"]["mla"]["qkv_bias"] = True
    with pytest.raises(PlanError, match=r"model\.attention\.mla\.qkv_bias: unknown key"):
        parse_plan(raw)


# -- mscale_all_dim ----------------------------------------------------------------------------


def _m(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0  # DeepSeek's yarn_get_mscale for factor > 1


def test_softmax_scale_uses_mscale_all_dim_when_yarn_applies():
    plan = parse_plan(_yarn_plan(8192, mscale=1.0, mscale_all_dim=0.707))
    assert plan.model.rope.mscale_all_dim == 0.707
    mla = MLA(plan.model, plan.model.attention["mla"], plan.precision)
    qk_dim = 16 + 8
    assert mla.softmax_scale == pytest.approx(qk_dim**-0.5 * _m(40.0, 0.707) ** 2)
    gqa_raw = _gqa_plan(None)
    gqa_raw["model"]["max_seq_len"] = 8192
    gqa_raw["model"]["rope"].update(mscale=1.0, mscale_all_dim=0.707)
    gqa_plan = parse_plan(gqa_raw)
    gqa = GQA(gqa_plan.model, gqa_plan.model.attention["gqa"], gqa_plan.precision)
    assert gqa.softmax_scale == pytest.approx(16**-0.5 * _m(40.0, 0.707) ** 2)
    # cos/sin carry m(mscale) / m(mscale_all_dim), as DeepSeek-V2's rotary embedding
    angles = rope_frequencies(plan.model.rope, 8, 8192)
    ratio = _m(40.0, 1.0) / _m(40.0, 0.707)
    torch.testing.assert_close(mla.rotary.cos_SR2, angles.cos() * ratio)
    torch.testing.assert_close(mla.rotary.sin_SR2, angles.sin() * ratio)


def test_equal_mscales_scale_softmax_only():
    """DeepSeek-V2-Lite's mscale = mscale_all_dim = 0.707: the softmax scale carries
    m(0.707)^2 and cos/sin are the plain YaRN tables, bit for bit. (Held against
    transformers' own model outputs in test_hf.py, case `yarn_v2`.)"""
    plan = parse_plan(_yarn_plan(8192, mscale=0.707, mscale_all_dim=0.707))
    mla = MLA(plan.model, plan.model.attention["mla"], plan.precision)
    assert mla.softmax_scale == pytest.approx(24**-0.5 * _m(40.0, 0.707) ** 2)
    assert yarn_mscale(40.0, 0.707) == pytest.approx(_m(40.0, 0.707))
    angles = rope_frequencies(plan.model.rope, 8, 8192)
    assert torch.equal(mla.rotary.cos_SR2, angles.cos())


def test_no_yarn_correction_within_the_original_context():
    plan = parse_plan(_yarn_plan(64, mscale=1.0, mscale_all_dim=0.707))  # 64 <= 4096
    mla = MLA(plan.model, plan.model.attention["mla"], plan.precision)
    assert mla.softmax_scale == pytest.approx(24**-0.5)
    assert torch.equal(mla.rotary.cos_SR2, rope_frequencies(plan.model.rope, 8, 64).cos())


def test_mscale_all_dim_absent_means_mscale():
    plan = parse_plan(_yarn_plan(8192, mscale=0.5))  # a plan v1 wrote: no mscale_all_dim
    assert plan.model.rope.mscale_all_dim is None
    assert plan.model.rope.effective_mscale_all_dim == 0.5
    mla = MLA(plan.model, plan.model.attention["mla"], plan.precision)
    assert mla.softmax_scale == pytest.approx(24**-0.5 * _m(40.0, 0.5) ** 2)
    rot = RotaryEmbedding(plan.model.rope, 8, 8192, interleaved=True)
    assert torch.equal(rot.cos_SR2, rope_frequencies(plan.model.rope, 8, 8192).cos())


# -- pad --------------------------------------------------------------------------------------


def _recording_backend() -> types.ModuleType:
    """The torch reference that records the contraction length of every GEMM it runs."""
    mod = types.ModuleType("recording_fp8")
    mod.ks = []
    for name in PROTOCOL:
        setattr(mod, name, getattr(fp8_torch, name))

    def gemm(a, *args, **kw):
        mod.ks.append(a.shape[-1])
        return fp8_torch.gemm(a, *args, **kw)

    def grouped_gemm(a, *args, **kw):
        mod.ks.append(a.shape[-1])
        return fp8_torch.grouped_gemm(a, *args, **kw)

    mod.gemm, mod.grouped_gemm = gemm, grouped_gemm
    return mod


def test_fp8_linear_with_pad_equals_the_padded_reference():
    be = _recording_backend()
    torch.manual_seed(0)
    lin = Linear(200, 128, LinearFormat("fp8_e4m3", pad=True), torch.float32, backend=be)
    torch.nn.init.normal_(lin.weight, std=0.1)
    x = torch.randn(2, 64, 200, requires_grad=True)  # 128 tokens: dgrad and wgrad whole tiles
    y = lin(x)
    assert be.ks == [256]  # the kernel saw K padded to two whole tiles
    xp = F.pad(x.detach(), (0, 56)).requires_grad_()
    wp = F.pad(lin.weight.detach(), (0, 56)).requires_grad_()
    ref = fp8_linear(xp, wp, backend="torch")
    assert torch.equal(y, ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy)
    assert x.grad.shape == (2, 64, 200) and lin.weight.grad.shape == (128, 200)
    assert torch.equal(x.grad, xp.grad[..., :200])
    assert torch.equal(lin.weight.grad, wp.grad[:, :200])
    # without pad the kernel is handed the ragged K; the emulation still agrees in value
    be.ks.clear()
    plain = Linear(200, 128, LinearFormat("fp8_e4m3"), torch.float32, backend=be)
    plain.weight.data.copy_(lin.weight.data)
    with torch.no_grad():
        y_plain = plain(x)
    assert be.ks == [200]
    rtol, atol = tol("fp8_linear_vs_dequant_ref")
    torch.testing.assert_close(y_plain, y.detach(), rtol=rtol, atol=atol)


def test_routed_experts_pad_both_ks():
    raw = tiny_plan(pp=1, dp=1, ep=1, precision="fp8")
    raw["precision"]["linear"]["pad"] = True
    plan = parse_plan(raw)
    ffn = dataclasses.replace(plan.model.ffn["moe"], intermediate=72)  # ragged I; D = 200
    experts = RoutedExperts(200, ffn, [0, 1, 2], plan.precision)
    assert experts.fmt.pad
    be = _recording_backend()
    experts.backend = be
    torch.manual_seed(0)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(40, 200)
    counts = torch.tensor([15, 0, 25])
    with torch.no_grad():
        y = experts(x, counts)
        assert be.ks == [256, 256, 128]  # gate, up over D; down over I: whole tiles
        w1, w3 = (F.pad(w, (0, 56, 0, 56)) for w in (experts.gate_proj, experts.up_proj))
        w2 = F.pad(experts.down_proj, (0, 56))
        ref = fp8_grouped_swiglu_ffn(F.pad(x, (0, 56)), w1, w3, w2, torch.cumsum(counts, 0))
    assert y.shape == (40, 200)
    assert torch.equal(y, ref.to(y.dtype))


def test_pad_absent_is_false_and_typed():
    raw = tiny_plan(pp=1, dp=1, ep=1, precision="fp8")
    assert parse_plan(raw).precision.linear.pad is False
    raw["precision"]["linear"]["pad"] = 1
    with pytest.raises(PlanError, match=r"precision\.linear\.pad: expected true or false"):
        parse_plan(raw)


# -- the compiler writes them ------------------------------------------------------------------

_NEW_KEYS = ("renormalize", "qkv_bias", "mscale_all_dim", "pad")


def _compiled(spec) -> tuple[dict, object]:
    raw = json.loads(json.dumps(build_plan(spec)))
    notes = " ".join(raw.get("comment", []))
    assert not any(k in notes for k in _NEW_KEYS), notes
    return raw, parse_plan(raw, source="compiled")


def test_compiled_v2_lite_carries_its_routing_rope_and_padding():
    raw, plan = _compiled(dsl.load(EXAMPLES / "deepseek_v2_lite.dsv"))
    assert raw["model"]["ffn"]["moe"]["renormalize"] is False
    moe = plan.model.ffn["moe"]
    assert (moe.score, moe.renormalize) == ("softmax", False)
    assert (plan.model.rope.mscale, plan.model.rope.mscale_all_dim) == (0.707, 0.707)
    assert raw["precision"]["linear"]["pad"] is True
    assert plan.precision.linear_for("down_proj").pad
    assert plan.model.ffn["dense"].intermediate % plan.precision.linear.act_tile  # 10944: ragged


def test_compiled_llama_and_a_qwen_style_variant_carry_qkv_bias():
    text = (EXAMPLES / "llama3_8b.dsv").read_text()
    raw, plan = _compiled(dsl.load(EXAMPLES / "llama3_8b.dsv"))
    assert raw["model"]["attention"]["gqa"]["qkv_bias"] is False
    assert raw["precision"]["linear"]["pad"] is False
    assert raw["model"]["rope"]["mscale_all_dim"] == raw["model"]["rope"]["mscale"]
    old = "attention gqa { heads = 32, kv_heads = 8 }"
    assert old in text
    biased = text.replace(old, "attention gqa { heads = 32, kv_heads = 8, qkv_bias = true }")
    raw, plan = _compiled(dsl.loads(biased, filename=str(EXAMPLES / "llama3_8b_qkv_bias.dsv")))
    assert raw["model"]["attention"]["gqa"]["qkv_bias"] is True
    assert plan.model.attention["gqa"].qkv_bias


def test_the_new_keys_are_documented():
    doc = (ROOT / "docs" / "plan.md").read_text()
    assert all(f"`{k}`" in doc for k in _NEW_KEYS)
