"""The generated fused kernels (one per fusion group) against runtime/fused_torch.py.

Each kernel is fed the reference's inputs and must give its outputs: fp8 codes and
scales, bf16 values, fp32 values up to their summation order (tests/tolerances.py:
`fused_fp32` for fp32 results, `fused_requantised_rel` for values rounded after an fp32
result that may sit an ulp away). Forward and backward kernels, ragged shapes (token
counts and widths off the 128 tile, experts without tokens), and hypothesis shapes.
Interpreted on a CPU (TRITON_INTERPRET=1), compiled on CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvc.runtime import fp8_torch as F8
from dsvc.runtime import fused_torch as R
from tests.runtime.triton_helpers import OnDevice, bits_equal, load_kernels
from tests.tolerances import tol

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The module rendered for no particular spec: every fused kernel."""
    from dsvc.compiler.codegen.kernels import generic_config, render_kernels

    path = tmp_path_factory.mktemp("fused") / "fp8_kernels.py"
    path.write_text(render_kernels(generic_config()))
    return OnDevice(load_kernels(path, "_dsvc_test_fused_generic"))


def _rand(*shape, seed=0, dtype=torch.bfloat16, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _value(t):
    return t.cpu().float()


def _same(got, want, what="", rtol_name="fused_requantised_rel"):
    """Equal outputs: fp8 (q, s) pairs compared as dequantised values, the rest as values;
    all within the relative Frobenius error of `rtol_name`."""
    assert (got is None) == (want is None), what
    if got is None:
        return
    g, w = _value(got), _value(want)
    assert g.shape == w.shape, (what, g.shape, w.shape)
    err = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
    assert err <= tol(rtol_name)[0], (what, err)


def _same_fp8(got, want, what):
    """(q, s) pairs equal as dequantised values (row tiles or token tiles alike)."""
    (gq, gs), (wq, ws) = got, want
    assert gq.shape == wq.shape and gs.shape == ws.shape, what
    _same(F8.dequantize_act(gq.cpu(), gs.cpu().contiguous()),
          F8.dequantize_act(wq, ws.contiguous()), what)


def _all_outputs(got, want, names):
    """Compare tuples of outputs; fp8 tensors with the scale tensor after them."""
    i = 0
    while i < len(names):
        name = names[i]
        if got[i] is not None and got[i].dtype == torch.float8_e4m3fn:
            _same_fp8((got[i], got[i + 1]), (want[i], want[i + 1]), name)
            i += 2
            continue
        rtol = "fused_fp32" if (got[i] is not None and got[i].dtype in (torch.float32,)) else (
            "fused_requantised_rel")
        if got[i] is not None and got[i].dtype in (torch.int64, torch.int32):
            assert torch.equal(got[i].cpu(), want[i]), name
        else:
            _same(got[i], want[i], name, rtol)
        i += 1


# ----------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("m,k,cols", [(200, 320, False), (129, 256, True), (7, 96, True)])
def test_rmsnorm_quant_forward(kernels, m, k, cols):
    x, w = _rand(m, k, seed=1), _rand(k, seed=2, dtype=torch.float32).abs() + 0.5
    got = kernels.rmsnorm_quant(x, w, 1e-6, want_y=True, rows=True, cols=cols)
    want = R.rmsnorm_quant(x, w, 1e-6, want_y=True, rows=True, cols=cols)
    _all_outputs(got, want, ["y", "q", "s", "qt", "st", "rstd"])


def test_rmsnorm_quant_reads_a_column_slice_in_place(kernels):
    kv = _rand(90, 256 + 32, seed=3)
    w = torch.ones(256)
    got = kernels.rmsnorm_quant(kv[:, :256], w, 1e-6)
    want = R.rmsnorm_quant(kv[:, :256], w, 1e-6)
    _all_outputs(got, want, ["y", "q", "s", "qt", "st", "rstd"])


@pytest.mark.parametrize("extra,dres", [(0, True), (32, False), (0, False)])
def test_rmsnorm_backward_fused_with_residual_quantisation_and_token_tiles(kernels, extra, dres):
    m, k = 150, 256
    x, dy = _rand(m, k, seed=4), _rand(m, k, seed=5)
    w = _rand(k, seed=6, dtype=torch.float32).abs() + 0.5
    rstd = R.rmsnorm_quant(x, w, 1e-6)[5]
    kw = dict(dres=_rand(m, k, seed=7) if dres else None,
              extra=_rand(m, extra, seed=8) if extra else None, want_dx=True, quant_dx=True,
              x_cols=True)
    got = kernels.rmsnorm_bwd(x, rstd, w, dy, **kw)
    want = R.rmsnorm_bwd(x, rstd, w, dy, **kw)
    _all_outputs(got, want, ["dx", "q", "s", "qt", "st", "xt", "xts", "dw"])


# ----------------------------------------------------------------------------- RoPE


def _tables(rot, seq=128, seed=9):
    ang = torch.outer(torch.arange(seq).float(),
                      torch.rand(rot // 2, generator=torch.Generator().manual_seed(seed)))
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("t,heads,nope,rope,v,latent", [(96, 4, 32, 16, 32, 64),
                                                         (50, 3, 24, 8, 40, 96)])
def test_mla_rope_forward_and_backward(kernels, t, heads, nope, rope, v, latent):
    cos, sin = _tables(rope)
    q = _rand(t, heads * (nope + rope), seed=10)
    kvu = _rand(t, heads * (nope + v), seed=11)
    kv = _rand(t, latent + rope, seed=12)
    args = (cos, sin, 48, heads, nope, rope, v)
    got = kernels.mla_rope_qkv(q, kvu, kv, *args, latent)
    want = R.mla_rope_qkv(q, kvu, kv, *args, latent)
    for name, g, w in zip("QKV", got, want):
        _same(g, w, name)
    dq, dk, dv = (_rand(*w.shape, seed=13 + i) for i, w in enumerate(want))
    got = kernels.mla_rope_qkv_bwd(dq, dk, dv, *args)
    want = R.mla_rope_qkv_bwd(dq, dk, dv, *args)
    _all_outputs(got, want, ["dq", "s", "dqt", "st", "dkvu", "s", "dkvut", "st", "dkpe"])


def test_gqa_rope_forward_and_backward(kernels):
    t, heads, kv_heads, d = 70, 4, 2, 32
    cos, sin = _tables(d)
    q, k = _rand(t, heads * d, seed=20), _rand(t, kv_heads * d, seed=21)
    got = kernels.gqa_rope(q, k, cos, sin, 35, heads, kv_heads, d)
    want = R.gqa_rope(q, k, cos, sin, 35, heads, kv_heads, d)
    _same(got[0], want[0], "Q")
    _same(got[1], want[1], "K")
    got = kernels.gqa_rope_bwd(want[0], want[1], cos, sin, 35, want_dx=True)
    want = R.gqa_rope_bwd(want[0], want[1], cos, sin, 35, want_dx=True)
    _all_outputs(got, want, ["dq", "s", "dqt", "st", "dk", "s", "dkt", "st", "dq", "dk"])


def test_attention_output_quantised_in_place_of_its_transposed_copy(kernels):
    o = _rand(2, 5, 40, 48, seed=22)  # (B, H, S, V): o_proj reads (B S, H V)
    got = kernels.quantize_bhsd(o, rows=True, cols=True)
    want = R.quantize_bhsd(o, rows=True, cols=True)
    _all_outputs(got, want, ["q", "s", "qt", "st"])
    o_t = o.transpose(1, 2).contiguous().transpose(1, 2)  # SDPA's other layout
    _all_outputs(kernels.quantize_bhsd(o_t, rows=True, cols=True), want, ["q", "s", "qt", "st"])


# ----------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("round_act", [False, True])
def test_swiglu_quant_rounds_as_the_ops_it_replaces(kernels, round_act):
    g, u = _rand(90, 192, seed=30), _rand(90, 192, seed=31)
    rd = torch.bfloat16 if round_act else None
    got = kernels.swiglu_quant(g, u, round_dtype=rd)
    want = F8.swiglu_quant(g, u, round_dtype=rd)
    _same_fp8(got, want, "h")


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("round_act", [False, True])
def test_swiglu_backward_quantised_both_ways(kernels, grouped, round_act):
    m, i = 150, 192
    g, u, dh = _rand(m, i, seed=32), _rand(m, i, seed=33), _rand(m, i, seed=34)
    kw = dict(offsets=torch.tensor([10, 10, 50, 150]) if grouped else None,
              round_dtype=torch.bfloat16 if round_act else None)
    got = kernels.swiglu_bwd_quant(g, u, dh, **kw)
    want = R.swiglu_bwd_quant(g, u, dh, **kw)
    _all_outputs(got, want, ["dg", "s", "dgt", "st", "du", "s", "dut", "st", "ht", "hts"])
    if grouped:  # slots past an expert's end keep the layout's unit scale
        assert torch.equal(got[3].cpu(), want[3])


@pytest.mark.parametrize("round_act", [False, True])
def test_swiglu_quant_keeps_its_inputs_as_fp8_tiles(kernels, round_act):
    g, u = _rand(90, 200, seed=35, scale=3.0), _rand(90, 200, seed=36)
    rd = torch.bfloat16 if round_act else None
    got = kernels.swiglu_quant(g, u, round_dtype=rd, keep_inputs=True)
    want = F8.swiglu_quant(g, u, round_dtype=rd, keep_inputs=True)
    assert len(got) == len(want) == 6
    _all_outputs(got, want, ["h", "s", "g", "s", "u", "s"])
    plain = kernels.swiglu_quant(g, u, round_dtype=rd)  # h's codes do not depend on keeping
    assert bits_equal(got[0].cpu(), plain[0].cpu()) and torch.equal(got[1], plain[1])
    assert bits_equal(got[2].cpu(), F8.quantize_act(g)[0])  # g's own tiles, bit for bit


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("round_act", [False, True])
def test_swiglu_backward_reads_fp8_inputs(kernels, grouped, round_act):
    m, i = 150, 200
    g, u, dh = _rand(m, i, seed=37, scale=3.0), _rand(m, i, seed=38), _rand(m, i, seed=39)
    (gq, gs), (uq, us) = F8.quantize_act(g), F8.quantize_act(u)
    kw = dict(offsets=torch.tensor([10, 10, 50, 150]) if grouped else None,
              round_dtype=torch.bfloat16 if round_act else None, gate_s=gs, up_s=us)
    got = kernels.swiglu_bwd_quant(gq, uq, dh, **kw)
    want = R.swiglu_bwd_quant(gq, uq, dh, **kw)
    names = ["dg", "s", "dgt", "st", "du", "s", "dut", "st", "ht", "hts"]
    _all_outputs(got, want, names)
    # the same as the backward from the dequantised values, which is what it reads
    deq = {k: v for k, v in kw.items() if k not in ("gate_s", "up_s")}
    _all_outputs(got, R.swiglu_bwd_quant(F8.dequantize_act(gq, gs), F8.dequantize_act(uq, us),
                                         dh, **deq), names)


@pytest.mark.parametrize("fp8_in", [False, True])
def test_swiglu_weighted_by_the_gates_forward_and_backward(kernels, fp8_in):
    # routed experts apply their slot's gate inside SwiGLU (h' = w h): the forward's codes,
    # and a backward giving the gradients of w dh, h' in token tiles and the gate gradient
    m, i = 150, 200
    g, u, dh = _rand(m, i, seed=44, scale=3.0), _rand(m, i, seed=45), _rand(m, i, seed=46)
    w = torch.rand(m, generator=torch.Generator().manual_seed(47)) + 0.05
    _same_fp8(kernels.swiglu_quant(g, u, row_scale=w), F8.swiglu_quant(g, u, row_scale=w), "h'")
    kw = {"offsets": torch.tensor([10, 10, 50, 150])}
    if fp8_in:
        _, _, g, kw["gate_s"], u, kw["up_s"] = F8.swiglu_quant(g, u, keep_inputs=True)
    got = kernels.swiglu_bwd_quant(g, u, dh, row_scale=w, **kw)
    want = R.swiglu_bwd_quant(g, u, dh, row_scale=w, **kw)
    names = ["dg", "s", "dgt", "st", "du", "s", "dut", "st", "ht", "hts", "dw"]
    assert len(got) == len(want) == 11
    _all_outputs(got, want, names)
    # the reference against autograd: d/dw and the inputs' gradients of <dh, w silu(g) u>
    gf = F8.dequantize_act(g, kw["gate_s"]) if fp8_in else g.float()
    uf = F8.dequantize_act(u, kw["up_s"]) if fp8_in else u.float()
    gf, uf, wf = gf.clone().requires_grad_(), uf.clone().requires_grad_(), w.clone().requires_grad_()
    (dh.float() * torch.nn.functional.silu(gf) * uf * wf[:, None]).sum().backward()
    _same(want[10], wf.grad, "dw vs autograd", "fused_fp32")
    plain = R.swiglu_bwd_quant(g, u, (dh.float() * w[:, None]), **kw)  # = the gradient of w dh
    _all_outputs(want[:8], plain[:8], names[:8])
    _same_fp8(want[:2], F8.quantize_act(gf.grad.to(torch.bfloat16)), "dg vs autograd")
    _same_fp8(want[4:6], F8.quantize_act(uf.grad.to(torch.bfloat16)), "du vs autograd")


def test_swiglu_weights_are_for_the_unrounded_product_only(kernels):
    g = _rand(8, 128, seed=48)
    w = torch.ones(8)
    for impl in (kernels.swiglu_quant, F8.swiglu_quant):
        with pytest.raises(ValueError, match="row_scale"):
            impl(g, g, round_dtype=torch.bfloat16, row_scale=w)
    for impl in (kernels.swiglu_bwd_quant, R.swiglu_bwd_quant):
        with pytest.raises(ValueError, match="row_scale"):
            impl(g, g, g, round_dtype=torch.bfloat16, row_scale=w)
    with pytest.raises(ValueError, match="row_scale must have shape"):
        kernels.swiglu_quant(g, g, row_scale=torch.ones(7))


def test_swiglu_backward_refuses_half_an_fp8_pair(kernels):
    g = _rand(8, 128, seed=40)
    gq, gs = F8.quantize_act(g)
    with pytest.raises(TypeError, match="gate must be float8_e4m3fn"):
        kernels.swiglu_bwd_quant(g, g, g, gate_s=gs, up_s=gs)
    with pytest.raises(ValueError, match="up_s without gate_s"):
        kernels.swiglu_bwd_quant(g, g, g, up_s=gs)


# ----------------------------------------------------------------------------- routing


ROUTING = [
    dict(score="sigmoid", groups=4, top_groups=2, top_k=4, renormalize=True, route_scale=2.5),
    dict(score="softmax", groups=1, top_groups=1, top_k=3, renormalize=False, route_scale=1.0),
    dict(score="sigmoid", groups=8, top_groups=3, top_k=6, renormalize=True, route_scale=1.5),
]


@pytest.mark.parametrize("cfg", ROUTING, ids=["v3-like", "softmax", "8-groups"])
def test_router_topk_and_its_backward(kernels, cfg):
    e = 64 if cfg["groups"] == 8 else 24
    logits = _rand(77, e, seed=40)
    bias = _rand(e, seed=41, dtype=torch.float32) * 0.1
    got = kernels.router_topk(logits, bias, **cfg)
    want = R.router_topk(logits, bias, **cfg)
    assert torch.equal(got[1].cpu(), want[1]), "a different choice of experts"
    assert torch.equal(got[3].cpu(), want[3]), "different tokens per expert"
    _same(got[0], want[0], "w", "fused_fp32")
    _same(got[2], want[2], "scores", "fused_fp32")
    back = dict(score=cfg["score"], renormalize=cfg["renormalize"],
                route_scale=cfg["route_scale"])
    dw, ds = _rand(77, cfg["top_k"], seed=42, dtype=torch.float32), _rand(77, e, seed=43,
                                                                       dtype=torch.float32)
    for extra in (None, ds):
        _same(kernels.router_bwd(dw, want[1], want[2], extra, **back),
              R.router_bwd(dw, want[1], want[2], extra, **back), "dlogits", "fused_fp32")


# ----------------------------------------------------------------------------- combine


def _routed(t=80, k=3, d=160, seed=50):
    m = t * k
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randperm(m, generator=gen).view(t, k)
    return (_rand(m, d, seed=seed + 1), _rand(t, d, seed=seed + 2), _rand(t, d, seed=seed + 3),
            torch.rand(t, k, generator=gen), pos)


def test_moe_combine_and_dispatch_backward(kernels):
    y, res, shared, w, pos = _routed()
    for sh in (shared, None):
        _same(kernels.moe_combine(res, y, pos, sh), R.moe_combine(res, y, pos, sh), "out")
    # the rows come weighted (by the experts): a plain sum of a token's slots
    _same(R.moe_combine(res, y, pos, shared), res.float() + y[pos].float().sum(1) + shared.float(),
          "res + sum of the slots + shared")
    for extras in ((), (shared,), (shared, res)):
        _same(kernels.moe_dispatch_bwd(y, pos, extras), R.moe_dispatch_bwd(y, pos, extras), "dn")


def test_grouped_quantiser_gathers_scales_and_requantises(kernels):
    y, res, shared, w, pos = _routed(seed=60)
    m, k = y.shape[0], pos.shape[1]
    order = pos.view(-1).argsort()
    offsets = torch.tensor([0, 30, 30, 100, 200, m])  # an empty expert first, one in the middle
    cases = [(y, {}), (res, dict(index=order, div=k)), (res, dict(index=order, div=k, rows=True))]
    for x, kw in cases:
        got = kernels.quantize_grouped(x, offsets, **kw)
        want = R.quantize_grouped(x, offsets, **kw)
        for i in (0, 2):
            if want[i] is not None:
                _same_fp8((got[i], got[i + 1]), (want[i], want[i + 1]), f"{list(kw)} {i}")
    yq, ys = F8.quantize_act(y)  # rows an FP8 dispatch delivered
    got = kernels.quantize_grouped(yq, offsets, x_scales=ys)
    want = R.quantize_grouped(yq, offsets, x_scales=ys)
    _same_fp8(got[2:], want[2:], "fp8 source")


def test_gemm_epilogues_round_like_the_adds_they_replace(kernels):
    a = _rand(70, 256, seed=70)
    aq, a_s = F8.quantize_act(a)
    wq, ws = F8.quantize_weight(_rand(192, 256, seed=71, dtype=torch.float32) * 0.05)
    bias, res = _rand(192, seed=72, dtype=torch.float32), _rand(70, 192, seed=73)
    _same(kernels.gemm(aq, a_s, wq, ws, torch.bfloat16, bias=bias, residual=res),
          F8.gemm(aq, a_s, wq, ws, torch.bfloat16, bias=bias, residual=res), "gemm")
    we, wes = F8.quantize_weight(_rand(3, 192, 256, seed=74, dtype=torch.float32) * 0.05)
    offsets = torch.tensor([20, 20, 70])
    _same(kernels.grouped_gemm(aq, a_s, we, wes, offsets, torch.bfloat16, residual=res),
          F8.grouped_gemm(aq, a_s, we, wes, offsets, torch.bfloat16, residual=res), "grouped")


# ----------------------------------------------------------------------------- random shapes


@settings(max_examples=6, deadline=None)
@given(m=st.integers(1, 140), k=st.integers(1, 300), cols=st.booleans(),
       seed=st.integers(0, 99))
def test_rmsnorm_forward_and_backward_on_random_shapes(kernels, m, k, cols, seed):
    x, dy = _rand(m, k, seed=seed), _rand(m, k, seed=seed + 1)
    w = _rand(k, seed=seed + 2, dtype=torch.float32).abs() + 0.5
    got = kernels.rmsnorm_quant(x, w, 1e-6, want_y=True, rows=True, cols=cols)
    want = R.rmsnorm_quant(x, w, 1e-6, want_y=True, rows=True, cols=cols)
    _all_outputs(got, want, ["y", "q", "s", "qt", "st", "rstd"])
    kw = dict(dres=_rand(m, k, seed=seed + 3), want_dx=True, x_cols=True)
    _all_outputs(kernels.rmsnorm_bwd(x, want[5], w, dy, **kw),
                 R.rmsnorm_bwd(x, want[5], w, dy, **kw),
                 ["dx", "q", "s", "qt", "st", "xt", "xts", "dw"])


@settings(max_examples=5, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=5), i=st.integers(1, 200),
       seed=st.integers(0, 99), fp8_in=st.booleans(), weighted=st.booleans())
def test_grouped_swiglu_backward_on_random_routings(kernels, sizes, i, seed, fp8_in, weighted):
    m = sum(sizes)
    if m == 0:
        return
    offsets = torch.tensor(sizes).cumsum(0)
    g, u, dh = _rand(m, i, seed=seed), _rand(m, i, seed=seed + 1), _rand(m, i, seed=seed + 2)
    kw = {"offsets": offsets}
    if weighted:  # the routed experts' gates, applied inside SwiGLU
        kw["row_scale"] = torch.rand(m, generator=torch.Generator().manual_seed(seed + 3))
    if fp8_in:  # the inputs as swiglu_quant(keep_inputs=True) keeps them
        _, _, g, kw["gate_s"], u, kw["up_s"] = F8.swiglu_quant(g, u, keep_inputs=True)
    got = kernels.swiglu_bwd_quant(g, u, dh, **kw)
    want = R.swiglu_bwd_quant(g, u, dh, **kw)
    names = ["dg", "s", "dgt", "st", "du", "s", "dut", "st", "ht", "hts"]
    _all_outputs(got, want, names + (["dw"] if weighted else []))


@settings(max_examples=5, deadline=None)
@given(t=st.integers(1, 50), e_per=st.integers(2, 8), groups=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 99))
def test_routing_on_random_shapes(kernels, t, e_per, groups, seed):
    e = e_per * groups
    cfg = dict(score="sigmoid", groups=groups, top_groups=max(1, groups // 2),
               top_k=min(3, e_per * max(1, groups // 2)), renormalize=True, route_scale=2.5)
    logits, bias = _rand(t, e, seed=seed), _rand(e, seed=seed + 1, dtype=torch.float32) * 0.1
    got, want = kernels.router_topk(logits, bias, **cfg), R.router_topk(logits, bias, **cfg)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[3].cpu(), want[3])
    _same(got[0], want[0], "w", "fused_fp32")


def test_wrappers_refuse_bad_inputs(kernels):
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.rmsnorm_quant(_rand(4, 64), torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        kernels.router_topk(_rand(4, 8), torch.zeros(8), score="sigmoid", groups=3,
                            top_groups=1, top_k=2, renormalize=True, route_scale=1.0)
    with pytest.raises(ValueError, match="at most 2 extra"):
        y, res, shared, w, pos = _routed(t=4, k=2, d=16)
        kernels.moe_dispatch_bwd(y, pos, (res, res, res))
    with pytest.raises(ValueError, match="needs its x_scales"):
        kernels.quantize_grouped(F8.quantize_act(_rand(8, 16))[0], torch.tensor([8]))


def test_every_fused_op_is_in_the_generic_module_and_the_reference(kernels):
    for name in R.FUSED_PROTOCOL:
        assert callable(getattr(kernels.module, name)), name
        assert callable(getattr(R, name)), name
