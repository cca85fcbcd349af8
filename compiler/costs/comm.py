"""Communication per training step and per GPU: EP all-to-all, PP send/recv, DP collectives.

Expert parallelism (per MoE layer and micro-batch, forward + backward): every
token is dispatched to its k routed experts and their outputs combined back.
Forward dispatch and the backward's gradient dispatch travel in the policy's
`dispatch` dtype (FP8 + 1 x 128 scales for DeepSeek-V3), forward combine and
its backward in `combine` (BF16), as in DeepSeek-V3 section 3.3. Routing is
taken as uniform over experts (balanced), the hottest EP rank scaled by the
expert-load imbalance when a histogram is given.

An NVLink domain (8 GPUs of a node, or 72 in an NVL72 rack) is where traffic
is cheap. Node-limited routing sends a token to experts on at most
`top_groups` groups (nodes); with `two_hop` it crosses IB once per target node
(to the GPU of the same local rank) and is forwarded on NVLink to the experts
there, instead of once per expert. Expected copies per token:

* nodes reached R = min(n (1 - (1 - 1/n)^k), cap), n = domains the EP group
  spans, cap = min(n, top_groups x max(1, n / groups)) when routing is node
  limited, else n;
* IB copies: R (1 - 1/n) with two-hop, k (1 - 1/n) without;
* NVLink copies: k (1 - 1/g) with two-hop (g = EP ranks per domain), else that
  for the token's own domain only, k/n (1 - 1/g).

IB and NVLink run concurrently: an all-to-all takes the longer of the two.
PP: each micro-batch's hidden state (default dtype) crosses each stage
boundary forward, its gradient backward. DP per step: ring reduce-scatter of
the gradients and all-gather of the updated weights (default dtype) for ZeRO
1/2, all-reduce for ZeRO 0, plus a second all-gather for ZeRO 3; non-expert
weights over DP, routed experts over DP / EP. Times use the effective
bandwidths; groups that span NVLink domains run at the network's.
"""

from __future__ import annotations

from dsvc.dsl.spec import DTYPE_BYTES

from .layout import ParallelDims, StageContents
from .memory import dispatch_element_bytes, stage_pieces
from .model import ModelCosts
from .symbols import Quantities, smax, smin


def routing_copies(k, E_groups: int, top_groups: int, EP: int, domain: int, two_hop: bool):
    """(nodes reached, IB copies, NVLink copies, IB copies if sent once per expert) per token.

    `k` may be a symbol; the plan sizes are numbers. `domain` is the NVLink domain size.
    """
    if EP <= 1:
        return 0, 0, 0, 0
    g = min(EP, domain)
    n = -(-EP // domain)
    if n == 1:
        return 1, 0, k * (1 - 1 / g), 0
    uniform = n * (1 - (1 - 1 / n) ** k)
    limited = E_groups > 1 and top_groups < E_groups
    cap = min(n, top_groups * max(1, n / E_groups)) if limited else n
    reached = smin(uniform, cap)
    per_expert = k * (1 - 1 / n)
    if two_hop:
        return reached, reached * (1 - 1 / n), k * (1 - 1 / g), per_expert
    return reached, per_expert, k / n * (1 - 1 / g), per_expert


class CommModel:
    """Bytes and times of one device's communication, per stage and per step."""

    def __init__(self, spec, q: Quantities, costs: ModelCosts, pd: ParallelDims, imbalance=1):
        self.spec, self.q, self.costs, self.pd, self.f = spec, q, costs, pd, imbalance
        c, p, pr = spec.cluster, spec.parallel, spec.precision
        domain = c.nvlink.domain
        self.spans_domains = pd.world > domain
        net = c.network
        self.bw_nv = q.sym("B_nvl", c.nvlink.effective, "cluster.nvlink.effective")
        self.bw_net = (q.sym("B_net", net.effective, "cluster.network.effective")
                       if net is not None else self.bw_nv)
        self.b_disp = dispatch_element_bytes(pr)
        self.b_comb = DTYPE_BYTES[pr.combine]
        self.a = DTYPE_BYTES[pr.default]
        self.routing = {}
        for piece in costs.ffns.values():
            if piece.kind == "moe":
                m = piece.spec
                self.routing[piece.key] = routing_copies(piece.dims["k"], m.groups, m.top_groups,
                                                         p.expert, domain, p.two_hop)

    # ------------------------------------------------------------- EP
    def ep_layer(self, piece):
        """(dispatch bytes, combine bytes, IB bytes, NVLink bytes) per MoE layer and
        micro-batch on the hottest EP rank, forward + backward."""
        _, ib, nv, _ = self.routing[piece.key]
        per_copy = 2 * self.f * self.pd.T * piece.dims["d"]  # x2: forward and backward
        disp = per_copy * (ib + nv) * self.b_disp
        comb = per_copy * (ib + nv) * self.b_comb
        return disp, comb, per_copy * ib * (self.b_disp + self.b_comb), \
            per_copy * nv * (self.b_disp + self.b_comb)

    def ep_time(self, ib_bytes, nv_bytes):
        return smax(ib_bytes / self.bw_net, nv_bytes / self.bw_nv)

    def stage_ep(self, stage: StageContents) -> dict:
        """EP bytes and time per micro-batch through `stage`."""
        out = {"dispatch": 0, "combine": 0, "ib": 0, "nvlink": 0, "time": 0}
        tied = self.spec.model.tie_embeddings
        for piece, n in stage_pieces(stage, self.costs, tied).values():
            if piece.kind != "moe":
                continue
            disp, comb, ib, nv = self.ep_layer(piece)
            out["dispatch"] += n * disp
            out["combine"] += n * comb
            out["ib"] += n * ib
            out["nvlink"] += n * nv
            out["time"] += n * self.ep_time(ib, nv)
        return out

    # ------------------------------------------------------------- PP, DP
    def stage_pp_bytes(self, stage: StageContents):
        """Bytes a stage sends per micro-batch: activations forward, gradients backward."""
        sends = (0 if stage.head else 1) + (0 if stage.embedding else 1)
        return sends * self.pd.T * self.costs.d * self.a

    def dp_bytes(self, stages) -> tuple:
        """(non-expert, expert) bytes one GPU sends in the step's DP collectives."""
        pd, pr = self.pd, self.spec.precision
        dense = expert = 0
        for st in stages:
            for piece, n in stage_pieces(st, self.costs, self.spec.model.tie_embeddings).values():
                pe = piece.expert_params
                dense = dense + n * (piece.params - pe)
                expert = expert + n * pe / pd.EP
        g, a = DTYPE_BYTES[pr.grads], self.a
        per_param = {0: 2 * g, 1: g + a, 2: g + a, 3: g + 2 * a}[pd.zero]
        ring_d = (pd.DP - 1) / pd.DP
        ring_e = (pd.EDP - 1) / pd.EDP
        return dense * per_param * ring_d, expert * per_param * ring_e

    def link(self, crosses_domains: bool):
        return self.bw_net if crosses_domains else self.bw_nv

    def device(self, stages) -> dict:
        """Per-step bytes and times of one device."""
        disp = comb = ib = nv = ep_t = pp = 0
        for st in stages:
            e = self.stage_ep(st)
            m = st.micro_batches
            disp, comb = disp + m * e["dispatch"], comb + m * e["combine"]
            ib, nv, ep_t = ib + m * e["ib"], nv + m * e["nvlink"], ep_t + m * e["time"]
            pp = pp + m * self.stage_pp_bytes(st)
        dp_d, dp_e = self.dp_bytes(stages)
        dp_cross = self.spec.parallel.data > self.spec.cluster.nvlink.domain
        pp_t = pp / self.link(self.spans_domains)
        dp_t = (dp_d + dp_e) / self.link(dp_cross)
        return {"ep_dispatch_bytes": disp, "ep_combine_bytes": comb, "ep_ib_bytes": ib,
                "ep_nvlink_bytes": nv, "ep_time_s": ep_t, "pp_bytes": pp, "pp_time_s": pp_t,
                "dp_bytes": dp_d + dp_e, "dp_time_s": dp_t,
                "total_bytes": disp + comb + pp + dp_d + dp_e,
                "total_time_s": ep_t + pp_t + dp_t}


LABELS = {
    "ep_dispatch_bytes": "EP dispatch (fwd + bwd)", "ep_combine_bytes": "EP combine (fwd + bwd)",
    "ep_ib_bytes": "  of which over the network", "ep_nvlink_bytes": "  of which over NVLink",
    "ep_time_s": "EP all-to-all time", "pp_bytes": "PP send/recv", "pp_time_s": "PP time",
    "dp_bytes": "DP reduce-scatter + all-gather", "dp_time_s": "DP time",
    "total_bytes": "total sent", "total_time_s": "total time if nothing overlapped",
}


def comm_figures(spec, q: Quantities, costs: ModelCosts, pd: ParallelDims, layout,
                 imbalance=1) -> CommModel:
    """Record `comm.*` for the device with the most communication time; returns the model."""
    model = CommModel(spec, q, costs, pd, imbalance)
    q.figure("comm.tokens_per_microbatch", "tokens per micro-batch per GPU", "count", pd.T)
    for key, (reached, ib, nv, per_expert) in model.routing.items():
        name = key.split(".", 1)[1]
        base = f"comm.routing.{name}"
        q.figure(f"{base}.nodes_per_token", f"'{name}': NVLink domains reached per token", "x",
                 reached)
        q.figure(f"{base}.ib_copies_per_token", f"'{name}': network copies per token", "x", ib)
        q.figure(f"{base}.ib_copies_per_token_per_expert",
                 f"'{name}': network copies if sent once per expert", "x", per_expert)
        q.figure(f"{base}.nvlink_copies_per_token", f"'{name}': NVLink copies per token", "x", nv)
        piece = costs.ffns[name]
        _, _, ib_b, nv_b = model.ep_layer(piece)
        q.figure(f"{base}.layer_ib_bytes", f"'{name}': network bytes per layer, micro-batch",
                 "B", ib_b)
        q.figure(f"{base}.layer_time_s", f"'{name}': all-to-all time per layer, micro-batch",
                 "s", model.ep_time(ib_b, nv_b))
    if imbalance != 1:
        q.figure("comm.expert_load_imbalance", "hottest EP rank load / mean", "x", imbalance)
    per_device = [model.device(stages) for stages in layout]
    worst = max(range(len(layout)), key=lambda i: q.num(per_device[i]["total_time_s"]))
    q.figure("comm.device", "device with the most communication", "index", worst)
    for name, expr in per_device[worst].items():
        q.figure(f"comm.{name}", LABELS[name], "s" if name.endswith("_s") else "B", expr)
    return model

