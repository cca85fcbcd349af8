"""runtime/fp8.py with the torch backend: quantiser numerics, GEMMs, FP8 linears' gradients."""

from __future__ import annotations

import pytest
import torch

from dsvc.runtime import fp8
from dsvc.runtime import fp8_torch as ref
from tests.tolerances import tol

FP8 = torch.float8_e4m3fn


def _close(actual, expected, name):
    rtol, atol = tol(name)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _rel_err(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _assert_codes_within_one_ulp(deq, x, scale_full):
    """deq and x differ by at most one e4m3 ulp once divided by their tile's scale."""
    rtol, atol = tol("fp8_e4m3_one_ulp")
    err = (deq - x).abs() / scale_full
    assert (err <= rtol * (x.abs() / scale_full) + atol).all()


def _tiles(x, tile=128):
    """x (M, K) -> (M, Kt, tile) zero-padded, for independent amax computations."""
    m, k = x.shape
    kt = -(-k // tile)
    return torch.nn.functional.pad(x, (0, kt * tile - k)).reshape(m, kt, tile)


def test_act_scales_are_tile_amax_over_448_on_ragged_k():
    torch.manual_seed(0)
    x = torch.randn(5, 300) * torch.logspace(-3, 3, 5).unsqueeze(1)
    q, s = fp8.quantize_act(x)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (5, 3)
    amax = _tiles(x).abs().amax(-1)
    assert torch.equal(s, amax / 448.0)
    # the tile's largest element lands on the top code, every element within one e4m3 ulp
    assert torch.equal(_tiles(q.float()).abs().amax(-1), torch.full((5, 3), 448.0))
    _assert_codes_within_one_ulp(fp8.dequantize_act(q, s), x, s.repeat_interleave(128, 1)[:, :300])


def test_all_zero_tile_gives_finite_positive_scale_and_zeros():
    x = torch.zeros(4, 256)
    x[0, 200] = 3.0  # second tile of row 0 is not zero; every other tile is
    q, s = fp8.quantize_act(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[1, 0] == ref.AMAX_FLOOR / 448.0
    assert torch.equal(fp8.dequantize_act(q, s)[1:], torch.zeros(3, 256))
    qw, sw = fp8.quantize_weight(torch.zeros(130, 130))
    assert torch.isfinite(sw).all() and (sw > 0).all() and not qw.float().any()


@pytest.mark.parametrize("ue8m0", [False, True])
def test_huge_tiles_saturate_at_448_without_inf_or_nan(ue8m0):
    x = torch.tensor([[3.0e38, -3.0e38, 1.0e30, 1.0] * 32, [1.0e-20] * 128])
    q, s = fp8.quantize_act(x, ue8m0=ue8m0)
    qf = q.float()
    assert torch.isfinite(s).all() and torch.isfinite(qf).all()
    assert qf.abs().max() <= 448.0 and qf[0, 0] > 0 and qf[0, 1] < 0
    if not ue8m0:
        assert qf[0, 0] == 448.0 and qf[0, 1] == -448.0 and qf[1, 0] == 448.0


def test_ue8m0_scales_are_the_next_power_of_two():
    torch.manual_seed(1)
    x = torch.randn(16, 512) * 37.0
    _, s = fp8.quantize_act(x, ue8m0=True)
    exact = _tiles(x).abs().amax(-1) / 448.0
    mantissa, _ = torch.frexp(s)
    assert (mantissa == 0.5).all()  # a power of two
    assert (s >= exact).all() and (s < 2 * exact).all()


def test_weight_blocks_on_ragged_edges():
    torch.manual_seed(2)
    w = torch.randn(2, 200, 130)
    q, s = fp8.quantize_weight(w)
    assert q.shape == w.shape and s.shape == (2, 2, 2)
    assert s[1, 1, 1] == w[1, 128:, 128:].abs().amax() / 448.0
    assert s[0, 0, 1] == w[0, :128, 128:].abs().amax() / 448.0
    s_full = s.repeat_interleave(128, 1)[:, :200].repeat_interleave(128, 2)[..., :130]
    _assert_codes_within_one_ulp(fp8.dequantize_weight(q, s), w, s_full)


def test_token_axis_tiling_is_the_transposed_tiling():
    torch.manual_seed(3)
    x = torch.randn(200, 140)
    qt, st = fp8.quantize_act_t(x)
    q2, s2 = fp8.quantize_act(x.t().contiguous())
    assert qt.shape == (140, 200) and st.shape == (140, 2)
    assert torch.equal(qt.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(st, s2)
    _, _, qt3, st3 = fp8.quantize_act_both(x)
    assert torch.equal(qt3.view(torch.uint8), qt.view(torch.uint8)) and torch.equal(st3, st)


def test_grouped_token_tiles_restart_at_each_experts_origin():
    torch.manual_seed(4)
    x = torch.randn(300, 64)
    offsets = torch.tensor([130, 130, 300], dtype=torch.int32)  # expert 1 is empty
    xt, st = fp8.quantize_act_t_grouped(x, offsets)
    assert st.shape == (64, 3 + 3)
    # expert 0: tokens 0..129 -> columns 0, 1. Expert 2: tokens 130..299, tiles from its
    # origin 128 (130 rounded down to 16): 130..255 and 256..299 -> 2 + 128 // 128 = 3, 4;
    # tokens 128 and 129 are expert 0's and count for nothing in expert 2's first tile
    assert torch.equal(st[:, 0], x[:128].abs().amax(0) / 448.0)
    assert torch.equal(st[:, 1], x[128:130].abs().amax(0) / 448.0)
    assert torch.equal(st[:, 3], x[130:256].abs().amax(0) / 448.0)
    assert torch.equal(st[:, 4], x[256:300].abs().amax(0) / 448.0)
    assert torch.equal(st[:, 2], torch.ones(64)) and torch.equal(st[:, 5], torch.ones(64))
    # each token keeps its own expert's scale: token 129 with column 1, token 130 with 3
    tail0, _ = fp8.quantize_act(x[128:130].t().contiguous())
    head2, _ = fp8.quantize_act(x[130:256].t().contiguous())
    assert torch.equal(xt[:, 129].view(torch.uint8), tail0[:, 1].view(torch.uint8))
    assert torch.equal(xt[:, 130].view(torch.uint8), head2[:, 0].view(torch.uint8))


def test_gemm_is_the_dequantised_fp32_product_for_block_and_row_scales():
    torch.manual_seed(5)
    a, a_s = fp8.quantize_act(torch.randn(33, 300))
    w, w_s = fp8.quantize_weight(torch.randn(150, 300))
    out = fp8.fp8_gemm(a, a_s, w, w_s, torch.float32)
    expected = fp8.dequantize_act(a, a_s) @ fp8.dequantize_weight(w, w_s).t()
    _close(out, expected, "fp8_gemm_fp32_out")
    b, b_s = fp8.quantize_act(torch.randn(150, 300))  # row scales: the wgrad recipe
    out = fp8.fp8_gemm(a, a_s, b, b_s, torch.bfloat16)
    expected = fp8.dequantize_act(a, a_s) @ fp8.dequantize_act(b, b_s).t()
    assert out.dtype == torch.bfloat16
    _close(out.float(), expected, "fp8_gemm_bf16_out")
    with pytest.raises(ValueError, match="fit neither"):
        fp8.fp8_gemm(a, a_s, w, w_s[:1, :2])


def _dequant_linear_reference(x, w, dy):
    """Autograd of y = deq(q(x)) deq(q(w))^T, backward GEMMs on the FP8 tilings of dY."""
    xq = fp8.dequantize_act(*fp8.quantize_act(x))
    wq = fp8.dequantize_weight(*fp8.quantize_weight(w))
    y = xq @ wq.t()
    dyq = fp8.dequantize_act(*fp8.quantize_act(dy))  # 1x128 along N for dgrad
    dx = dyq @ wq
    dyt = fp8.dequantize_act(*fp8.quantize_act_t(dy))  # 128x1 along tokens for wgrad
    xt = fp8.dequantize_act(*fp8.quantize_act_t(x))
    dw = dyt @ xt.t()
    return y, dx, dw


def test_fp8_linear_gradients_match_the_dequantised_reference():
    torch.manual_seed(6)
    x = torch.randn(2, 70, 200, requires_grad=True)
    w = torch.randn(150, 200, requires_grad=True)
    b = torch.randn(150, requires_grad=True)
    y = fp8.fp8_linear(x, w, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = _dequant_linear_reference(
        x.detach().reshape(140, 200), w.detach(), dy.reshape(140, 150)
    )
    _close(y.detach().reshape(140, 150), y_ref + b.detach(), "fp8_linear_vs_dequant_ref")
    _close(x.grad.reshape(140, 200), dx_ref, "fp8_linear_vs_dequant_ref")
    _close(w.grad, dw_ref, "fp8_linear_vs_dequant_ref")
    _close(b.grad, dy.reshape(140, 150).sum(0), "fp8_linear_vs_dequant_ref")
    # and it is an FP8 approximation of the exact linear, not something else
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w2).backward(dy)
    limit = tol("fp8_e4m3_vs_fp32_rel")[0]
    assert _rel_err(x.grad, x2.grad) < limit and _rel_err(w.grad, w2.grad) < limit


def test_fp8_linear_keeps_dtypes_and_skips_frozen_weight_grad():
    x = torch.randn(8, 128, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 128)  # frozen
    y = fp8.fp8_linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (8, 64)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad is None
    with pytest.raises(ValueError, match="input features"):
        fp8.fp8_linear(torch.randn(3, 100), w)


def _per_expert(x, weights, offsets, fn):
    outs, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        outs.append(fn(x[start:end], weights[e]))
        start = end
    return torch.cat(outs)


def test_grouped_linear_matches_per_expert_linears():
    torch.manual_seed(7)
    offsets = torch.tensor([40, 40, 170, 200], dtype=torch.int64)  # an empty expert
    x = torch.randn(210, 140, requires_grad=True)  # 10 trailing rows belong to no expert
    w = torch.randn(4, 72, 140, requires_grad=True)
    y = fp8.fp8_grouped_linear(x, w, offsets)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(y[200:].detach(), torch.zeros(10, 72)) and not x.grad[200:].any()
    assert not w.grad[1].any()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = _per_expert(x2, w2, offsets, lambda xe, we: xe @ we.t())
    y2.backward(dy[:200])
    limit = tol("fp8_e4m3_vs_fp32_rel")[0]
    assert _rel_err(y[:200], y2) < limit
    assert _rel_err(x.grad[:200], x2.grad[:200]) < limit and _rel_err(w.grad, w2.grad) < limit
    # each expert's wgrad is exactly the dense fp8 wgrad over its own token range, tiled
    # from its origin: tokens 40..169 in tiles from token 32 (40 rounded down to 16)
    def from_origin(t):
        return torch.cat([torch.zeros(8, t.shape[1]), t[40:170]])

    dyt = fp8.dequantize_act(*fp8.quantize_act_t(from_origin(dy)))
    xt = fp8.dequantize_act(*fp8.quantize_act_t(from_origin(x.detach())))
    _close(w.grad[2], dyt @ xt.t(), "fp8_linear_vs_dequant_ref")


def test_grouped_swiglu_ffn_is_an_fp8_swiglu():
    torch.manual_seed(8)
    offsets = torch.tensor([50, 130], dtype=torch.int32)
    x = torch.randn(130, 128, requires_grad=True)
    w1, w3 = (torch.randn(2, 96, 128).div(11).requires_grad_() for _ in range(2))
    w2 = torch.randn(2, 128, 96).div(10).requires_grad_()
    y = fp8.fp8_grouped_swiglu_ffn(x, w1, w3, w2, offsets)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w3, w2)]

    def expert(xe, e):
        h = torch.nn.functional.silu(xe @ leaves[1][e].t()) * (xe @ leaves[2][e].t())
        return h @ leaves[3][e].t()

    y2 = torch.cat([expert(leaves[0][:50], 0), expert(leaves[0][50:], 1)])
    y2.backward(dy)
    limit = tol("fp8_e4m3_vs_fp32_rel")[0]
    assert _rel_err(y, y2) < limit
    for got, want in zip((x, w1, w3, w2), leaves):
        assert _rel_err(got.grad, want.grad) < limit


def test_backend_and_offsets_errors_are_clear():
    x = torch.randn(4, 128)
    with pytest.raises(ValueError, match="unknown fp8 backend"):
        fp8.quantize_act(x, backend="cuda")
    with pytest.raises(ValueError, match="offsets"):
        fp8.fp8_grouped_linear(x, torch.randn(2, 8, 128), torch.tensor([1.0, 4.0]))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        a, a_s = fp8.quantize_act(x)
        fp8.fp8_gemm(a, a_s, a, a_s, backend="cublas")
