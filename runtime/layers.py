"""Building blocks: precision-aware linear, RMSNorm, RoPE (plain and YaRN), SwiGLU.

Parameters are kept in the master dtype (fp32); each op casts to the compute
dtype the plan gives it (`Precision`), so one module serves the fp32, bf16 and
FP8-emulation modes. RoPE follows DeepSeek-V3's public reference model
(`precompute_freqs_cis`, interleaved pairs for MLA); GQA uses the
rotate-half layout of Hugging Face LLaMA-style checkpoints.

Shape legend: B batch, S sequence, D hidden, H heads, R rotary dim, N out, K in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .plan import LinearFormat, Rope

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dtype_of(name: str) -> torch.dtype:
    """Plan dtype name -> torch dtype ("fp8_e4m3" computes through runtime.fp8)."""
    return _DTYPES[name]


class Linear(nn.Module):
    """y = x W^T (+ b) in the plan's format for this linear; output in the activation dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: LinearFormat,
        act_dtype,
        backend="torch",
        bias: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.fmt, self.act_dtype, self.backend = fmt, act_dtype, backend

    def forward(self, x_MK: torch.Tensor) -> torch.Tensor:
        if self.fmt.format == "fp8_e4m3":
            from .fp8 import fp8_linear

            x, w = x_MK, self.weight
            if self.fmt.pad:
                x, w = pad_to_tile(x, -1, self.fmt.act_tile), pad_to_tile(w, -1, self.fmt.act_tile)
            y = fp8_linear(x, w, self.bias, tile=self.fmt.act_tile, ue8m0=self.fmt.ue8m0,
                           backend=self.backend)
            return y.to(self.act_dtype)
        dt = _DTYPES[self.fmt.format]
        b = self.bias.to(dt) if self.bias is not None else None
        return F.linear(x_MK.to(dt), self.weight.to(dt), b).to(self.act_dtype)

    def dense_weight(self, dtype) -> torch.Tensor:
        """The weight (N, K) as this linear's GEMM sees it, in `dtype`: FP8 blocks quantised
        and dequantised (the absorbed MLA decode folds it into other products). Kept until
        the weight changes (its version counter moves with every in-place update)."""
        w = self.weight.detach()
        key = (dtype, self.weight._version, w.data_ptr(), w.device)
        memo = getattr(self, "_dense_memo", None)
        if memo is not None and memo[0] == key:
            return memo[1]
        if self.fmt.format == "fp8_e4m3":
            from .fp8 import dequantize_weight, quantize_weight

            # the torch backend's scales are every backend's, bit for bit (fp8.py)
            q, s = quantize_weight(w.float(), self.fmt.weight_block[0], self.fmt.ue8m0)
            out = dequantize_weight(q, s, self.fmt.weight_block[0]).to(dtype)
        else:
            out = w.to(_DTYPES[self.fmt.format]).to(dtype)
        self._dense_memo = (key, out)
        return out

    def extra_repr(self) -> str:
        bias = ", bias" if self.bias is not None else ""
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, {self.fmt.format}{bias}"


def pad_to_tile(t: torch.Tensor, dim: int, tile: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to a multiple of `tile` (`t` itself if it is one).

    Used on the K of FP8 GEMMs when the plan's format says `pad`: zero columns in both
    operands add nothing to the product and leave every tile's amax (so every scale)
    unchanged, so the padded GEMM equals the unpadded one while the kernels see whole
    tiles. Autograd slices the gradient back to the original width.
    """
    extra = -t.shape[dim] % tile
    if not extra:
        return t
    widths = [0, 0] * (t.dim() - dim % t.dim() - 1) + [0, extra]  # F.pad counts from the last dim
    return F.pad(t, widths)


def pad_swiglu_k(x_MD, w1_EID, w3_EID, w2_EDI, tile: int):
    """Zero-pad both Ks of routed SwiGLU experts (D of gate/up, I of down) to tile multiples.

    Padded gate/up rows give silu(0) * 0 = 0 in h's padded columns, which meet zero
    columns of down: the (M, D) output is the unpadded one.
    """
    w1, w3 = (pad_to_tile(pad_to_tile(w, -1, tile), -2, tile) for w in (w1_EID, w3_EID))
    return pad_to_tile(x_MD, -1, tile), w1, w3, pad_to_tile(w2_EDI, -1, tile)


class RMSNorm(nn.Module):
    """RMSNorm computed in the plan's `norm` dtype (fp32 by default)."""

    def __init__(self, dim: int, eps: float, compute_dtype, out_dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.compute_dtype, self.out_dtype = eps, compute_dtype, out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(self.compute_dtype)
        y = F.rms_norm(xf, (xf.shape[-1],), self.weight.to(self.compute_dtype), self.eps)
        return y.to(self.out_dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts."""

    def __init__(
        self,
        dim: int,
        inter: int,
        fmts: tuple[LinearFormat, LinearFormat, LinearFormat],
        act_dtype,
        backend,
    ):
        super().__init__()
        self.gate_proj = Linear(dim, inter, fmts[0], act_dtype, backend)
        self.up_proj = Linear(dim, inter, fmts[1], act_dtype, backend)
        self.down_proj = Linear(inter, dim, fmts[2], act_dtype, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -- rotary embeddings -------------------------------------------------------------------


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's `yarn_get_mscale`: 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_active(rope: Rope, max_seq_len: int) -> bool:
    """YaRN applies only past the original context, as in DeepSeek-V3's reference."""
    return rope.kind == "yarn" and max_seq_len > rope.original_max_seq


def yarn_softmax_mscale(rope: Rope, max_seq_len: int) -> float:
    """Factor on the attention softmax scale (squared by the caller): yarn_mscale(factor,
    mscale_all_dim) when YaRN applies (DeepSeek-V2/V3; mscale_all_dim defaults to mscale)."""
    if not yarn_active(rope, max_seq_len):
        return 1.0
    return yarn_mscale(rope.factor, rope.effective_mscale_all_dim)


def yarn_cos_sin_scale(rope: Rope, max_seq_len: int) -> float:
    """Factor on RoPE's cos/sin: yarn_mscale(mscale) / yarn_mscale(mscale_all_dim) when YaRN
    applies (DeepSeek-V2's rotary embedding); 1 when the two are equal (V2-Lite, V3)."""
    if not yarn_active(rope, max_seq_len):
        return 1.0
    m_all = yarn_mscale(rope.factor, rope.effective_mscale_all_dim)
    return yarn_mscale(rope.factor, rope.mscale) / m_all


def rope_frequencies(rope: Rope, rot_dim: int, max_seq_len: int) -> torch.Tensor:
    """Angles (max_seq_len, rot_dim/2) in fp32; YaRN blends interpolated and original
    frequencies when the model's context exceeds the original one."""
    freqs = 1.0 / (rope.theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    if yarn_active(rope, max_seq_len):

        def correction_dim(num_rotations: float) -> float:
            ratio = rope.original_max_seq / (num_rotations * 2 * math.pi)
            return rot_dim * math.log(ratio) / (2 * math.log(rope.theta))

        low = max(math.floor(correction_dim(rope.beta_fast)), 0)
        high = min(math.ceil(correction_dim(rope.beta_slow)), rot_dim - 1)
        if low == high:
            high += 0.001  # the reference's guard against a zero-width ramp
        ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / rope.factor * (1 - smooth) + freqs * smooth
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    return torch.outer(positions, freqs)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to (B, S, H, R) tensors; `interleaved` pairs (x0, x1), (x2, x3)... as
    DeepSeek's reference, else the rotate-half layout."""

    def __init__(self, rope: Rope, rot_dim: int, max_seq_len: int, interleaved: bool):
        super().__init__()
        angles_SR2 = rope_frequencies(rope, rot_dim, max_seq_len)
        scale = yarn_cos_sin_scale(rope, max_seq_len)
        self.register_buffer("cos_SR2", angles_SR2.cos() * scale, persistent=False)
        self.register_buffer("sin_SR2", angles_SR2.sin() * scale, persistent=False)
        self.interleaved = interleaved

    def forward(self, x_BSHR: torch.Tensor) -> torch.Tensor:
        s = x_BSHR.shape[1]
        return self._rotate(x_BSHR, self.cos_SR2[:s, None, :], self.sin_SR2[:s, None, :])

    def at(self, x_BSHR: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
        """RoPE at explicit positions (B, S): decoding, where row b's tokens sit at
        pos_BS[b] of its own sequence (`forward` is `at` with positions 0..S-1).
        Positions past the table are clamped to its end: only padding of a decode chunk
        lands there (generate.py checks every real position against max_seq_len)."""
        pos_BS = pos_BS.clamp(max=self.cos_SR2.shape[0] - 1)
        return self._rotate(x_BSHR, self.cos_SR2[pos_BS][:, :, None, :],
                            self.sin_SR2[pos_BS][:, :, None, :])

    def _rotate(self, x_BSHR, cos, sin) -> torch.Tensor:
        xf = x_BSHR.float()
        if self.interleaved:
            x0, x1 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        else:
            half = xf.shape[-1] // 2
            x0, x1 = xf[..., :half], xf[..., half:]
            out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.to(x_BSHR.dtype)
