"""FP8 torch emulation: the reference numerics every other backend is tested against.

Quantisation is exact and deterministic (the Triton kernels reproduce these scales
bit for bit); GEMMs dequantise to fp32 and multiply in fp32, which is what the
block-scaled kernels compute up to fp32 summation order.

Shape legend: M tokens, N output features, K input features (the contraction of
the forward GEMM), E experts; Mt/Nt/Kt = number of tile-wide tiles along that dim.
Every function takes the tile as an argument (the plan's `act_tile`; weight blocks are
tile x tile); TILE = 128 is DeepSeek-V3's, the default for direct callers.
Scale layouts (fp32 unless noted), shown for the 128 tile:
  activation 1x128 tiles along the last dim: x (..., K) -> s (..., Kt)
  token-axis tiles (wgrad): x (M, K) -> xt (K, M) fp8 with s (K, Mt)
  grouped token-axis tiles: expert e's tiles start at its first token rounded down to
      a multiple of 16 (`tile_origin`), so a tile's first column is 16-byte aligned for
      TMA; a tile holds only e's own tokens (the few before start_e belong to the
      previous expert and count for nothing here). Expert e's j-th tile sits at column
      e + tile_origin(start_e) // 128 + j of s (K, E + Mt); unused columns are 1.0
  weight 128x128 blocks: w (N, K) -> s (Nt, Kt)
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# amax floor: an all-zero tile gets scale 1e-30/448 (finite, positive) rather than 0 -> inf/NaN;
# it is the smallest amax for which both 448/amax and amax/448 stay normal fp32 numbers.
AMAX_FLOOR = 1e-30
TILE = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scales_from_amax(amax: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inverse scale) for fp32 amax values: scale = amax/448, or its power-of-two ceiling.

    Every backend must compute exactly these bits: amax floored at AMAX_FLOOR,
    `scale = amax / 448` and `inv = 448 / amax` in IEEE fp32; with ue8m0 the scale is
    rounded up to a power of two (so x * inv never exceeds 448) and inv = 1 / scale
    exactly.
    """
    amax = amax.to(torch.float32).clamp_min(AMAX_FLOOR)
    # Tensor / tensor on purpose: with a Python scalar on either side torch may multiply
    # by a reciprocal (448 * (1 / amax); on CUDA also amax * (1 / 448)), which is not the
    # correctly rounded quotient that the kernels' div_rn produces.
    fp8_max = torch.full_like(amax, FP8_MAX)
    scale = amax / fp8_max
    if not ue8m0:
        return scale, fp8_max / amax
    bits = scale.view(torch.int32)
    # Round a positive normal float up to a power of two: carry any mantissa bits into
    # the exponent, then clear the mantissa.
    pow2 = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return pow2, 1.0 / pow2


def _to_fp8(y: torch.Tensor) -> torch.Tensor:
    # Clamp first: float8_e4m3fn has no inf, so an out-of-range cast is not safe to rely on.
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_act(
    x: torch.Tensor, tile: int = TILE, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x (..., K) in 1 x tile tiles along the last dim -> (x_fp8 (..., K), s (..., Kt))."""
    k = x.shape[-1]
    kt = _cdiv(k, tile)
    xf = x.to(torch.float32)
    pad = kt * tile - k
    xp = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
    xp = xp.reshape(*x.shape[:-1], kt, tile)
    scale, inv = scales_from_amax(xp.abs().amax(dim=-1), ue8m0)
    q = _to_fp8(xp * inv.unsqueeze(-1)).reshape(*x.shape[:-1], kt * tile)
    return q[..., :k].contiguous(), scale


def quantize_act_t(
    x: torch.Tensor, tile: int = TILE, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-axis tiling for wgrad: x (M, K) -> (xt_fp8 (K, M), s (K, Mt)), tiles of `tile` tokens."""
    if x.dim() != 2:
        raise ValueError(f"quantize_act_t expects a 2-D (M, K) tensor, got shape {tuple(x.shape)}")
    return quantize_act(x.t(), tile, ue8m0)


def quantize_act_both(
    x: torch.Tensor, tile: int = TILE, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both tilings of x (M, K): (x_fp8, s (M, Kt), xt_fp8 (K, M), st (K, Mt))."""
    return (*quantize_act(x, tile, ue8m0), *quantize_act_t(x, tile, ue8m0))


def grouped_tile_columns(offsets: torch.Tensor, num_tokens: int, tile: int = TILE) -> int:
    """Columns of a grouped token-axis scale tensor: E + ceil(M / tile) (no host sync needed)."""
    return offsets.numel() + _cdiv(num_tokens, tile)


ALIGN = 16  # grouped token tiles start at a multiple of this many tokens (16 fp8 bytes)


def tile_origin(start: int) -> int:
    """Where an expert's first token tile starts: its first token rounded down to ALIGN."""
    return start - start % ALIGN


def quantize_act_t_grouped(
    x: torch.Tensor, offsets: torch.Tensor, tile: int = TILE, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-axis tiling per expert segment: x (M, K) sorted by expert, offsets (E,) cumulative ends.

    Tiles restart near each expert's first token (at `tile_origin`: no expert is padded)
    and hold only its tokens; see the module docstring for each tile's scale column.
    """
    m, k = x.shape
    num_cols = grouped_tile_columns(offsets, m, tile)
    xt = torch.zeros((k, m), dtype=FP8_DTYPE, device=x.device)
    st = torch.ones((k, num_cols), dtype=torch.float32, device=x.device)
    for e, start, end in expert_rows(offsets):
        origin = tile_origin(start)
        seg = torch.zeros((end - origin, k), dtype=x.dtype, device=x.device)
        seg[start - origin :] = x[start:end]  # the tokens before start count for nothing
        q, s = quantize_act(seg.t(), tile, ue8m0)
        xt[:, start:end] = q[:, start - origin :]
        base = e + origin // tile
        st[:, base : base + s.shape[1]] = s
    return xt, st


def quantize_weight(
    w: torch.Tensor, block: int = TILE, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise w (..., N, K) in block x block tiles -> (w_fp8 (..., N, K), s (..., Nt, Kt))."""
    *lead, n, k = w.shape
    nt, kt = _cdiv(n, block), _cdiv(k, block)
    wf = w.to(torch.float32)
    wp = torch.nn.functional.pad(wf, (0, kt * block - k, 0, nt * block - n))
    wp = wp.reshape(*lead, nt, block, kt, block)
    scale, inv = scales_from_amax(wp.abs().amax(dim=(-3, -1)), ue8m0)
    q = _to_fp8(wp * inv.unsqueeze(-1).unsqueeze(-3)).reshape(*lead, nt * block, kt * block)
    return q[..., :n, :k].contiguous(), scale


def dequantize_act(
    q: torch.Tensor, s: torch.Tensor, tile: int = TILE, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_act: q (..., K) fp8, s (..., Kt) -> (..., K)."""
    k = q.shape[-1]
    expanded = s.to(torch.float32).repeat_interleave(tile, dim=-1)[..., :k]
    return (q.to(torch.float32) * expanded).to(out_dtype)


def dequantize_weight(
    q: torch.Tensor, s: torch.Tensor, block: int = TILE, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_weight: q (..., N, K) fp8, s (..., Nt, Kt) -> (..., N, K)."""
    n, k = q.shape[-2:]
    expanded = s.to(torch.float32).repeat_interleave(block, dim=-2)[..., :n, :]
    expanded = expanded.repeat_interleave(block, dim=-1)[..., :k]
    return (q.to(torch.float32) * expanded).to(out_dtype)


def b_scales_are_rowwise(b: torch.Tensor, b_s: torch.Tensor, block: int = TILE) -> bool:
    """True if b_s holds 1 x block row scales (N, Kt), False for block x block (Nt, Kt).

    Unambiguous: the two shapes coincide only when N == 1, where they mean the same.
    """
    n = b.shape[-2]
    if b_s.shape[-2] == n:
        return True
    if b_s.shape[-2] == _cdiv(n, block):
        return False
    raise ValueError(
        f"b scales of shape {tuple(b_s.shape)} fit neither {block}x{block} blocks "
        f"({_cdiv(n, block)} rows) nor 1x{block} rows ({n} rows) of b {tuple(b.shape)}"
    )


def dequantize_b(b: torch.Tensor, b_s: torch.Tensor, block: int = TILE) -> torch.Tensor:
    """Dequantise a GEMM's b operand (N, K) given either row or block scales."""
    if b_scales_are_rowwise(b, b_s, block):
        return dequantize_act(b, b_s, block)
    return dequantize_weight(b, b_s, block)


def gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    tile: int = TILE,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (M, N) = dequant(a) @ dequant(b)^T in fp32, cast to out_dtype; scales of
    1 x tile (a, and b's rows for wgrad) or tile x tile (b's weight blocks). The
    epilogue then adds bias (N,) and residual (M, N), each rounded to out_dtype as the
    separate adds it replaces would be (so a fused program keeps the eager codes)."""
    a_f = dequantize_act(a, a_s, tile)
    b_f = dequantize_b(b, b_s, tile)
    return _epilogue(a_f @ b_f.t(), bias, residual, out_dtype)


def _epilogue(acc, bias, residual, out_dtype):
    y = acc.to(out_dtype)
    for add in (bias, residual):
        if add is not None:
            y = (y.to(torch.float32) + add.to(out_dtype).to(torch.float32)).to(out_dtype)
    return y


def expert_rows(offsets: torch.Tensor):
    """(expert, first row, end row) of every expert that has rows, from cumulative ends."""
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            yield e, start, end
        start = end


def grouped_gemm_by_expert(gemm_fn, a, a_s, b, b_s, offsets, out_dtype, tile=TILE):
    """Per-expert out[rows of e] = gemm_fn(a[rows of e], ..., b[e], b_s[e]): the grouped GEMM
    as a loop of plain GEMMs (the torch reference and the cuBLAS baseline share it)."""
    out = torch.zeros((a.shape[0], b.shape[-2]), dtype=out_dtype, device=a.device)
    for e, start, end in expert_rows(offsets):
        out[start:end] = gemm_fn(a[start:end], a_s[start:end], b[e], b_s[e], out_dtype, tile)
    return out


def grouped_gemm_wgrad_by_expert(gemm_fn, a_t, a_ts, b_t, b_ts, offsets, out_dtype, tile=TILE):
    """Per-expert out[e] = gemm_fn over expert e's token columns, each operand with its
    grouped token-axis scale columns (1 x tile each; see the module docstring)."""
    out = torch.zeros(
        (offsets.numel(), a_t.shape[0], b_t.shape[0]), dtype=out_dtype, device=a_t.device
    )
    for e, start, end in expert_rows(offsets):
        origin = tile_origin(start)
        cols = slice(e + origin // tile, e + origin // tile + _cdiv(end - origin, tile))
        # the expert's tiles from their origin, the tokens before its start zeroed
        a_e, b_e = (_from_origin(t, origin, start, end) for t in (a_t, b_t))
        out[e] = gemm_fn(a_e, a_ts[:, cols], b_e, b_ts[:, cols], out_dtype, tile)
    return out


def _from_origin(t: torch.Tensor, origin: int, start: int, end: int) -> torch.Tensor:
    """Columns origin..end of t (·, M) with those before start zeroed (fp8 copy)."""
    out = torch.zeros((t.shape[0], end - origin), dtype=t.dtype, device=t.device)
    out[:, start - origin :] = t[:, start:end]
    return out


def grouped_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    tile: int = TILE,
    *,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert out[rows of e] = a[rows of e] @ b[e]^T (+ residual[rows of e], added as
    `gemm`'s epilogue does); rows past offsets[-1] are zero."""
    out = grouped_gemm_by_expert(gemm, a, a_s, b, b_s, offsets, out_dtype, tile)
    if residual is not None:
        end = int(offsets[-1]) if offsets.numel() else 0
        out[:end] = _epilogue(out[:end], None, residual[:end], out_dtype)
    return out


def grouped_gemm_wgrad(
    a_t: torch.Tensor,
    a_ts: torch.Tensor,
    b_t: torch.Tensor,
    b_ts: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    tile: int = TILE,
) -> torch.Tensor:
    """Per-expert out[e] (N, K) = a_t[:, rows of e] @ b_t[:, rows of e]^T.

    a_t (N, M) and b_t (K, M) fp8 with grouped token-axis scales (quantize_act_t_grouped);
    b_t's scales are 1x128 rows, so `gemm` dequantises both operands alike.
    """
    return grouped_gemm_wgrad_by_expert(gemm, a_t, a_ts, b_t, b_ts, offsets, out_dtype, tile)


def swiglu_quant(
    gate: torch.Tensor, up: torch.Tensor, tile: int = TILE, ue8m0: bool = False, *,
    round_dtype: torch.dtype | None = None, keep_inputs: bool = False,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """silu(gate) * up in fp32, quantised in 1 x tile tiles -> (h_fp8, s).

    round_dtype: silu(gate) and the product are each rounded to it first, as two separate
    ops in that dtype would (the eager dense FFN's), so the codes are theirs.
    keep_inputs: gate and up quantised in 1 x tile tiles too, for the backward to keep in
    place of them (DeepSeek-V3's FP8 cache of SwiGLU's inputs) -> (h_fp8, s, gate_fp8,
    gate_s, up_fp8, up_s).
    row_scale (M,) fp32: each row's product times it before quantising (a routed slot's
    gate weight, applied on the expert's side; not with round_dtype)."""
    g = gate.to(torch.float32)
    if row_scale is not None and round_dtype is not None:
        raise ValueError("row_scale is for the routed experts' fp32 product, not round_dtype")
    if round_dtype is None:
        h = g * torch.sigmoid(g) * up.to(torch.float32)
        if row_scale is not None:
            h = h * row_scale.to(torch.float32).reshape(-1, 1)
        out = quantize_act(h, tile, ue8m0)
    else:
        silu = torch.nn.functional.silu(g).to(round_dtype).to(torch.float32)
        h = (silu * up.to(round_dtype).to(torch.float32)).to(round_dtype)
        out = quantize_act(h, tile, ue8m0)
    if keep_inputs:
        out = (*out, *quantize_act(gate, tile, ue8m0), *quantize_act(up, tile, ue8m0))
    return out
