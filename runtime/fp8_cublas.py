"""FP8 "cublas" backend: torch._scaled_mm with DeepSeek-style block scales (GPU only).

Used as the comparison point for the generated kernels. `scaled_mm_operands` lays
the operands out as torch 2.11 accepted them on an H200 (bench/RESULTS.md):

  mat1     a (M, K) fp8, row-major
  scale_a  (M, Kt) fp32 stored column-major (`s.t().contiguous().t()`: strides (1, M))
  mat2     w.t() of an (N, K) row-major fp8 tensor (strides (1, K))
  scale_b  128x128 blocks: ws.t() of a contiguous (Nt, Kt) tensor (strides (1, Kt));
           1x128 rows (wgrad): a contiguous (Kt, N) tensor, so that its .t() is
           outer-dim-major like scale_a (what torch's check asks for; not yet run on a GPU)

and only at sizes like those it was measured at (M = 4096, K a multiple of 512),
because cuBLAS reads fp32 scales with 16-byte aligned leading dimensions:
  * K is rounded up to a multiple of 512 (Kt to a multiple of 4; zero columns, scale 1).
    cuBLAS reads 128x128 scales with a row stride of round_up(Kt, 4) (its scaling-factor
    layout docs; torch's check asks for that stride since pytorch#166752, earlier torch
    asked for Kt): K = 256 (Kt = 2) gave wrong results. With Kt a multiple of 4 the
    documented layout is both.
  * M is rounded up to a multiple of 16 (zero rows, sliced off the output): M is scale_a's
    leading dimension, and the bench's ragged M = 131 got CUBLAS_STATUS_NOT_SUPPORTED
    (our reading of that failure; to be confirmed on a GPU). N likewise (torch requires
    both dims of mat2 divisible by 16).
Zero columns add nothing to the product and padded rows are dropped, so padding changes
no value; at aligned sizes (the DeepSeek-V3 shapes) only the scales are copied.
Quantisation and the per-expert loops are the torch reference's.
"""

from __future__ import annotations

import torch

from . import fp8_torch as ref

K_ALIGN = 4 * ref.TILE  # Kt a multiple of 4: 16-byte rows of fp32 scales
M_ALIGN = 16
N_ALIGN = 16  # torch._scaled_mm: both dimensions of mat2 divisible by 16


def _require_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_cuda:
            raise RuntimeError(
                "fp8 backend 'cublas' needs CUDA tensors (torch._scaled_mm block scales); "
                "use backend='torch' on CPU"
            )


def _require_tile(tile: int) -> None:
    if tile != ref.TILE:
        raise ValueError(f"the cublas backend scales by 1x{ref.TILE} and {ref.TILE}x{ref.TILE} "
                         f"(torch._scaled_mm's block scaling), not by {tile}: use the triton "
                         "or torch backend for this plan's tiles")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _padded(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x (r, c) as a contiguous (rows, cols) tensor, zeros appended (x itself when it fits)."""
    if tuple(x.shape) == (rows, cols):
        return x.contiguous()
    out = torch.zeros((rows, cols), dtype=x.dtype, device=x.device)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _scale_buffer(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A fresh contiguous fp32 (rows, cols) tensor holding s in its top-left corner, 1 elsewhere
    (scales of padding tiles, which hold only zeros)."""
    out = torch.ones((rows, cols), dtype=torch.float32, device=s.device)
    out[: s.shape[0], : s.shape[1]] = s
    return out


def scaled_mm_operands(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mat1, mat2, scale_a, scale_b) for torch._scaled_mm computing a @ b^T padded to
    (M', N'), M' and N' rounded up to multiples of 16 (the layout: module docstring).

    a (M, K) fp8 with 1x128 scales a_s (M, Kt); b (N, K) fp8 (any strides) with 128x128
    scales (Nt, Kt) or 1x128 row scales (N, Kt)."""
    (m, k), n = a.shape, b.shape[0]
    m_pad, n_pad, k_pad = _round_up(m, M_ALIGN), _round_up(n, N_ALIGN), _round_up(k, K_ALIGN)
    kt = k_pad // ref.TILE
    mat1 = _padded(a, m_pad, k_pad)
    mat2 = _padded(b, n_pad, k_pad).t()
    scale_a = _scale_buffer(a_s.t(), kt, m_pad).t()  # column-major (M', Kt)
    if ref.b_scales_are_rowwise(b, b_s):
        scale_b = _scale_buffer(b_s.t(), kt, n_pad)  # contiguous (Kt, N')
    else:  # n_pad <= round_up(n, 128): the same Nt blocks
        scale_b = _scale_buffer(b_s, b_s.shape[0], kt).t()  # ws.t(), ws contiguous (Nt, Kt)
    return mat1, mat2, scale_a, scale_b


def gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    tile: int = ref.TILE,
) -> torch.Tensor:
    """out (M, N) = a @ b^T via torch._scaled_mm with 1x128 (a) and 128x128 or 1x128 (b) scales."""
    _require_tile(tile)
    _require_cuda(a, a_s, b, b_s)
    mat1, mat2, scale_a, scale_b = scaled_mm_operands(a, a_s, b, b_s)
    out = torch._scaled_mm(mat1, mat2, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return out[: a.shape[0], : b.shape[0]]


def grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    tile: int = ref.TILE,
) -> torch.Tensor:
    """A loop of block-scaled _scaled_mm calls, one per non-empty expert (the bench's baseline)."""
    return ref.grouped_gemm_by_expert(gemm, a, a_s, b, b_s, offsets, out_dtype, tile)


def grouped_gemm_wgrad(
    a_t: torch.Tensor,
    a_ts: torch.Tensor,
    b_t: torch.Tensor,
    b_ts: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    tile: int = ref.TILE,
) -> torch.Tensor:
    """Per-expert 1x128 x 1x128 _scaled_mm over each expert's token range."""
    return ref.grouped_gemm_wgrad_by_expert(gemm, a_t, a_ts, b_t, b_ts, offsets, out_dtype, tile)
