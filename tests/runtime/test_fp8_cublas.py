"""runtime/fp8_cublas.py without a GPU: the tensors handed to torch._scaled_mm.

A fake `_scaled_mm` captures every call, asserts the layout torch 2.11 accepted on an
H200 (bench/RESULTS.md) within the sizes it was measured at (M and N multiples of 16, Kt
a multiple of 4, so that the 128x128 scales' row stride is also cuBLAS's round_up(Kt, 4)),
runs the arguments through torch's own `_scaled_mm` shape checks on fake CUDA tensors,
and multiplies them the way cuBLAS reads them, so the padded results must equal the
torch reference.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dsvc.runtime import fp8_cublas as cublas
from dsvc.runtime import fp8_torch as ref
from tests.tolerances import tol

FP8 = torch.float8_e4m3fn


def assert_documented_layout(mat1, mat2, scale_a, scale_b) -> str:
    """Assert the layout bench/RESULTS.md records; returns "block" (128x128 b scales) or "rows" (1x128)."""
    m, k = mat1.shape
    n = mat2.shape[1]
    kt = k // 128
    assert mat1.dtype == mat2.dtype == FP8 and scale_a.dtype == scale_b.dtype == torch.float32
    assert m % 16 == 0 and n % 16 == 0 and k % 512 == 0, (m, n, k)
    assert mat1.stride() == (k, 1)  # row-major (M, K)
    assert mat2.shape == (k, n) and mat2.stride() == (1, k)  # w.t() of a row-major (N, K)
    assert scale_a.shape == (m, kt) and scale_a.stride() == (1, m)  # s.t().contiguous().t()
    if scale_b.shape == (kt, -(-n // 128)):
        assert scale_b.stride() == (1, kt)  # ws.t() of a contiguous (Nt, Kt)
        return "block"
    assert scale_b.shape == (kt, n) and scale_b.is_contiguous()  # its .t() is outer-dim-major
    return "rows"


def run_torch_checks(mat1, mat2, scale_a, scale_b, out_dtype) -> None:
    """torch's _scaled_mm meta checks (shapes, row/column-major operands) as for CUDA tensors."""
    with FakeTensorMode():
        fakes = [
            torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
            for t in (mat1, mat2, scale_a, scale_b)
        ]
        out = torch.ops.aten._scaled_mm(  # the op itself: torch._scaled_mm is faked below
            fakes[0], fakes[1], scale_a=fakes[2], scale_b=fakes[3], out_dtype=out_dtype
        )
        assert out.shape == (mat1.shape[0], mat2.shape[1]) and out.dtype == out_dtype


class FakeScaledMM:
    """Stands in for torch._scaled_mm: checks, records, and computes what cuBLAS would."""

    def __init__(self):
        self.kinds: list[str] = []

    def __call__(self, mat1, mat2, *, scale_a, scale_b, out_dtype):
        kind = assert_documented_layout(mat1, mat2, scale_a, scale_b)
        run_torch_checks(mat1, mat2, scale_a, scale_b, out_dtype)
        self.kinds.append(kind)
        a = ref.dequantize_act(mat1, scale_a)
        if kind == "block":
            b = ref.dequantize_weight(mat2.t(), scale_b.t())
        else:
            b = ref.dequantize_act(mat2.t(), scale_b.t())
        return (a @ b.t()).to(out_dtype)


@pytest.fixture
def fake_mm(monkeypatch):
    fake = FakeScaledMM()
    monkeypatch.setattr(torch, "_scaled_mm", fake)
    monkeypatch.setattr(cublas, "_require_cuda", lambda *tensors: None)
    return fake


def _close(got, want):
    rtol, atol = tol("fp8_gemm_fp32_out")
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


# (M, N, K): an aligned forward (nothing padded; its dgrad has K = 384, Kt = 3), the
# bench's ragged M = 131, and K = 256 / N = 256 (Kt = 2) that gave wrong results on the H200
@pytest.mark.parametrize("m, n, k", [(256, 384, 1024), (131, 160, 256), (64, 256, 256)])
def test_forward_and_dgrad_pass_the_documented_layout(fake_mm, m, n, k):
    torch.manual_seed(0)
    a, a_s = ref.quantize_act(torch.randn(m, k))
    w, w_s = ref.quantize_weight(torch.randn(n, k))
    got = cublas.gemm(a, a_s, w, w_s, torch.float32)
    assert got.shape == (m, n)
    _close(got, ref.gemm(a, a_s, w, w_s, torch.float32))
    # dgrad: dY (M, N) @ W, b = w.t() (a transposed view) with block scales w_s.t()
    dy, dy_s = ref.quantize_act(torch.randn(m, n))
    got = cublas.gemm(dy, dy_s, w.t(), w_s.t(), torch.float32)
    _close(got, ref.gemm(dy, dy_s, w.t(), w_s.t(), torch.float32))
    assert fake_mm.kinds == ["block", "block"]


def test_scales_keep_their_values_and_the_aligned_case_copies_no_operand():
    torch.manual_seed(1)
    a, a_s = ref.quantize_act(torch.randn(256, 1024))
    w, w_s = ref.quantize_weight(torch.randn(384, 1024))
    mat1, mat2, scale_a, scale_b = cublas.scaled_mm_operands(a, a_s, w, w_s)
    assert mat1.data_ptr() == a.data_ptr() and mat2.data_ptr() == w.data_ptr()
    assert torch.equal(scale_a, a_s) and torch.equal(scale_b, w_s.t())
    # Kt = 2 padded to 4: the extra scale columns are 1 over zero data
    a, a_s = ref.quantize_act(torch.randn(131, 256))
    mat1, _, scale_a, _ = cublas.scaled_mm_operands(a, a_s, w[:, :256], w_s[:, :2])
    assert mat1.shape == (144, 512) and not mat1[131:].float().any()
    assert not mat1[:, 256:].float().any() and torch.equal(scale_a[:131, :2], a_s)
    assert (scale_a[:, 2:] == 1).all()


def test_grouped_and_wgrad_loops_pass_the_documented_layout(fake_mm):
    torch.manual_seed(2)
    num_tokens, n, k = 200, 160, 256
    offsets = torch.tensor([37, 37, 180, 200])  # an empty expert, ragged token counts
    a, a_s = ref.quantize_act(torch.randn(num_tokens, k))
    w, w_s = ref.quantize_weight(torch.randn(4, n, k))
    got = cublas.grouped_gemm(a, a_s, w, w_s, offsets, torch.float32)
    _close(got, ref.grouped_gemm(a, a_s, w, w_s, offsets, torch.float32))
    # wgrad: K of each GEMM is an expert's token count (37, 143, 20), 1x128 x 1x128 scales
    dy_t, dy_ts = ref.quantize_act_t_grouped(torch.randn(num_tokens, n), offsets)
    x_t, x_ts = ref.quantize_act_t_grouped(torch.randn(num_tokens, k), offsets)
    got = cublas.grouped_gemm_wgrad(dy_t, dy_ts, x_t, x_ts, offsets)
    _close(got, ref.grouped_gemm_wgrad(dy_t, dy_ts, x_t, x_ts, offsets))
    assert fake_mm.kinds == ["block"] * 3 + ["rows"] * 3


def test_cpu_tensors_are_refused_with_a_clear_message():
    a, a_s = ref.quantize_act(torch.randn(16, 128))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cublas.gemm(a, a_s, a, a_s)
