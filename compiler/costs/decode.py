"""Decode speed limit under expert parallelism (DeepSeek-V3 ISCA 2025 paper, section 2.3).

Each device holds `experts_per_device` experts and serves `tokens_per_device`
tokens; every token goes to top_k routed + the shared experts; dispatch sends
`dispatch_bytes` per element (FP8: 1), combine `combine_bytes` (BF16: 2). With
computation hidden, one communication stage moves

    (dispatch + combine) x tokens x experts per token x hidden  bytes

over the chosen link (`link = nic`: the NIC line rate, as the paper assumes;
`effective`: the network's achieved rate; `nvlink`: the NVLink line rate).
Dual micro-batch overlap makes a layer cost two stages; the output token costs
that for every layer (the paper counts all of them, dense ones included).
`decode.hidden` overrides the model's hidden size (the paper rounds 7168 to 7000).

The paper counts the shared expert as a ninth expert on another device
(`decode.a2a_bytes_per_token_layer`); dsvc's runtime computes it on the token's own
device, so what `dsvc generate --ep N` sends per token and MoE layer is top_k rows
out in the precision's dispatch dtype (FP8 with its fp32 scales, one per 1 x 128
tile) and top_k rows back in the combine dtype
(`decode.a2a_bytes_per_token_layer_runtime`, needing no decode block; the
self-addressed rows counted, as the paper's model has every expert remote).
"""

from __future__ import annotations

from .model import ModelCosts
from .symbols import Quantities, ceil_div


def decode_stage_time(bytes_dispatch, bytes_combine, tokens, experts_per_token, hidden, bandwidth):
    """Seconds of one dispatch + combine stage."""
    return (bytes_dispatch + bytes_combine) * tokens * experts_per_token * hidden / bandwidth


LABELS = {
    "comm_s_per_stage": ("communication per stage", "s"),
    "comm_s_per_layer": ("per layer (2 stages, dual micro-batch)", "s"),
    "tpot_s": ("time per output token", "s"),
    "tokens_per_s": ("tokens/s per sequence (upper bound)", "tok/s"),
}


def runtime_a2a_bytes(spec, q: Quantities, moe, hidden):
    """Bytes one token's dispatch and combine carry through one MoE layer in the runtime:
    top_k rows each way, the shared experts local. FP8 rows travel with one fp32 scale per
    1 x 128 tile (runtime/ep.py quantises with `quantize_act`, whose scales are fp32)."""
    from dsvc.dsl.spec import DTYPE_BYTES

    pol = spec.precision
    row_out = hidden * DTYPE_BYTES[pol.dispatch]
    if pol.dispatch.startswith("fp8"):
        row_out = row_out + 4 * ceil_div(hidden, pol.linear.act_tile[1])
    return moe.dims["k"] * (row_out + hidden * DTYPE_BYTES[pol.combine])


def decode_figures(spec, q: Quantities, costs: ModelCosts) -> None:
    """Record `decode.*` (all None when the model has no MoE or the spec no decode block)."""
    dec, c = spec.decode, spec.cluster
    moes = [p for p in costs.ffns.values() if p.kind == "moe"]
    if moes:
        widest = max(moes, key=lambda p: p.spec.top_k)
        q.figure("decode.a2a_bytes_per_token_layer_runtime",
                 "all-to-all per token and MoE layer, runtime (routed)", "B",
                 runtime_a2a_bytes(spec, q, widest, costs.d))
    if dec is None or c is None or not moes:
        why = "no decode block" if dec is None else "no cluster" if c is None else "no MoE layers"
        for key, (label, unit) in LABELS.items():
            q.figure(f"decode.{key}", label, unit, None, note=why)
        return
    moe = max(moes, key=lambda p: p.spec.top_k + p.spec.shared)
    if dec.hidden is not None:
        h = q.sym("h_dec", dec.hidden, "decode.hidden")
    else:
        h = costs.d
    if dec.link == "nic" and c.network is not None:
        bw = q.sym("B_nic", c.network.nic, "cluster.network.nic")
    elif dec.link == "effective" and c.network is not None:
        bw = q.sym("B_net", c.network.effective, "cluster.network.effective")
    else:  # nvlink, or a cluster without a network
        bw = q.sym("B_nvlink", c.nvlink.bandwidth, "cluster.nvlink.bandwidth")
    n_tok = q.sym("t_dev", dec.tokens_per_device, "decode.tokens_per_device")
    b_d = q.sym("b_disp", dec.dispatch_bytes, "decode.dispatch_bytes")
    b_c = q.sym("b_comb", dec.combine_bytes, "decode.combine_bytes")
    k, shared = moe.dims["k"], moe.dims["E_s"]
    q.figure("decode.a2a_bytes_per_token_layer",
             "all-to-all per token and MoE layer (paper, + shared)", "B",
             (b_d + b_c) * (k + shared) * h)
    stage = q.figure("decode.comm_s_per_stage", *LABELS["comm_s_per_stage"],
                     decode_stage_time(b_d, b_c, n_tok, k + shared, h, bw))
    layer = q.figure("decode.comm_s_per_layer", *LABELS["comm_s_per_layer"], 2 * stage)
    L = q.sym("L", spec.model.num_layers, "model.layers (all)")
    tpot = q.figure("decode.tpot_s", *LABELS["tpot_s"], L * layer)
    q.figure("decode.tokens_per_s", *LABELS["tokens_per_s"], 1 / tpot)
    q.figure("decode.experts_per_token", "experts per token (routed + shared)", "count",
             k + shared)
    q.figure("decode.devices", "devices for the routed experts", "count",
             -(-moe.spec.routed // dec.experts_per_device))
