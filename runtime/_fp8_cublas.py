"""FP8 "cublas" backend: torch._scaled_mm with DeepSeek-style block scales (GPU only).

Used as the comparison point for the generated kernels. Layouts (what torch 2.11
accepted on an H200, REFERENCE.md): activations a (M, K) row-major with scales
(M, Kt) stored column-major; weights passed as w.t() of an (N, K) row-major tensor
with scales ws.t() of a contiguous (Nt, Kt) tensor. 1x128 x 1x128 (wgrad) passes the
b row scales as a contiguous (Kt, N) tensor, by analogy (not yet verified on a GPU).
Quantisation and the grouped token-axis layout reuse the torch reference.
"""

from __future__ import annotations

import torch

from . import _fp8_torch as ref


def _require_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_cuda:
            raise RuntimeError(
                "fp8 backend 'cublas' needs CUDA tensors (torch._scaled_mm block scales); "
                "use backend='torch' on CPU"
            )


def gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """out (M, N) = a @ b^T via torch._scaled_mm with 1x128 (a) and 128x128 or 1x128 (b) scales."""
    _require_cuda(a, a_s, b, b_s)
    k = a.shape[1]
    if k % 16 != 0:
        raise ValueError(f"cublas fp8 gemm needs K divisible by 16, got K={k}")
    a = a.contiguous()
    b = b.contiguous()
    scale_a = a_s.float().t().contiguous().t()
    if ref.b_scales_are_rowwise(b, b_s):
        scale_b = b_s.float().t().contiguous()
    else:
        scale_b = b_s.float().contiguous().t()
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """A loop of block-scaled _scaled_mm calls, one per non-empty expert (the bench's baseline)."""
    out = torch.zeros((a.shape[0], b.shape[-2]), dtype=out_dtype, device=a.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = gemm(a[start:end], a_s[start:end], b[e], b_s[e], out_dtype)
        start = end
    return out


def grouped_gemm_wgrad(
    a_t: torch.Tensor,
    a_ts: torch.Tensor,
    b_t: torch.Tensor,
    b_ts: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-expert 1x128 x 1x128 _scaled_mm over each expert's token range."""
    num_experts = offsets.numel()
    out = torch.zeros((num_experts, a_t.shape[0], b_t.shape[0]), dtype=out_dtype, device=a_t.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            base = e + start // ref.TILE
            cols = -(-(end - start) // ref.TILE)
            out[e] = gemm(
                a_t[:, start:end],
                a_ts[:, base : base + cols],
                b_t[:, start:end],
                b_ts[:, base : base + cols],
                out_dtype,
            )
        start = end
    return out
