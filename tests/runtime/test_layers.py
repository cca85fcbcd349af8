"""Layers on one process: RMSNorm, RoPE/YaRN, MLA and GQA against plain formulas."""

from __future__ import annotations

import math

import pytest
import torch

from dsvc.runtime.attention import GQA, MLA
from dsvc.runtime.layers import RMSNorm, RotaryEmbedding, rope_frequencies, yarn_softmax_mscale
from dsvc.runtime.plan import Attention, parse_plan
from dsvc.runtime.tiny import tiny_plan
from tests.tolerances import tol

V3_ROPE = {
    "kind": "yarn", "theta": 10000.0, "factor": 40.0, "original_max_seq": 4096,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
}  # fmt: skip


def _plan(**model_edits):
    raw = tiny_plan()
    raw["model"].update(model_edits)
    return parse_plan(raw)


def test_rmsnorm_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-6, torch.float32, torch.float32)
    norm.weight.data = torch.rand(16)
    x = torch.randn(3, 5, 16)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    rtol, atol = tol("runtime_layer")
    torch.testing.assert_close(norm(x), want, rtol=rtol, atol=atol)


def test_yarn_matches_deepseek_v3_figures():
    from dsvc.runtime.plan import Rope

    rope = Rope(**V3_ROPE)
    base = rope_frequencies(Rope(kind="plain", theta=10000.0), 64, 8)[
        1
    ]  # position 1: the frequencies
    long = rope_frequencies(rope, 64, 163840)[1]
    # V3: correction range low 10, high 23 of the 32 frequency pairs; the ramp blends between
    torch.testing.assert_close(long[:11], base[:11])
    torch.testing.assert_close(long[23:], base[23:] / 40.0)
    assert ((long[11:23] < base[11:23]) & (long[11:23] > base[11:23] / 40.0)).all()
    assert yarn_softmax_mscale(rope, 163840) == pytest.approx(0.1 * math.log(40.0) + 1.0)
    # within the original context YaRN does nothing (as the reference model)
    torch.testing.assert_close(
        rope_frequencies(rope, 64, 4096),
        rope_frequencies(Rope(kind="plain", theta=10000.0), 64, 4096),
    )
    assert yarn_softmax_mscale(rope, 4096) == 1.0


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_depends_on_relative_position_only(interleaved):
    from dsvc.runtime.plan import Rope

    rot = RotaryEmbedding(Rope(**V3_ROPE), 8, 64, interleaved)
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)

    def at(v, pos):
        x = torch.zeros(1, 64, 1, 8)
        x[0, pos, 0] = v
        return rot(x)[0, pos, 0]

    d1 = torch.dot(at(q, 10), at(k, 3))
    d2 = torch.dot(at(q, 40), at(k, 33))
    assert d1 == pytest.approx(float(d2), rel=1e-5)
    assert at(q, 17).norm() == pytest.approx(float(q.norm()), rel=1e-6)


def _mla_reference(mod: MLA, x):
    """DeepSeek-V3 reference model.py's MLA forward, written out with an explicit softmax."""
    sp = mod.spec
    b, s, _ = x.shape
    q = mod.q_b_proj(mod.q_a_layernorm(mod.q_a_proj(x))) if sp.q_lora_rank else mod.q_proj(x)
    q = q.view(b, s, sp.heads, -1)
    q_nope, q_pe = q.split([sp.qk_nope_dim, sp.qk_rope_dim], -1)
    q_pe = mod.rotary(q_pe)
    kv, k_pe = mod.kv_a_proj_with_mqa(x).split([sp.kv_lora_rank, sp.qk_rope_dim], -1)
    k_pe = mod.rotary(k_pe.unsqueeze(2))
    kv = mod.kv_b_proj(mod.kv_a_layernorm(kv)).view(b, s, sp.heads, -1)
    k_nope, v = kv.split([sp.qk_nope_dim, sp.v_dim], -1)
    q = torch.cat([q_nope, q_pe], -1)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, sp.heads, -1)], -1)
    scores = torch.einsum("bshd,bthd->bsht", q, k) * mod.softmax_scale
    scores = scores + torch.full((s, s), float("-inf")).triu(1).unsqueeze(1)
    out = torch.einsum("bsht,bthd->bshd", scores.softmax(-1), v)
    return mod.o_proj(out.flatten(2))


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_mla_matches_the_reference_formula_and_is_causal(q_lora_rank):
    plan = _plan()
    spec = Attention(
        kind="mla",
        heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_dim=16,
        qk_rope_dim=8,
        v_dim=16,
    )
    torch.manual_seed(0)
    mod = MLA(plan.model, spec, plan.precision)
    for p in mod.parameters():
        torch.nn.init.normal_(p, std=0.1)
    names = {n for n, _ in mod.named_parameters()}
    assert ("q_proj.weight" in names) == (q_lora_rank == 0)
    assert ("q_a_proj.weight" in names) == (q_lora_rank > 0)
    x = torch.randn(2, 12, 64)
    y = mod(x)
    rtol, atol = tol("runtime_layer")
    torch.testing.assert_close(y, _mla_reference(mod, x), rtol=rtol, atol=atol)
    x2 = x.clone()
    x2[:, 7] += 1.0
    y2 = mod(x2)
    torch.testing.assert_close(y2[:, :7], y[:, :7], rtol=0, atol=0)
    assert not torch.allclose(y2[:, 7:], y[:, 7:])


def test_gqa_equals_mha_with_repeated_kv_heads():
    plan = _plan()
    torch.manual_seed(0)
    gqa = GQA(plan.model, Attention(kind="gqa", heads=4, kv_heads=2, head_dim=16), plan.precision)
    mha = GQA(plan.model, Attention(kind="gqa", heads=4, kv_heads=4, head_dim=16), plan.precision)
    for p in gqa.parameters():
        torch.nn.init.normal_(p, std=0.1)
    mha.q_proj.weight.data = gqa.q_proj.weight.data.clone()
    mha.o_proj.weight.data = gqa.o_proj.weight.data.clone()
    for name in ("k_proj", "v_proj"):
        w = getattr(gqa, name).weight.data.view(2, 16, 64)
        getattr(mha, name).weight.data = w.repeat_interleave(2, dim=0).reshape(64, 64).clone()
    x = torch.randn(2, 10, 64)
    rtol, atol = tol("runtime_layer")
    torch.testing.assert_close(gqa(x), mha(x), rtol=rtol, atol=atol)


def test_fp8_linears_stay_close_to_fp32():
    plan32, plan8 = parse_plan(tiny_plan()), parse_plan(tiny_plan(precision="fp8"))
    spec = plan32.model.attention["mla"]
    torch.manual_seed(0)
    a = MLA(plan32.model, spec, plan32.precision)
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.1)
    b = MLA(plan8.model, spec, plan8.precision)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        ya, yb = a(x), b(x).float()
    rtol, _ = tol("fp8_e4m3_vs_fp32_rel")
    assert float((yb - ya).norm() / ya.norm()) < rtol
