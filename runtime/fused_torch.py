"""Fused ops of the generated stage program: the torch reference numerics.

Each function here is one fusion group of the compiler's `fuse` pass (docs/program.md):
the memory-bound work around an FP8 boundary or an elementwise chain, computed in
plain torch. The generated Triton kernel module implements the same functions with
one kernel launch each (`compiler/codegen/templates/fused_*.py.jinja`) and is tested
against these; the generated program calls whichever backend the plan names.

Numerics follow the eager modules they replace (runtime/layers.py, attention.py,
moe.py): RMSNorm in fp32, rounded to the activation dtype, then quantised (so the
FP8 codes are those of the eager Linear's own quantisation); RoPE in fp32; routing
exactly as `moe.Router`. Where eager rounds an intermediate to bf16 only because it
is a separate op (SwiGLU's silu, the MoE combine's weighted terms) the fused op keeps
fp32 and rounds once.

Shape legend: T tokens (B x S flattened), K features of a normalised tensor, H heads,
P qk_nope_dim, R rotary dim, V v_dim, C kv latent, E experts, k top_k (slot index),
M routed slots (T x top_k, sorted by expert), I expert intermediate, D hidden.
Quantised outputs come as (q, s) 1 x tile row tiles and (qt, st) tile x 1 token tiles
(fp8_torch's layouts); `None` where not asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8_torch import (
    TILE,
    dequantize_act,
    quantize_act,
    quantize_act_t,
    quantize_act_t_grouped,
)

# the functions every fused-op backend provides (the generated kernel module too)
FUSED_PROTOCOL = (
    "rmsnorm_quant",
    "rmsnorm_bwd",
    "mla_rope_qkv",
    "mla_rope_qkv_bwd",
    "gqa_rope",
    "gqa_rope_bwd",
    "quantize_bhsd",
    "swiglu_bwd_quant",
    "router_topk",
    "router_bwd",
    "moe_combine",
    "moe_dispatch_bwd",
    "quantize_grouped",
)


def _quant(y, tile, ue8m0, rows, cols):
    q = s = qt = st = None
    if rows:
        q, s = quantize_act(y, tile, ue8m0)
    if cols:
        qt, st = quantize_act_t(y, tile, ue8m0)
    return q, s, qt, st


# ----------------------------------------------------------------------------- RMSNorm


def rmsnorm_quant(x, weight, eps, tile=TILE, ue8m0=False, *, out_dtype=torch.bfloat16,
                  want_y=False, rows=True, cols=False):
    """RMSNorm of x (T, K) in fp32, rounded to `out_dtype`, quantised.

    -> (y or None, q, s, qt, st, rstd (T,) fp32). x may be a column slice of a wider
    tensor (MLA's latent `kv[:, :C]`).
    """
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = F.rms_norm(xf, (x.shape[-1],), weight.to(torch.float32), eps).to(out_dtype)
    q, s, qt, st = _quant(y, tile, ue8m0, rows, cols)
    return (y if want_y else None), q, s, qt, st, rstd


def rmsnorm_bwd(x, rstd, weight, dy, tile=TILE, ue8m0=False, *, dres=None, extra=None,
                out_dtype=torch.bfloat16, want_dx=False, quant_dx=True, x_cols=False):
    """Backward of `rmsnorm_quant` fused with what follows it.

    dx = rstd (w dy) - x rstd^3 mean(w dy x) (+ dres, the residual stream's gradient),
    rounded to `out_dtype`; `extra` (T, R) columns are appended to dx before it is
    quantised (MLA: the rope key's gradient beside the latent's). x_cols: the normed x
    recomputed and quantised in token tiles, for the wgrad of the GEMMs it fed.
    -> (dx or None, dq, ds, dqt, dst, xt, xts, dw (K,) fp32).
    """
    xf, dyf = x.to(torch.float32), dy.to(torch.float32)
    wf = weight.to(torch.float32)
    r = rstd.unsqueeze(-1)
    wdy = wf * dyf
    dx = (r * wdy - xf * r.pow(3) * (wdy * xf).mean(-1, keepdim=True)).to(out_dtype)
    if dres is not None:  # the two gradients of the residual stream, summed as autograd does
        dx = (dx.to(torch.float32) + dres.to(out_dtype).to(torch.float32)).to(out_dtype)
    dw = (dyf * xf * r).sum(0)
    full = dx if extra is None else torch.cat([dx, extra.to(out_dtype)], dim=-1)
    dq = ds = dqt = dst = xt = xts = None
    if quant_dx:
        dq, ds, dqt, dst = _quant(full, tile, ue8m0, True, True)
    if x_cols:
        y = (xf * r * wf).to(out_dtype)
        xt, xts = quantize_act_t(y, tile, ue8m0)
    return (full if want_dx else None), dq, ds, dqt, dst, xt, xts, dw


# ----------------------------------------------------------------------------- RoPE


def _positions(t: int, seq_len: int, device) -> torch.Tensor:
    return torch.arange(t, device=device) % seq_len


def _rotate_pairs(x, cos, sin, inverse=False):
    """Interleaved-pair rotation of x (..., R) in fp32 by angles with cos/sin (..., R/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    if inverse:
        sin = -sin
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def _rotate_half(x, cos, sin, inverse=False):
    """Rotate-half rotation of x (..., d) in fp32 (LLaMA layout)."""
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    if inverse:
        sin = -sin
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)


def mla_rope_qkv(q, kvu, kv, cos, sin, seq_len, heads, nope, rope, vdim, latent):
    """MLA's attention inputs from the projections, one pass.

    q (T, H(P+R)) from q_b_proj, kvu (T, H(P+V)) from kv_b_proj, kv (T, C+R) from
    kv_a_proj (its last R columns are the shared rope key). RoPE (interleaved pairs,
    fp32, positions t mod seq_len) on q's last R of each head and on the key; the key
    is broadcast to every head. -> Q (T, H, P+R), K (T, H, P+R), V (T, H, V) contiguous.
    """
    t = q.shape[0]
    pos = _positions(t, seq_len, q.device)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # (T, 1, R/2)
    q3 = q.view(t, heads, nope + rope)
    q_pe = _rotate_pairs(q3[..., nope:].float(), c, s).to(q.dtype)
    Q = torch.cat([q3[..., :nope], q_pe], dim=-1)
    k_pe = _rotate_pairs(kv[:, latent:].float().unsqueeze(1), c, s).to(q.dtype)
    kvu3 = kvu.view(t, heads, nope + vdim)
    K = torch.cat([kvu3[..., :nope], k_pe.expand(t, heads, rope)], dim=-1)
    V = kvu3[..., nope:].contiguous()
    return Q.contiguous(), K.contiguous(), V


def mla_rope_qkv_bwd(dQ, dK, dV, cos, sin, seq_len, heads, nope, rope, vdim, tile=TILE,
                     ue8m0=False, *, out_dtype=torch.bfloat16):
    """Backward of `mla_rope_qkv`, the q and kv gradients quantised for their GEMMs.

    -> (dq q, s, qt, st) of dq (T, H(P+R)); (dkvu q, s, qt, st) of dkvu (T, H(P+V));
    dkpe (T, R) in `out_dtype` (the rope key's gradient, summed over heads).
    """
    t = dQ.shape[0]
    pos = _positions(t, seq_len, dQ.device)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    dq_pe = _rotate_pairs(dQ[..., nope:].float(), c, s, inverse=True).to(out_dtype)
    dq = torch.cat([dQ[..., :nope].to(out_dtype), dq_pe], dim=-1).reshape(t, -1)
    dkvu = torch.cat([dK[..., :nope], dV], dim=-1).to(out_dtype).reshape(t, -1)
    # the key's gradient summed over the heads it was broadcast to, rounded as that sum is
    dk_pe = dK[..., nope:].float().sum(1, keepdim=True).to(dK.dtype).float()
    dkpe = _rotate_pairs(dk_pe, c, s, inverse=True).squeeze(1).to(out_dtype)
    return (*_quant(dq, tile, ue8m0, True, True), *_quant(dkvu, tile, ue8m0, True, True), dkpe)


def gqa_rope(q, k, cos, sin, seq_len, heads, kv_heads, head_dim):
    """RoPE (rotate-half, fp32) on q (T, H d) and k (T, G d) -> Q (T, H, d), K (T, G, d)."""
    t = q.shape[0]
    pos = _positions(t, seq_len, q.device)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    Q = _rotate_half(q.view(t, heads, head_dim).float(), c, s).to(q.dtype)
    K = _rotate_half(k.view(t, kv_heads, head_dim).float(), c, s).to(k.dtype)
    return Q, K


def gqa_rope_bwd(dQ, dK, cos, sin, seq_len, tile=TILE, ue8m0=False, *,
                 out_dtype=torch.bfloat16, want_dx=False):
    """Backward of `gqa_rope`, quantised: -> (dq q, s, qt, st, dk q, s, qt, st, dq, dk)
    with dq (T, H d), dk (T, G d) themselves only when `want_dx` (q/k biases' gradients)."""
    t = dQ.shape[0]
    pos = _positions(t, seq_len, dQ.device)
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    dq = _rotate_half(dQ.float(), c, s, inverse=True).to(out_dtype).reshape(t, -1)
    dk = _rotate_half(dK.float(), c, s, inverse=True).to(out_dtype).reshape(t, -1)
    quant = (*_quant(dq, tile, ue8m0, True, True), *_quant(dk, tile, ue8m0, True, True))
    return (*quant, dq if want_dx else None, dk if want_dx else None)


# ----------------------------------------------------------------------------- attention output


def quantize_bhsd(o, tile=TILE, ue8m0=False, *, rows=True, cols=False):
    """Quantise the attention output o (B, H, S, V) as the (B S, H V) matrix o_proj reads,
    without writing that transposed copy. -> (q, s, qt, st)."""
    b, h, s, v = o.shape
    return _quant(o.transpose(1, 2).reshape(b * s, h * v), tile, ue8m0, rows, cols)


# ----------------------------------------------------------------------------- SwiGLU


def swiglu_bwd_quant(gate, up, dh, tile=TILE, ue8m0=False, *, offsets=None,
                     out_dtype=torch.bfloat16, round_dtype=None, gate_s=None, up_s=None,
                     row_scale=None):
    """Backward of h = silu(gate) up, quantised for the GEMMs on both sides.

    gate, up (M, I); dh (M, I). gate_s, up_s: gate and up are the FP8 codes of
    `swiglu_quant(keep_inputs=True)` with these 1 x tile scales, read as their fp32
    products (code x scale). dgate and dup rounded to `out_dtype`, each quantised in
    rows (their dgrad) and token tiles (their wgrad); h recomputed and quantised in token
    tiles (the wgrad of the projection it fed). Token tiles are grouped by expert when
    `offsets` is given (quantize_act_t_grouped's layout). round_dtype: the forward's
    silu(gate) and product, and the backward's two products, each rounded to it as the
    separate ops of the eager dense FFN round them (swiglu_quant's `round_dtype`).
    -> (dg q, s, qt, st, du q, s, qt, st, ht, hts).
    row_scale (M,) fp32: the forward was h' = w h (swiglu_quant's `row_scale`, a routed
    slot's gate w) and dh is h''s gradient: dg, du are those of w dh, ht quantises h'
    (the down projection's input), and a last output is each row's gate gradient
    sum_i dh h (fp32, M): -> (..., ht, hts, dw). Not with round_dtype.
    """
    if row_scale is not None and round_dtype is not None:
        raise ValueError("row_scale is for the routed experts' fp32 product, not round_dtype")
    if gate_s is not None:
        gate, up = dequantize_act(gate, gate_s, tile), dequantize_act(up, up_s, tile)
    g, u, d = gate.float(), up.float(), dh.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    dw = None
    if row_scale is not None:
        w = row_scale.float().reshape(-1, 1)
        dw = (d * (silu * u)).sum(-1)
        d = d * w
    if round_dtype is None:
        dg = (d * u * sig * (1 + g * (1 - sig))).to(out_dtype)
        du = (d * silu).to(out_dtype)
        h = silu * u
    else:
        rd = round_dtype
        silu = torch.nn.functional.silu(g).to(rd).float()
        d = d.to(rd).float()
        dsilu = (d * u).to(rd).float()
        du = (d * silu).to(rd).to(out_dtype)
        dg = (dsilu * sig * (1 + g * (1 - sig))).to(rd).to(out_dtype)
        h = (silu * u).to(rd)
    if row_scale is not None:
        h = h * w

    def both(y):
        q, s = quantize_act(y, tile, ue8m0)
        if offsets is None:
            return (q, s, *quantize_act_t(y, tile, ue8m0))
        return (q, s, *quantize_act_t_grouped(y, offsets, tile, ue8m0))

    ht = quantize_act_t(h, tile, ue8m0) if offsets is None else quantize_act_t_grouped(
        h, offsets, tile, ue8m0)
    out = (*both(dg), *both(du), *ht)
    return out if dw is None else (*out, dw)


# ----------------------------------------------------------------------------- routing


def router_topk(logits, bias, *, score, groups, top_groups, top_k, renormalize, route_scale):
    """DeepSeek-V3 routing from the router's logits (T, E), as `moe.Router`.

    -> (w (T, k) fp32 gate weights, idx (T, k) int64 by falling biased score, scores
    (T, E) fp32 unbiased, counts (E,) int64 tokens per expert).
    """
    logits = logits.float()
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    biased = scores + bias.to(torch.float32)
    t, e = biased.shape
    if groups > 1:
        per = biased.view(t, groups, e // groups)
        group_score = per.topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(top_groups, dim=-1).indices
        drop = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        biased = per.masked_fill(drop.unsqueeze(-1), float("-inf")).view(t, e)
    idx = biased.topk(top_k, dim=-1).indices
    w = scores.gather(1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    counts = torch.zeros(e, dtype=torch.long, device=idx.device).index_add_(
        0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.long, device=idx.device))
    return w * route_scale, idx, scores, counts


def router_bwd(dw, idx, scores, dscores=None, *, score, renormalize, route_scale):
    """Backward of `router_topk` to the logits: dw (T, k) -> dlogits (T, E) fp32.

    The bias only chooses (no gradient); `dscores` (T, E) adds a gradient that reached
    the scores directly (the sequence-wise auxiliary loss).
    """
    raw = scores.gather(1, idx)
    dwf = dw.float() * route_scale
    if renormalize:
        total = raw.sum(-1, keepdim=True)
        draw = dwf / total - (dwf * raw).sum(-1, keepdim=True) / total.pow(2)
    else:
        draw = dwf
    ds = torch.zeros_like(scores).scatter_add_(1, idx, draw)
    if dscores is not None:
        ds = ds + dscores.float()
    if score == "softmax":
        return scores * (ds - (ds * scores).sum(-1, keepdim=True))
    return ds * scores * (1 - scores)


# ----------------------------------------------------------------------------- MoE combine


def moe_combine(res, y, pos, shared=None, *, out_dtype=torch.bfloat16):
    """The MoE layer's output: res + (sum_k y[pos[t, k]] + shared).

    res (T, D) the residual stream, y (M, D) the routed experts' outputs in the route's
    slot order, already weighted by their gates (the experts apply them inside SwiGLU),
    pos (T, k) the row of y holding slot (t, k), shared (T, D) the shared experts' output
    (or None). Rounded as separate ops would round: the slots' sum (in fp32) to y's
    dtype, the shared add, the residual add.
    """
    yd = y.dtype
    mlp = y[pos].float().sum(1).to(yd)
    if shared is not None:
        mlp = (mlp.float() + shared.to(yd).float()).to(yd)
    return (res.float() + mlp.to(out_dtype).float()).to(out_dtype)


def moe_dispatch_bwd(dx, pos, extras=(), *, out_dtype=torch.bfloat16):
    """dn[t] = sum_k dx[pos[t, k]] (one rounding), then each of `extras` (T, D) added in
    turn, rounded after each add as autograd accumulates a tensor's gradients: the
    gradient of a token's normed input from its routed slots, the shared experts and
    the router. A fixed order, no atomics."""
    total = dx.float()[pos].sum(1).to(out_dtype)
    for e in extras:
        total = (total.float() + e.to(out_dtype).float()).to(out_dtype)
    return total


# ----------------------------------------------------------------------------- grouped tiles


def quantize_grouped(x, offsets, tile=TILE, ue8m0=False, *, index=None, div=1,
                     x_scales=None, rows=False, cols=True,
                     out_dtype=torch.bfloat16):
    """Rows of a routed layout (sorted by expert, `offsets` cumulative ends), quantised.

    Row m is x[index[m] // div] (a gather: `index` holds slot numbers, `div` slots per
    source row, e.g. top_k; x itself without `index`), dequantised with x_scales
    (1 x tile) when x is fp8 (rows an FP8 dispatch delivered). Each row is rounded to
    `out_dtype` (what a separate op would have written), then quantised: rows -> (q, s)
    1 x tile; cols -> (qt, st) in quantize_act_t_grouped's layout. -> (q, s, qt, st).
    """
    src_rows = None if index is None else torch.div(index, div, rounding_mode="floor")
    src = x if src_rows is None else x[src_rows]
    if x_scales is not None:
        scales = x_scales if src_rows is None else x_scales[src_rows]
        src = dequantize_act(src, scales, tile)
    src = src.float()
    src = src.to(out_dtype)
    q = s = qt = st = None
    if rows:
        q, s = quantize_act(src, tile, ue8m0)
    if cols:
        qt, st = quantize_act_t_grouped(src, offsets, tile, ue8m0)
    return q, s, qt, st
