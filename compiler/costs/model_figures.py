"""The model section of the report: parameters, KV cache and FLOPs, as named formulas.

Per attention / FFN definition it names P_<name> (parameters), Pa_<name> (active,
MoE only) and F_<name> (training FLOPs per token, causal); totals are written in
those names and the layer counts (L_<kind>, or L), so `--symbolic` prints
`P_emb + P_head + L_dense*(P_dense + P_mla) + L_moe*(P_mla + P_moe)`.
"""

from __future__ import annotations

from .model import ModelCosts, train_flops
from .symbols import Quantities, ssum


def model_figures(spec, q: Quantities, c: ModelCosts) -> None:
    """Record `model.*` in `q`; fills `c.params_of` with the per-piece parameter symbols."""
    from dsvc.dsl.spec import DTYPE_BYTES

    P, Pa, F = {}, {}, {}
    for group, pieces in (("attention", c.attentions), ("ffn", c.ffns)):
        for name, piece in pieces.items():
            base = f"model.{group}.{name}"
            P[name, group] = q.let(q.fresh(f"P_{name}"), piece.params,
                                   f"parameters of one {name} {group}")
            q.figure(f"{base}.params", f"{group} '{name}' params per layer", "params",
                     P[name, group])
            Pa[name, group] = P[name, group]
            if piece.kind == "moe":
                Pa[name, group] = q.let(q.fresh(f"Pa_{name}"), piece.active,
                                        f"parameters of one {name} ffn touched per token")
                q.figure(f"{base}.params_active", f"ffn '{name}' active params per layer",
                         "params", Pa[name, group])
                q.figure(f"{base}.params_routed", f"ffn '{name}' routed-expert params", "params",
                         piece.expert_params)
                one = [lin for lin in piece.linears if lin.expert]
                q.figure(f"{base}.params_per_expert", f"ffn '{name}' params of one expert",
                         "params", ssum(lin.n_in * lin.n_out for lin in one))
            F[name, group] = q.let(q.fresh(f"F_{name}"), piece.train_flops(True),
                                   f"training FLOPs per token of one {name} {group}, causal")
    P_emb = q.let("P_emb", c.embedding.params, "embedding parameters")
    P_head = q.let("P_head", c.head.params, "final norm + output head parameters")
    c.params_of.update({f"{group}.{name}": sym for (name, group), sym in P.items()})
    c.params_of.update(embedding=P_emb, head=P_head)

    def per_layer(fn):
        return ssum(k.count * fn(k) for k in c.kinds)

    total = P_emb + P_head + per_layer(lambda k: P[k.attention.name, "attention"]
                                       + P[k.ffn.name, "ffn"])
    active = P_emb + P_head + per_layer(lambda k: Pa[k.attention.name, "attention"]
                                        + Pa[k.ffn.name, "ffn"])
    q.figure("model.params_total", "parameters, total (main model)", "params", total)
    total = q.let("P_total", total, "parameters of the main model")
    q.figure("model.params_active", "parameters active per token (incl. embedding and head)",
             "params", active)
    q.figure("model.params_active_nonembedding", "parameters active per token, no embedding",
             "params", active - P_emb)
    q.figure("model.params_embedding", "embedding parameters", "params", P_emb)
    q.figure("model.params_head", "output head parameters (incl. final norm)", "params", P_head)
    mtp = 0
    if c.mtp is not None:
        blk = c.mtp_block
        mtp = c.mtp_depth * (c.mtp.params + P[blk.attention.name, "attention"]
                             + P[blk.ffn.name, "ffn"])
    q.figure("model.params_mtp", "MTP modules' own parameters (embedding, head shared)",
             "params", mtp)
    q.figure("model.params_with_mtp", "parameters with MTP (the checkpoint, shared embedding)",
             "params", total + mtp)

    kv_bytes = DTYPE_BYTES[spec.precision.dtype_of("attention_core")]
    per_att = c.layers_of_attention
    kv = ssum(n * c.attentions[a].kv_elements for a, n in per_att.items()) * kv_bytes
    q.figure("model.kv_cache_bytes_per_token", "KV cache per token", "B", kv)
    kv_mtp = 0
    if c.mtp is not None:  # speculative decoding caches each MTP block's attention too
        kv_mtp = c.mtp_depth * c.attentions[c.mtp_block.attention.name].kv_elements * kv_bytes
    q.figure("model.kv_cache_bytes_per_token_mtp", "KV cache per token, MTP modules (beside it)",
             "B", kv_mtp)

    head_mm = c.head.matmul_active
    flops = 6 * head_mm + per_layer(lambda k: F[k.attention.name, "attention"]
                                    + F[k.ffn.name, "ffn"])
    core = ssum(n * 3 * c.attentions[a].core_flops for a, n in per_att.items())
    extra = ssum(n * 3 * (c.attentions[a].core_flops_full - c.attentions[a].core_flops)
                 for a, n in per_att.items())
    q.figure("model.train_flops_per_token", "training FLOPs per token (causal)", "FLOP", flops)
    flops = q.let("F_token", flops, "training FLOPs per token, causal")
    q.figure("model.train_flops_per_token_matmul", "  of which matmuls (6 x params)", "FLOP",
             flops - core)
    q.figure("model.train_flops_per_token_attention", "  of which attention core (causal)",
             "FLOP", core)
    q.figure("model.train_flops_per_token_noncausal", "training FLOPs per token (non-causal)",
             "FLOP", flops + extra)
    q.let("F_token_nc", flops + extra, "training FLOPs per token, non-causal")
    if c.mtp is not None:
        blk = c.mtp_block
        q.figure("model.train_flops_per_token_mtp", "MTP training FLOPs per token (extra)",
                 "FLOP", c.mtp_depth * (train_flops(c.mtp.matmul_active + head_mm, 0)
                                        + F[blk.attention.name, "attention"]
                                        + F[blk.ffn.name, "ffn"]))
    for k in c.kinds:
        base = f"model.layers.{k.key}"
        q.figure(f"{base}.count", f"layers {k.key}", "count", k.count)
        q.figure(f"{base}.params", f"layers {k.key}: params, all", "params",
                 k.count * (P[k.attention.name, "attention"] + P[k.ffn.name, "ffn"]))
        q.figure(f"{base}.params_active", f"layers {k.key}: active params, all", "params",
                 k.count * (Pa[k.attention.name, "attention"] + Pa[k.ffn.name, "ffn"]))
        q.figure(f"{base}.train_flops_per_token", f"layers {k.key}: training FLOPs/token",
                 "FLOP", k.count * (F[k.attention.name, "attention"] + F[k.ffn.name, "ffn"]))
