"""FP8 numerics for the runtime: fine-grained quantisation, block-scaled GEMMs, FP8 linears.

DeepSeek-V3's recipe: e4m3 (max 448), activations in 1x128 tiles along the last dim,
weights in 128x128 blocks, scale = amax / 448 per tile in fp32 (or rounded up to a
power of two with `ue8m0=True`), all three GEMMs of a linear in FP8 with fp32
accumulation promoted every 128 elements of K.

Backends (`backend=` on every function):
  "torch"   emulation on any device: cast to float8_e4m3fn, dequantise, fp32 matmul.
            It is the reference: the other backends' scales equal its bits.
  "triton"  the generated kernel module registered with `use_kernels(path_or_module)` (a
            build's kernels/fp8_kernels.py, specialised to its spec's tiles and shapes).
  "cublas"  torch._scaled_mm with block scales (GPU); quantisers from "torch".
  a module  a generated kernel module object, used directly.

Public API (stable; shapes: M tokens, K in, N out, E experts, Xt = ceil(X/128)):
  quantize_act(x (..., K), tile=128, ue8m0=False) -> (x_fp8 (..., K), s (..., Kt))
  quantize_act_t(x (M, K), ...) -> (xt_fp8 (K, M), s (K, Mt))       token-axis tiles, wgrad
  quantize_act_both(x (M, K), ...) -> (x_fp8, s, xt_fp8, st)         both tilings, one read
  quantize_act_t_grouped(x (M, K), offsets (E,), ...) -> (xt_fp8 (K, M), s (K, E + Mt))
      token tiles restart at each expert's origin (start_e rounded down to 16, for
      16-byte aligned TMA loads); expert e's tile j is column e + origin_e//128 + j
  quantize_weight(w (..., N, K), block=128, ue8m0=False) -> (w_fp8, s (..., Nt, Kt))
  dequantize_act(q, s, tile=128, out_dtype=fp32), dequantize_weight(q, s, block=128, ...)
  fp8_gemm(a (M, K), a_s (M, Kt), b (N, K), b_s, out_dtype=bf16) -> a @ b^T (M, N)
      b_s is (Nt, Kt) for 128x128 weight blocks or (N, Kt) for 1x128 rows (wgrad);
      b may be a transposed view (dgrad passes w_fp8.t(), w_s.t()).
  fp8_grouped_gemm(a (M, K), a_s, b (E, N, K), b_s (E, Nt, Kt), offsets (E,), out_dtype)
      offsets are cumulative end rows per expert (torch._grouped_mm's `offs`), int32/64;
      rows at or past offsets[-1] come back zero.
  fp8_grouped_gemm_wgrad(a_t (N, M), a_ts, b_t (K, M), b_ts, offsets) -> (E, N, K)
  swiglu_quant(gate (M, I), up (M, I), tile=128, ue8m0=False) -> quantised silu(gate) * up
  fp8_linear(x, weight (N, K), bias=None, *, ue8m0=False, backend="torch") -> autograd
  fp8_grouped_linear(x_sorted (M, K), weight (E, N, K), offsets, *, ...) -> autograd (M, N)
  fp8_grouped_swiglu_ffn(x_sorted, w1 (E, I, K), w3 (E, I, K), w2 (E, K, I), offsets, *, ...)
      routed SwiGLU experts, SwiGLU fused into the quantisation of its output
  use_kernels(module_or_path_or_None), load_kernel_module(path)

amax = 0 gives scale 1e-30/448 (finite), never inf or NaN; values saturate at +-448.
Scales are equal across backends bit for bit; the generated kernels store activation
scales with consecutive rows adjacent (the layout torch._scaled_mm wants), so do not
assume a contiguous scale tensor (call .contiguous() where that matters).
"""

from __future__ import annotations

import types

import torch

from . import fp8_torch
from .fp8_autograd import FP8GroupedLinear, FP8GroupedSwiGLUDown, FP8Linear
from .fp8_torch import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, TILE
from .fp8_triton import PROTOCOL, load_kernel_module, use_kernels

__all__ = [
    "AMAX_FLOOR",
    "BACKENDS",
    "FP8_DTYPE",
    "FP8_MAX",
    "TILE",
    "dequantize_act",
    "dequantize_weight",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "fp8_grouped_gemm_wgrad",
    "fp8_grouped_linear",
    "fp8_grouped_swiglu_ffn",
    "fp8_linear",
    "load_kernel_module",
    "quantize_act",
    "quantize_act_both",
    "quantize_act_t",
    "quantize_act_t_grouped",
    "quantize_weight",
    "resolve_backend",
    "swiglu_quant",
    "use_kernels",
]

BACKENDS = ("torch", "triton", "cublas")


def _cublas_ops() -> types.SimpleNamespace:
    from . import fp8_cublas

    ops = {name: getattr(fp8_torch, name) for name in PROTOCOL}
    for name in ("gemm", "grouped_gemm", "grouped_gemm_wgrad"):
        ops[name] = getattr(fp8_cublas, name)
    return types.SimpleNamespace(**ops)


def resolve_backend(backend: str | types.ModuleType = "torch"):
    """The namespace of backend functions for a backend name or a kernel module."""
    if isinstance(backend, types.ModuleType):
        return backend
    if backend == "torch":
        return fp8_torch
    if backend == "triton":
        from .fp8_triton import kernel_module

        return kernel_module()
    if backend == "cublas":
        return _cublas_ops()
    raise ValueError(f"unknown fp8 backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _check_offsets(offsets: torch.Tensor, num_experts: int | None = None) -> None:
    if offsets.dim() != 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"offsets must be a 1-D int32/int64 tensor of cumulative expert ends, got "
            f"{offsets.dtype} of shape {tuple(offsets.shape)}"
        )
    if num_experts is not None and offsets.numel() != num_experts:
        raise ValueError(f"offsets has {offsets.numel()} entries for {num_experts} experts")


def quantize_act(x, tile=TILE, ue8m0=False, *, backend="torch"):
    """1 x tile activation quantisation along the last dim -> (x_fp8, scales)."""
    return resolve_backend(backend).quantize_act(x, tile, ue8m0)


def quantize_act_t(x, tile=TILE, ue8m0=False, *, backend="torch"):
    """Token-axis (tile x 1) quantisation of x (M, K) -> (xt_fp8 (K, M), scales (K, Mt))."""
    return resolve_backend(backend).quantize_act_t(x, tile, ue8m0)


def quantize_act_both(x, tile=TILE, ue8m0=False, *, backend="torch"):
    """Both activation tilings of x (M, K) from one read -> (x_fp8, s, xt_fp8, st)."""
    return resolve_backend(backend).quantize_act_both(x, tile, ue8m0)


def quantize_act_t_grouped(x, offsets, tile=TILE, ue8m0=False, *, backend="torch"):
    """Token-axis tiles restarting at each expert's origin (see module docstring)."""
    _check_offsets(offsets)
    return resolve_backend(backend).quantize_act_t_grouped(x, offsets, tile, ue8m0)


def quantize_weight(w, block=TILE, ue8m0=False, *, backend="torch"):
    """block x block weight quantisation of w (..., N, K) -> (w_fp8, scales (..., Nt, Kt))."""
    return resolve_backend(backend).quantize_weight(w, block, ue8m0)


def dequantize_act(q, s, tile=TILE, out_dtype=torch.float32, *, backend="torch"):
    """Inverse of quantize_act."""
    return resolve_backend(backend).dequantize_act(q, s, tile, out_dtype)


def dequantize_weight(q, s, block=TILE, out_dtype=torch.float32, *, backend="torch"):
    """Inverse of quantize_weight."""
    return resolve_backend(backend).dequantize_weight(q, s, block, out_dtype)


def fp8_gemm(a, a_s, b, b_s, out_dtype=torch.bfloat16, backend="torch", *, tile=TILE):
    """Block-scaled a @ b^T with fp32 accumulation -> (M, N) in out_dtype."""
    return resolve_backend(backend).gemm(a, a_s, b, b_s, out_dtype, tile=tile)


def fp8_grouped_gemm(a, a_s, b, b_s, offsets, out_dtype=torch.bfloat16, backend="torch", *,
                     tile=TILE):
    """Per-expert block-scaled GEMM over a contiguous token layout -> (M, N)."""
    _check_offsets(offsets, b.shape[0])
    return resolve_backend(backend).grouped_gemm(a, a_s, b, b_s, offsets, out_dtype, tile=tile)


def fp8_grouped_gemm_wgrad(a_t, a_ts, b_t, b_ts, offsets, out_dtype=torch.float32, backend="torch",
                           *, tile=TILE):
    """Per-expert a_t[:, rows] @ b_t[:, rows]^T over token ranges -> (E, N, K)."""
    _check_offsets(offsets)
    return resolve_backend(backend).grouped_gemm_wgrad(a_t, a_ts, b_t, b_ts, offsets, out_dtype,
                                                       tile=tile)


def swiglu_quant(gate, up, tile=TILE, ue8m0=False, *, backend="torch"):
    """silu(gate) * up quantised in 1 x tile tiles -> (h_fp8, scales)."""
    return resolve_backend(backend).swiglu_quant(gate, up, tile, ue8m0)


def fp8_linear(x, weight, bias=None, *, tile=TILE, ue8m0=False, backend="torch"):
    """FP8 nn.Linear: y = x W^T + b; forward, dgrad and wgrad as block-scaled FP8 GEMMs.

    x (..., K) in any float dtype (y and dx come back in it); weight (N, K) (dW in its
    dtype, computed in fp32); bias (N,) optional; 1 x tile activation tiles, tile x tile
    weight blocks (the plan's `act_tile`).
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"fp8_linear: x has {x.shape[-1]} input features, weight {tuple(weight.shape)} expects "
            f"{weight.shape[-1]}"
        )
    return FP8Linear.apply(x, weight, bias, tile, ue8m0, resolve_backend(backend))


def fp8_grouped_linear(x_sorted, weight, offsets, *, tile=TILE, ue8m0=False, backend="torch"):
    """Routed-expert linear: rows of expert e (by `offsets`) times weight[e]^T, with autograd.

    x_sorted (M, K) tokens sorted by expert; weight (E, N, K); offsets (E,) cumulative ends.
    """
    _check_offsets(offsets, weight.shape[0])
    if x_sorted.dim() != 2 or x_sorted.shape[1] != weight.shape[2]:
        raise ValueError(
            f"fp8_grouped_linear: x_sorted {tuple(x_sorted.shape)} does not match weight "
            f"{tuple(weight.shape)} (expected (M, {weight.shape[2]}))"
        )
    return FP8GroupedLinear.apply(x_sorted, weight, offsets, tile, ue8m0, resolve_backend(backend))


def fp8_grouped_swiglu_ffn(x_sorted, w1, w3, w2, offsets, *, tile=TILE, ue8m0=False,
                           backend="torch"):
    """Routed SwiGLU experts: (silu(x W1_e^T) * (x W3_e^T)) W2_e^T, every GEMM in FP8.

    w1, w3 (E, I, K) gate and up; w2 (E, K, I) down. SwiGLU is fused with the
    quantisation of its output on the way into the down projection.
    """
    ops = resolve_backend(backend)
    gate = fp8_grouped_linear(x_sorted, w1, offsets, tile=tile, ue8m0=ue8m0, backend=ops)
    up = fp8_grouped_linear(x_sorted, w3, offsets, tile=tile, ue8m0=ue8m0, backend=ops)
    return FP8GroupedSwiGLUDown.apply(gate, up, w2, offsets, tile, ue8m0, ops)
