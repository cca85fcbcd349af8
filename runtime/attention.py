"""Attention: multi-head latent attention (MLA, DeepSeek-V2/V3) and MHA/GQA.

Parameter names follow Hugging Face DeepSeek-V3 (`self_attn.q_a_proj`, ...) and
LLaMA (`q_proj`, `k_proj`, `v_proj`, `o_proj`), so checkpoints map 1:1. The
attention core (softmax(QK^T) V, causal) runs in the plan's `attention_core`
dtype through `F.scaled_dot_product_attention`.

Decoding (`forward_cached`) runs a chunk of new tokens over a `kv_cache.LayerCache`.
MLA caches the normalised latent and the rotated RoPE key only, and by default
attends with its up-projections *absorbed* (DeepSeek-V2 section 2.1.2, and
DeepSeek-V3's reference inference code): W_UK folds into the query, so the scores
are q_nope W_UK . c + q_pe . k_pe over the cached c itself, and W_UV applies after
the weighted sum of latents; no per-head key or value is formed. Unabsorbed, it
re-derives keys and values from the cached latent through `kv_b_proj`, as training
does. Both run the core in the `attention_core` dtype through
`F.scaled_dot_product_attention`, as MQA with one latent head when absorbed.

Shape legend: B batch, S sequence (new tokens when decoding), T cached positions,
D hidden, H heads, G kv heads, C kv latent (kv_lora_rank), Q q latent
(q_lora_rank), P qk_nope_dim, R qk_rope_dim, V v_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Linear, RMSNorm, RotaryEmbedding, dtype_of, yarn_softmax_mscale
from .plan import Attention, Model, Precision


def _core_cached(q_BHSd, k_BGTd, v_BGTd, mask_BST, scale: float, core_dtype) -> torch.Tensor:
    """Attention of new queries over cached keys (G kv heads shared by H // G query heads
    each, in order), visible keys as `mask_BST` says; output (B, H, S, d_v) in core_dtype."""
    h, g = q_BHSd.shape[1], k_BGTd.shape[1]
    if g != h:  # as training's GQA: query head i reads kv head i // (H / G)
        k_BGTd = k_BGTd.repeat_interleave(h // g, dim=1)
        v_BGTd = v_BGTd.repeat_interleave(h // g, dim=1)
    return F.scaled_dot_product_attention(
        q_BHSd.to(core_dtype), k_BGTd.to(core_dtype), v_BGTd.to(core_dtype),
        attn_mask=mask_BST.unsqueeze(1), scale=scale,
    )  # fmt: skip


def _core(q_BHSd, k_BHSd, v_BHSd, scale: float, core_dtype, out_dtype) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q_BHSd.to(core_dtype),
        k_BHSd.to(core_dtype),
        v_BHSd.to(core_dtype),
        is_causal=True,
        scale=scale,
    )
    return out.to(out_dtype)


class MLA(nn.Module):
    """Low-rank q (optional) and joint kv compression with a decoupled RoPE key."""

    def __init__(self, model: Model, spec: Attention, prec: Precision):
        super().__init__()
        act = dtype_of(prec.default)
        norm = dtype_of(prec.kept["norm"])
        be = prec.fp8_backend
        d, h = model.hidden, spec.heads
        self.spec, self.act_dtype = spec, act
        self.core_dtype = dtype_of(prec.kept["attention_core"])
        qk_dim = spec.qk_nope_dim + spec.qk_rope_dim
        if spec.q_lora_rank:
            self.q_a_proj = Linear(d, spec.q_lora_rank, prec.linear_for("q_a_proj"), act, be)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, model.norm_eps, norm, act)
            self.q_b_proj = Linear(
                spec.q_lora_rank, h * qk_dim, prec.linear_for("q_b_proj"), act, be
            )
        else:
            self.q_proj = Linear(d, h * qk_dim, prec.linear_for("q_proj"), act, be)
        kv_a_out = spec.kv_lora_rank + spec.qk_rope_dim
        self.kv_a_proj_with_mqa = Linear(
            d, kv_a_out, prec.linear_for("kv_a_proj_with_mqa"), act, be
        )
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank, model.norm_eps, norm, act)
        kv_b_out = h * (spec.qk_nope_dim + spec.v_dim)
        self.kv_b_proj = Linear(spec.kv_lora_rank, kv_b_out, prec.linear_for("kv_b_proj"), act, be)
        self.o_proj = Linear(h * spec.v_dim, d, prec.linear_for("o_proj"), act, be)
        self.rotary = RotaryEmbedding(
            model.rope, spec.qk_rope_dim, model.max_seq_len, interleaved=True
        )
        mscale = yarn_softmax_mscale(model.rope, model.max_seq_len)
        self.softmax_scale = qk_dim**-0.5 * mscale * mscale

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        sp = self.spec
        b, s, _ = x_BSD.shape
        h, p, r, v = sp.heads, sp.qk_nope_dim, sp.qk_rope_dim, sp.v_dim
        if sp.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        else:
            q = self.q_proj(x_BSD)
        q_BSHd = q.view(b, s, h, p + r)
        q_nope_BSHP, q_pe_BSHR = torch.split(q_BSHd, [p, r], dim=-1)
        q_pe_BSHR = self.rotary(q_pe_BSHR)
        kv = self.kv_a_proj_with_mqa(x_BSD)
        c_BSC, k_pe_BSR = torch.split(kv, [sp.kv_lora_rank, r], dim=-1)
        k_pe_BS1R = self.rotary(k_pe_BSR.unsqueeze(2))
        kv_BSHd = self.kv_b_proj(self.kv_a_layernorm(c_BSC)).view(b, s, h, p + v)
        k_nope_BSHP, v_BSHV = torch.split(kv_BSHd, [p, v], dim=-1)
        q_BSHd = torch.cat([q_nope_BSHP, q_pe_BSHR], dim=-1)
        k_BSHd = torch.cat([k_nope_BSHP, k_pe_BS1R.expand(b, s, h, r)], dim=-1)
        o_BHSV = _core(
            q_BSHd.transpose(1, 2), k_BSHd.transpose(1, 2), v_BSHV.transpose(1, 2),
            self.softmax_scale, self.core_dtype, self.act_dtype,
        )  # fmt: skip
        return self.o_proj(o_BHSV.transpose(1, 2).reshape(b, s, h * v))

    def forward_cached(self, x_BSD: torch.Tensor, cache, step) -> torch.Tensor:
        """New tokens x at `step.pos_BS`; caches their latent and RoPE key, attends over
        the row's cache (absorbed or not, `step.absorb`)."""
        sp = self.spec
        b, s, _ = x_BSD.shape
        h, p, r, v, c = sp.heads, sp.qk_nope_dim, sp.qk_rope_dim, sp.v_dim, sp.kv_lora_rank
        if sp.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        else:
            q = self.q_proj(x_BSD)
        q_nope_BSHP, q_pe_BSHR = torch.split(q.view(b, s, h, p + r), [p, r], dim=-1)
        q_pe_BSHR = self.rotary.at(q_pe_BSHR, step.pos_BS)
        c_BSC, k_pe_BSR = torch.split(self.kv_a_proj_with_mqa(x_BSD), [c, r], dim=-1)
        k_pe_BSR = self.rotary.at(k_pe_BSR.unsqueeze(2), step.pos_BS).squeeze(2)
        cache.write(step.pos_BS, latent=self.kv_a_layernorm(c_BSC), k_pe=k_pe_BSR)
        latent_BTC = cache.read("latent", step.keys)
        k_pe_BTR = cache.read("k_pe", step.keys)
        if step.absorb:
            cd = self.core_dtype
            w_HdC = self.kv_b_proj.dense_weight(cd).view(h, p + v, c)
            q_lat_BSHC = torch.einsum("bshp,hpc->bshc", q_nope_BSHP.to(cd), w_HdC[:, :p])
            q_BHSd = torch.cat([q_lat_BSHC, q_pe_BSHR.to(cd)], dim=-1).transpose(1, 2)
            k_B1Td = torch.cat([latent_BTC, k_pe_BTR], dim=-1).unsqueeze(1)
            o_BHSC = _core_cached(q_BHSd, k_B1Td, latent_BTC.unsqueeze(1), step.mask_BST,
                                  self.softmax_scale, cd)
            o_BSHV = torch.einsum("bhsc,hvc->bshv", o_BHSC, w_HdC[:, p:]).to(self.act_dtype)
        else:
            t = step.keys
            kv_BTHd = self.kv_b_proj(latent_BTC.to(self.act_dtype)).view(b, t, h, p + v)
            k_nope_BTHP, v_BTHV = torch.split(kv_BTHd, [p, v], dim=-1)
            k_BTHd = torch.cat([k_nope_BTHP, k_pe_BTR.unsqueeze(2).expand(b, t, h, r)], dim=-1)
            q_BSHd = torch.cat([q_nope_BSHP, q_pe_BSHR], dim=-1)
            o_BHSV = _core_cached(q_BSHd.transpose(1, 2), k_BTHd.transpose(1, 2),
                                  v_BTHV.transpose(1, 2), step.mask_BST, self.softmax_scale,
                                  self.core_dtype)
            o_BSHV = o_BHSV.transpose(1, 2).to(self.act_dtype)
        return self.o_proj(o_BSHV.reshape(b, s, h * v))


class GQA(nn.Module):
    """Grouped-query attention (multi-head when kv_heads == heads), RoPE on the full head;
    optional q/k/v biases (`qkv_bias`)."""

    def __init__(self, model: Model, spec: Attention, prec: Precision):
        super().__init__()
        act = dtype_of(prec.default)
        be = prec.fp8_backend
        d, h, g, hd = model.hidden, spec.heads, spec.kv_heads, spec.head_dim
        self.spec, self.act_dtype = spec, act
        self.core_dtype = dtype_of(prec.kept["attention_core"])
        bias = spec.qkv_bias  # Qwen2: q, k and v carry biases, o does not
        self.q_proj = Linear(d, h * hd, prec.linear_for("q_proj"), act, be, bias=bias)
        self.k_proj = Linear(d, g * hd, prec.linear_for("k_proj"), act, be, bias=bias)
        self.v_proj = Linear(d, g * hd, prec.linear_for("v_proj"), act, be, bias=bias)
        self.o_proj = Linear(h * hd, d, prec.linear_for("o_proj"), act, be)
        self.rotary = RotaryEmbedding(model.rope, hd, model.max_seq_len, interleaved=False)
        mscale = yarn_softmax_mscale(model.rope, model.max_seq_len)
        self.softmax_scale = hd**-0.5 * mscale * mscale

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        sp = self.spec
        b, s, _ = x_BSD.shape
        h, g, hd = sp.heads, sp.kv_heads, sp.head_dim
        q_BSHd = self.rotary(self.q_proj(x_BSD).view(b, s, h, hd))
        k_BSGd = self.rotary(self.k_proj(x_BSD).view(b, s, g, hd))
        v_BSGd = self.v_proj(x_BSD).view(b, s, g, hd)
        if g != h:
            k_BSGd = k_BSGd.repeat_interleave(h // g, dim=2)
            v_BSGd = v_BSGd.repeat_interleave(h // g, dim=2)
        o_BHSd = _core(
            q_BSHd.transpose(1, 2), k_BSGd.transpose(1, 2), v_BSGd.transpose(1, 2),
            self.softmax_scale, self.core_dtype, self.act_dtype,
        )  # fmt: skip
        return self.o_proj(o_BHSd.transpose(1, 2).reshape(b, s, h * hd))

    def forward_cached(self, x_BSD: torch.Tensor, cache, step) -> torch.Tensor:
        """New tokens at `step.pos_BS`: their rotated K and their V into the cache, then
        attention over the row's cached keys."""
        sp = self.spec
        b, s, _ = x_BSD.shape
        h, g, hd = sp.heads, sp.kv_heads, sp.head_dim
        q_BSHd = self.rotary.at(self.q_proj(x_BSD).view(b, s, h, hd), step.pos_BS)
        k_BSGd = self.rotary.at(self.k_proj(x_BSD).view(b, s, g, hd), step.pos_BS)
        cache.write(step.pos_BS, k=k_BSGd, v=self.v_proj(x_BSD).view(b, s, g, hd))
        k_BGTd = cache.read("k", step.keys).transpose(1, 2)
        v_BGTd = cache.read("v", step.keys).transpose(1, 2)
        o_BHSd = _core_cached(q_BSHd.transpose(1, 2), k_BGTd, v_BGTd, step.mask_BST,
                              self.softmax_scale, self.core_dtype)
        return self.o_proj(o_BHSd.transpose(1, 2).to(self.act_dtype).reshape(b, s, h * hd))


def build_attention(model: Model, spec: Attention, prec: Precision) -> nn.Module:
    return MLA(model, spec, prec) if spec.kind == "mla" else GQA(model, spec, prec)
