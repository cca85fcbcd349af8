"""Autograd functions for FP8 linears: forward, dgrad and wgrad all as block-scaled FP8 GEMMs.

`ops` is a backend namespace (see fp8.py: the torch reference, cuBLAS or a generated
Triton kernel module); every function here is written once against it.

Shape legend: M tokens, K in features, N out features, E experts, I expert
intermediate size; `_fp8` suffix = float8_e4m3fn data, `_s` = its fp32 scales.
What is saved for backward is FP8 (the activation already re-tiled along tokens
and the quantised weight), as in DeepSeek-V3, not the bf16 input. `tile` is the
plan's activation tile (1 x tile per token; weights in tile x tile blocks), passed
to every quantisation and GEMM.
"""

from __future__ import annotations

import torch


class FP8Linear(torch.autograd.Function):
    """y = x W^T (+ b) with all three GEMMs in FP8."""

    @staticmethod
    def forward(ctx, x, weight, bias, tile, ue8m0, ops):
        k = x.shape[-1]
        x_MK = x.reshape(-1, k)
        need_wgrad = weight.requires_grad
        if need_wgrad:
            x_fp8, x_s, xt_fp8, xt_s = ops.quantize_act_both(x_MK, tile, ue8m0)
        else:
            x_fp8, x_s = ops.quantize_act(x_MK, tile, ue8m0)
            xt_fp8 = xt_s = None
        w_fp8, w_s = ops.quantize_weight(weight, tile, ue8m0)
        y_MN = ops.gemm(x_fp8, x_s, w_fp8, w_s, x.dtype, tile=tile)
        if bias is not None:
            y_MN = y_MN + bias.to(y_MN.dtype)
        ctx.save_for_backward(xt_fp8, xt_s, w_fp8, w_s)
        ctx.ops, ctx.ue8m0, ctx.need_wgrad, ctx.tile = ops, ue8m0, need_wgrad, tile
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y_MN.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xt_fp8, xt_s, w_fp8, w_s = ctx.saved_tensors
        ops, ue8m0, tile = ctx.ops, ctx.ue8m0, ctx.tile
        n = dy.shape[-1]
        dy_MN = dy.reshape(-1, n)
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1] and ctx.need_wgrad
        dx = dw = db = None
        if need_dx and need_dw:
            dy_fp8, dy_s, dyt_fp8, dyt_s = ops.quantize_act_both(dy_MN, tile, ue8m0)
        elif need_dx:
            dy_fp8, dy_s = ops.quantize_act(dy_MN, tile, ue8m0)
        elif need_dw:
            dyt_fp8, dyt_s = ops.quantize_act_t(dy_MN, tile, ue8m0)
        if need_dx:
            # dgrad: dX = dY W, i.e. b = W^T (K, N) with the weight blocks transposed.
            dx = ops.gemm(dy_fp8, dy_s, w_fp8.t(), w_s.t(), ctx.x_dtype, tile=tile)
            dx = dx.reshape(ctx.x_shape)
        if need_dw:
            # wgrad: dW = dY^T X, contracting over tokens with 1 x tile token-axis tiles on both.
            dw = ops.gemm(dyt_fp8, dyt_s, xt_fp8, xt_s, torch.float32, tile=tile).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_MN.to(torch.float32).sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


class FP8GroupedLinear(torch.autograd.Function):
    """Per-expert y[rows of e] = x[rows of e] W_e^T over a token layout sorted by expert."""

    @staticmethod
    def forward(ctx, x_MK, weight_ENK, offsets, tile, ue8m0, ops):
        x_fp8, x_s = ops.quantize_act(x_MK, tile, ue8m0)
        need_wgrad = weight_ENK.requires_grad
        xt_fp8 = xt_s = None
        if need_wgrad:
            xt_fp8, xt_s = ops.quantize_act_t_grouped(x_MK, offsets, tile, ue8m0)
        w_fp8, w_s = ops.quantize_weight(weight_ENK, tile, ue8m0)
        y_MN = ops.grouped_gemm(x_fp8, x_s, w_fp8, w_s, offsets, x_MK.dtype, tile=tile)
        ctx.save_for_backward(xt_fp8, xt_s, w_fp8, w_s, offsets)
        ctx.ops, ctx.ue8m0, ctx.need_wgrad, ctx.tile = ops, ue8m0, need_wgrad, tile
        ctx.x_dtype, ctx.w_dtype = x_MK.dtype, weight_ENK.dtype
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        xt_fp8, xt_s, w_fp8, w_s, offsets = ctx.saved_tensors
        ops, ue8m0, tile = ctx.ops, ctx.ue8m0, ctx.tile
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_fp8, dy_s = ops.quantize_act(dy_MN, tile, ue8m0)
            dx = ops.grouped_gemm(dy_fp8, dy_s, w_fp8.transpose(1, 2), w_s.transpose(1, 2), offsets,
                                  ctx.x_dtype, tile=tile)
        if ctx.needs_input_grad[1] and ctx.need_wgrad:
            dyt_fp8, dyt_s = ops.quantize_act_t_grouped(dy_MN, offsets, tile, ue8m0)
            dw = ops.grouped_gemm_wgrad(dyt_fp8, dyt_s, xt_fp8, xt_s, offsets, torch.float32,
                                        tile=tile)
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None, None, None


def _silu_grads(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor):
    """d(silu(g) * u) w.r.t. g and u, in fp32."""
    g32, u32, dh32 = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(g32)
    silu = g32 * sig
    dg = dh32 * u32 * sig * (1 + g32 * (1 - sig))
    du = dh32 * silu
    return dg, du


class FP8GroupedSwiGLUDown(torch.autograd.Function):
    """y = grouped_linear(silu(g) * u, w2) with SwiGLU fused into the quantisation of h.

    Saves g and u (not h); h is recomputed in backward for its token-axis tiles.
    """

    @staticmethod
    def forward(ctx, g_MI, u_MI, w2_ENI, offsets, tile, ue8m0, ops):
        h_fp8, h_s = ops.swiglu_quant(g_MI, u_MI, tile, ue8m0)
        w_fp8, w_s = ops.quantize_weight(w2_ENI, tile, ue8m0)
        y_MN = ops.grouped_gemm(h_fp8, h_s, w_fp8, w_s, offsets, g_MI.dtype, tile=tile)
        ctx.save_for_backward(g_MI, u_MI, w_fp8, w_s, offsets)
        ctx.ops, ctx.ue8m0, ctx.w_dtype, ctx.tile = ops, ue8m0, w2_ENI.dtype, tile
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        g, u, w_fp8, w_s, offsets = ctx.saved_tensors
        ops, ue8m0, tile = ctx.ops, ctx.ue8m0, ctx.tile
        dy_fp8, dy_s = ops.quantize_act(dy_MN, tile, ue8m0)
        dh = ops.grouped_gemm(dy_fp8, dy_s, w_fp8.transpose(1, 2), w_s.transpose(1, 2), offsets,
                              torch.float32, tile=tile)
        dg, du = _silu_grads(g, u, dh)
        dw = None
        if ctx.needs_input_grad[2]:
            h = torch.nn.functional.silu(g.float()) * u.float()
            ht_fp8, ht_s = ops.quantize_act_t_grouped(h, offsets, tile, ue8m0)
            dyt_fp8, dyt_s = ops.quantize_act_t_grouped(dy_MN, offsets, tile, ue8m0)
            dw = ops.grouped_gemm_wgrad(dyt_fp8, dyt_s, ht_fp8, ht_s, offsets, torch.float32,
                                        tile=tile)
            dw = dw.to(ctx.w_dtype)
        return dg.to(g.dtype), du.to(u.dtype), dw, None, None, None, None
