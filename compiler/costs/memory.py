"""Memory per GPU, per pipeline stage and device, from what each stage holds.

Per device (one data-parallel replica's pipeline rank; every replica is alike):

* weights in their storage precision: FP8 linears as 1 B per element plus one
  scale per weight block (fp32, or 1 B for ue8m0); kept components (embedding,
  head, router, norms) in their kept dtype;
* FP32 master weights, gradients, AdamW's two moments, sharded per ZeRO stage
  (stage >= 1: master + moments over DP; >= 2: + gradients; 3: + weights), routed
  experts over the expert-data-parallel degree DP / EP instead of DP;
* routed experts split over EP ranks (E / EP experts per MoE layer per GPU);
* activations saved for backward, per token (see `activation_bytes`), times the
  micro-batches each stage holds at peak (`layout`); the hottest EP rank's share
  of routed activations scales with the expert-load imbalance;
* dispatch/combine buffers of one micro-batch (two under dual micro-batch
  overlap).

A device fits when its total is at most (1 - RESERVE_FRACTION) of the GPU's
memory: the reserve stands for the CUDA context, NCCL buffers and allocator
fragmentation, which the formulas do not model.
"""

from __future__ import annotations

from dsvc.dsl.spec import DTYPE_BYTES

from .layout import ParallelDims, StageContents
from .model import Linear, ModelCosts, Piece
from .symbols import Quantities, ceil_div, ssum

RESERVE_FRACTION = 0.05
LSE_BYTES = 4  # flash-attention log-sum-exp per head per token, fp32
ROUTER_BYTES = 4  # router scores and gate weights kept in fp32 for the backward


def storage_dtype(component: str, precision) -> str:
    """The dtype a component's weights are stored in (kept components keep theirs)."""
    if component in precision.keep:
        return precision.keep[component]
    if component in ("linear", "router", "head", "mtp_projection"):
        return precision.linear.format
    return precision.default


def linear_weight_bytes(lin: Linear, precision):
    """Bytes of all `lin.count` copies of a linear weight, scales included for FP8."""
    dtype = storage_dtype(lin.component, precision)
    per_copy = lin.n_in * lin.n_out * DTYPE_BYTES[dtype]
    if dtype.startswith("fp8"):
        rows, cols = precision.linear.weight_block  # (out, in) elements per scale
        scale = 4 if precision.linear.scales == "fp32" else 1
        per_copy = per_copy + ceil_div(lin.n_out, rows) * ceil_div(lin.n_in, cols) * scale
    return lin.count * per_copy


def weight_bytes(piece: Piece, precision) -> tuple:
    """(non-expert bytes, routed-expert bytes) of one piece's weights."""
    dense = ssum(linear_weight_bytes(lin, precision) for lin in piece.linears if not lin.expert)
    dense = dense + ssum(n * DTYPE_BYTES[storage_dtype(comp, precision)] for _, n, comp in piece.others)
    expert = ssum(linear_weight_bytes(lin, precision) for lin in piece.linears if lin.expert)
    return dense, expert


def cached_input_bytes(precision, component: str = "linear"):
    """Bytes per element of a linear's input saved for its weight gradient.

    FP8 linears with `cache_fp8_activations` keep it in FP8 plus one scale per
    activation tile (1 x 128: 4/128 B per element); otherwise in the component's dtype.
    """
    dtype = storage_dtype(component, precision)
    if dtype.startswith("fp8") and precision.cache_fp8_activations:
        scale = 4 if precision.linear.scales == "fp32" else 1
        return 1 + scale / precision.linear.act_tile[1]
    return DTYPE_BYTES[precision.default if dtype.startswith("fp8") else dtype]


def activation_bytes(piece: Piece, precision) -> tuple:
    """(non-expert, routed-expert) bytes saved for backward per token by one piece.

    DeepSeek-V3's memory savings are assumed: RMSNorm and MLA up-projections
    are recomputed in backward (their inputs are kept: the residual stream and
    the MLA latents), SwiGLU keeps its inputs and recomputes its output, the
    attention core keeps its output and log-sum-exp (flash attention).
    """
    a = DTYPE_BYTES[precision.default]
    c8 = cached_input_bytes(precision)
    g = piece.dims
    if piece.kind == "mla":  # residual in, latents, core output + lse, wo input
        latents = g["d_cq"] + g["d_c"] + g["d_r"]
        o = g["n_h"] * g["d_v"]
        return a * (g["d"] + latents + o) + LSE_BYTES * g["n_h"] + c8 * o, 0
    if piece.kind == "gqa":  # residual in, q/k/v after RoPE, core output + lse, wo input
        qkv = (g["n_h"] + 2 * g["n_kv"]) * g["d_h"]
        o = g["n_h"] * g["d_h"]
        return a * (g["d"] + qkv + o) + LSE_BYTES * g["n_h"] + c8 * o, 0
    if piece.kind == "dense":  # residual in, SwiGLU inputs
        return a * g["d"] + c8 * 2 * g["d_ff"], 0
    if piece.kind == "moe":  # residual in, router scores + gates, shared SwiGLU inputs
        dense = (a * g["d"] + ROUTER_BYTES * (g["E"] + g["k"])
                 + c8 * 2 * g["E_s"] * g["d_s"])
        expert = g["k"] * c8 * (g["d"] + 2 * g["d_e"])  # dispatched inputs, SwiGLU inputs
        return dense, expert
    if piece.kind in ("head", "mtp"):  # final norm input, head input, logits for the loss
        h = cached_input_bytes(precision, "head")
        head = a * g["d"] + h * g["d"] + h * g["V"]
        if piece.kind == "head":
            return head, 0
        proj = cached_input_bytes(precision, "mtp_projection")
        return a * 2 * g["d"] + proj * 2 * g["d"] + head, 0  # norm inputs, eh_proj input, head
    return 0, 0  # the embedding saves token ids only


def dispatch_element_bytes(precision):
    """Bytes per element of a dispatched token: FP8 payload + its 1 x 128 scales, or BF16."""
    b = DTYPE_BYTES[precision.dispatch]
    if precision.dispatch.startswith("fp8"):
        scale = 4 if precision.linear.scales == "fp32" else 1
        return b + scale / precision.linear.act_tile[1]
    return b


# ----------------------------------------------------------------------------- per device


def stage_pieces(stage: StageContents, costs: ModelCosts, tied: bool) -> dict[str, tuple]:
    """{piece key: (piece, how many)} held by one stage."""
    out: dict[str, list] = {}

    def add(piece: Piece, n=1):
        out.setdefault(piece.key, [piece, 0])[1] += n

    for i in stage.layers:
        kind = costs.kind(costs.kind_of_layer[i])
        add(kind.attention)
        add(kind.ffn)
    if stage.embedding:
        add(costs.embedding)
    if stage.head:
        add(costs.head)
        if tied and not stage.embedding:  # a tied head needs the embedding matrix here too
            add(costs.embedding)
    if stage.mtp and costs.mtp is not None:
        add(costs.mtp, stage.mtp)
        add(costs.mtp_block.attention, stage.mtp)
        add(costs.mtp_block.ffn, stage.mtp)
    return {k: (p, n) for k, (p, n) in out.items()}


class MemoryModel:
    """Per-piece let-symbols and the per-device memory formulas."""

    def __init__(self, spec, q: Quantities, costs: ModelCosts, pd: ParallelDims,
                 imbalance=1):
        self.spec, self.q, self.costs, self.pd, self.f = spec, q, costs, pd, imbalance
        pr = spec.precision
        pieces = [*costs.attentions.values(), *costs.ffns.values(), costs.embedding, costs.head]
        if costs.mtp is not None:
            pieces.append(costs.mtp)
        self.sym: dict[str, dict] = {}
        for p in pieces:
            tag = p.key.split(".")[-1]
            w, we = weight_bytes(p, pr)
            act, act_e = activation_bytes(p, pr)
            pe = p.expert_params
            self.sym[p.key] = {
                "P": costs.params_of.get(p.key) or q.let(q.fresh(f"P_{tag}"), p.params),
                "Pe": q.let(q.fresh(f"Pe_{tag}"), pe, f"routed-expert params of {tag}")
                if pe else 0,
                "W": q.let(q.fresh(f"W_{tag}"), w, f"weight bytes of {tag} (non-expert)"),
                "We": q.let(q.fresh(f"We_{tag}"), we, f"routed-expert weight bytes of {tag}")
                if we else 0,
                "A": q.let(q.fresh(f"A_{tag}"), act, f"activation bytes/token of {tag}")
                if act else 0,
                "Ae": q.let(q.fresh(f"Ae_{tag}"), act_e, f"routed activation bytes/token of {tag}")
                if act_e else 0,
            }

    def device(self, stages: tuple[StageContents, ...]) -> dict:
        """{component: bytes expression} for a device holding `stages`."""
        spec, pd, f = self.spec, self.pd, self.f
        pr, tied = spec.precision, spec.model.tie_embeddings
        EP, z = pd.EP, pd.zero
        dense_p = expert_p = weights = expert_w = acts = 0
        moe_k_d = []
        for st in stages:
            stage_act = 0
            for key, (piece, n) in stage_pieces(st, self.costs, tied).items():
                s = self.sym[key]
                dense_p = dense_p + n * (s["P"] - s["Pe"])
                expert_p = expert_p + n * s["Pe"] / EP
                w_d = n * s["W"] / (pd.DP if z >= 3 else 1)
                w_e = n * s["We"] / (EP * (pd.EDP if z >= 3 else 1))
                weights, expert_w = weights + w_d + w_e, expert_w + w_e
                stage_act = stage_act + n * (s["A"] + f * s["Ae"])
                if piece.kind == "moe":
                    moe_k_d.append((piece.spec.top_k, piece.dims["k"], piece.dims["d"]))
            acts = acts + st.in_flight * pd.T * stage_act
        shard_d, shard_e = (pd.DP, pd.EDP) if z >= 1 else (1, 1)
        grad_d, grad_e = (pd.DP, pd.EDP) if z >= 2 else (1, 1)
        master = DTYPE_BYTES[pr.master_weights] * (dense_p / shard_d + expert_p / shard_e)
        grads = DTYPE_BYTES[pr.grads] * (dense_p / grad_d + expert_p / grad_e)
        opt = 2 * DTYPE_BYTES[pr.optimizer_states] * (dense_p / shard_d + expert_p / shard_e)
        buffers = 0
        if moe_k_d and self._ep_active():
            _, k, d = max(moe_k_d, key=lambda t: t[0])
            copies = 2 if spec.parallel.overlap == "dual_microbatch" else 1
            per = dispatch_element_bytes(pr) + DTYPE_BYTES[pr.combine]
            buffers = copies * f * pd.T * k * d * per
        out = {"weights": weights, "master_weights": master, "grads": grads,
               "optimizer_states": opt, "activations": acts, "buffers": buffers}
        out["total"] = ssum(out.values())
        out["expert_weights"] = expert_w  # part of `weights`, not added to the total again
        return out

    def _ep_active(self) -> bool:
        return self.spec.parallel is not None and self.spec.parallel.expert > 1


LABELS = {
    "weights": "weights (storage precision)", "master_weights": "master weights",
    "grads": "gradients", "optimizer_states": "optimizer states (AdamW m, v)",
    "activations": "activations at peak", "buffers": "dispatch/combine buffers",
    "total": "total", "expert_weights": "  of the weights: routed experts",
}


def memory_figures(spec, q: Quantities, costs: ModelCosts, pd: ParallelDims, layout,
                   imbalance=1) -> None:
    """Record `memory.*`: a row per device, the most loaded device's breakdown, `fits`."""
    model = MemoryModel(spec, q, costs, pd, imbalance)
    per_device = [model.device(stages) for stages in layout]
    totals = [q.num(dev["total"]) for dev in per_device]
    worst = max(range(len(totals)), key=lambda i: totals[i])
    for i, (stages, dev) in enumerate(zip(layout, per_device)):
        base = f"memory.devices.{i}"
        q.figure(f"{base}.stages", "stages", "list", [s.index for s in stages])
        q.figure(f"{base}.layers", "layers", "count", sum(len(s.layers) for s in stages))
        for name, expr in dev.items():
            q.figure(f"{base}.{name}", LABELS[name], "B", expr)
    for name, expr in per_device[worst].items():
        q.figure(f"memory.max.{name}", LABELS[name], "B", expr)
    gpu = spec.cluster.gpu.memory
    usable = gpu * (1 - RESERVE_FRACTION)
    q.figure("memory.max_device", "most loaded device", "index", worst)
    q.figure("memory.max_gpu_bytes", "memory on the most loaded GPU", "B", totals[worst])
    q.figure("memory.gpu_bytes", "GPU memory", "B", gpu)
    q.figure("memory.usable_bytes", f"usable ({100 * (1 - RESERVE_FRACTION):.0f}% of it)", "B",
             usable)
    q.figure("memory.headroom_bytes", "headroom (usable - most loaded)", "B",
             usable - totals[worst])
    q.figure("memory.fits", "fits", "bool", bool(totals[worst] <= usable))
