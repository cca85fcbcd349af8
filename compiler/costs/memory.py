"""Memory per GPU, per pipeline stage and device: the tensors the generated trainer holds.

Per device (one data-parallel replica's pipeline rank; every replica is alike), as the
runtime allocates them (runtime/model.py, runtime/optim.py; held to the runtime's own
tensors by tests/compiler/test_memory_runtime.py):

* weights: every stage module's parameters in the master dtype (fp32): the runtime
  keeps one fp32 copy as its parameters, in one flat buffer per shard group, and
  quantises (FP8) or casts (bf16) per use; a stage holding the MTP modules keeps its
  own embedding copy (they share it), a tied head the embedding;
* gradients: one per parameter, in that dtype (a second flat buffer);
* the ZeRO-1 optimizer, per shard group (non-expert parameters over DP, routed
  experts over the expert-data-parallel degree DP / EP), each padded to a multiple of
  its group: AdamW's two moments in `optimizer_states`; the master shard is the
  parameters' own (the `master_weights` row is 0); which elements weight decay and the
  gradient norm skip are ranges of the shard, no per-element masks; ZeRO 0, 2 and 3 as
  their definitions say (the runtime runs ZeRO-1 only);
* routed experts split over EP ranks (E / EP experts per MoE layer per GPU);
* activations: what autograd keeps for the backward, per micro-batch, as the code
  that runs keeps it (`compiler.costs.activations`: the generated program in the block
  kinds it covers, the eager modules elsewhere), times the micro-batches each stage
  holds at peak (`layout`); the hottest EP rank's routed rows scale with the
  expert-load imbalance. Plus, once per device, the program's FP8 weight copies: one
  per parameter per step, shared by every micro-batch in flight and held until the
  step's backward is done (`ProgramRuntime.qweight`), so not multiplied by them (an
  eager FP8 linear re-makes its copy per micro-batch, which the per-micro-batch bytes
  hold);
* buffers: dispatch/combine of one micro-batch (two under dual micro-batch
  overlap), RoPE tables (fp32 cos and sin per attention module);
* transients: the largest temporary the step allocates beside all that (one piece of
  the loss on the head stage, the optimizer's exchange and update pieces; `_transients`):
  what a GPU's allocator adds to the peak.

A device fits when its total is at most (1 - RESERVE_FRACTION) of the GPU's
memory: the reserve stands for the CUDA context, NCCL buffers, cuBLAS workspaces
and allocator fragmentation, which the formulas do not model.
"""

from __future__ import annotations

from collections import Counter

from dsvc.dsl.spec import DTYPE_BYTES
from dsvc.runtime.plan import OPTIMIZER_UPDATE_PIECE, loss_chunk_rows

from .activations import GPU, Kept, head_weight_bytes, storage_dtype
from .layout import ParallelDims, StageContents
from .model_costs import Linear, ModelCosts, Piece
from .symbols import Quantities, ceil_div, smax, smin, ssum

RESERVE_FRACTION = 0.05



def linear_weight_bytes(lin: Linear, precision):
    """Bytes of all `lin.count` copies of a linear weight in its compute format, scales
    included for FP8 (what a GEMM reads)."""
    dtype = storage_dtype(lin.component, precision)
    per_copy = lin.n_in * lin.n_out * DTYPE_BYTES[dtype]
    if dtype.startswith("fp8"):
        rows, cols = precision.linear.weight_block  # (out, in) elements per scale
        scale = 4 if precision.linear.scales == "fp32" else 1
        per_copy = per_copy + ceil_div(lin.n_out, rows) * ceil_div(lin.n_in, cols) * scale
    return lin.count * per_copy


def activation_bytes(piece: Piece, kept: Kept, T, S, local=1,
                     program: bool | None = None) -> tuple:
    """(bytes, routed-row bytes) one piece keeps for the backward per micro-batch of T
    tokens (sequence length S; `local` routed experts on this rank): the sum of its ops'
    saved tensors (`activations.Kept`). The routed rows scale with the load imbalance.
    `program`: whether the generated program runs the piece's block (by default, as
    `Kept.runs_program` says for an FFN's own definition, or for the policy alone for an
    attention piece); the embedding, head and MTP parts always run eagerly."""
    g = piece.dims
    if program is None:
        program = kept.runs_program(piece.spec if piece.kind in ("dense", "moe") else None)
    if piece.kind in ("mla", "gqa"):
        return ssum(kept.attention(piece.kind, T, S, g, program).values()), 0
    if piece.kind in ("dense", "moe"):
        parts, rows = kept.ffn(piece.kind, T, g, local, program)
        return ssum(parts.values()), rows
    if piece.kind == "head":
        return ssum(kept.head(T, g["d"], g["V"]).values()), 0
    if piece.kind == "mtp":  # its own parts and its pass through the shared head
        return ssum(kept.mtp(T, g["d"]).values()) + ssum(kept.head(T, g["d"], g["V"]).values()), 0
    return ssum(kept.embedding(T).values()), 0


def weight_copy_bytes(piece: Piece, precision, EP=1):
    """The FP8 copies of a piece's weights the generated program makes once per step and
    shares between micro-batches (`ProgramRuntime.qweight`; `EP` ranks share the routed
    experts): its FP8 linears' bytes in their compute format, scales included."""
    return ssum(linear_weight_bytes(lin, precision) / (EP if lin.expert else 1)
                for lin in piece.linears
                if storage_dtype(lin.component, precision).startswith("fp8"))


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
                 imbalance=1, program: str = "generated"):
        self.spec, self.q, self.costs, self.pd, self.f = spec, q, costs, pd, imbalance
        recompute = spec.train.recompute if spec.train is not None else "none"
        self.kept = Kept(spec.precision, recompute, GPU, program)
        # the block kinds the generated program runs (MTP blocks are the last layer's kind)
        self.program = {k.key: self.kept.runs_program(k.ffn.spec) for k in costs.kinds}
        runs: dict[str, set] = {}  # piece key -> how its blocks run it (True: the program)
        for k in costs.kinds:
            for p in (k.attention, k.ffn):
                runs.setdefault(p.key, set()).add(self.program[k.key])
        pieces = [*costs.attentions.values(), *costs.ffns.values(), costs.embedding, costs.head]
        if costs.mtp is not None:
            pieces.append(costs.mtp)
        self.sym: dict[str, dict] = {}
        self.acts: dict[tuple[str, bool], dict] = {}
        for p in pieces:
            tag = p.key.split(".")[-1]
            pe = p.expert_params
            self.sym[p.key] = {
                "P": costs.params_of.get(p.key) or q.let(q.fresh(f"P_{tag}"), p.params),
                "Pe": q.let(q.fresh(f"Pe_{tag}"), pe, f"routed-expert params of {tag}")
                if pe else 0,
            }
            for program in sorted(runs.get(p.key, {False})):
                self.acts[p.key, program] = self._kept_symbols(p, tag, program, recompute)

    def _kept_symbols(self, p: Piece, tag: str, program: bool, recompute: str) -> dict:
        """Let-symbols of what piece `p` keeps for the backward, run by the program or not:
        per micro-batch ("A"; routed rows "Ae") and, for the program, its FP8 weight copies
        per step ("W")."""
        q, pd = self.q, self.pd
        local = p.dims["E"] / pd.EP if p.kind == "moe" else 1
        act, act_e = activation_bytes(p, self.kept, pd.T, self.costs.S, local, program)
        copies = weight_copy_bytes(p, self.spec.precision, pd.EP) if program else 0
        how = f"{recompute} recompute" + (", generated program" if program else "")
        return {
            "A": q.let(q.fresh(f"A_{tag}"), act,
                       f"activation bytes per micro-batch of {tag} ({how})") if act else 0,
            "Ae": q.let(q.fresh(f"Ae_{tag}"), act_e,
                        f"routed-row activation bytes per micro-batch of {tag}")
            if act_e else 0,
            "W": q.let(q.fresh(f"W8_{tag}"), copies,
                       f"FP8 weight copies of {tag}, made once per step (generated program)")
            if copies else 0,
        }

    def kept_bytes(self, st: StageContents) -> tuple:
        """(bytes per micro-batch, bytes per step) stage `st` keeps for the backward: its
        blocks as their kind runs them (the program's FP8 weight copies per step, shared by
        the micro-batches in flight), its embedding, head and MTP parts eagerly."""
        costs, f = self.costs, self.f
        kinds = Counter(costs.kind_of_layer[i] for i in st.layers)
        if st.mtp and costs.mtp_block is not None:
            kinds[costs.mtp_block.key] += st.mtp
        per_batch = per_step = 0
        for key, n in kinds.items():
            kind, program = costs.kind(key), self.program[key]
            for piece in (kind.attention, kind.ffn):
                s = self.acts[piece.key, program]
                per_batch = per_batch + n * (s["A"] + f * s["Ae"])
                per_step = per_step + n * s["W"]
        for piece, n in stage_pieces(st, costs, self.spec.model.tie_embeddings).values():
            if piece.kind in ("embedding", "head", "mtp"):
                per_batch = per_batch + n * self.acts[piece.key, False]["A"]
        return per_batch, per_step

    def device(self, stages: tuple[StageContents, ...]) -> dict:
        """{component: bytes expression} for a device holding `stages`."""
        spec, pd, f, costs = self.spec, self.pd, self.f, self.costs
        pr, tied = spec.precision, spec.model.tie_embeddings
        EP, z = pd.EP, pd.zero
        dense_p = expert_p = acts = 0
        moe_k_d, attentions, heads, embedding = [], 0, 0, False
        for st in stages:
            for key, (piece, n) in stage_pieces(st, costs, tied).items():
                s = self.sym[key]
                if piece.kind == "embedding":  # counted once per device, below
                    continue
                dense_p = dense_p + n * (s["P"] - s["Pe"])
                expert_p = expert_p + n * s["Pe"] / EP
                if piece.kind == "moe":
                    moe_k_d.append((piece.spec.top_k, piece.dims["k"], piece.dims["d"]))
                if piece.kind in ("mla", "gqa"):
                    attentions += n * _rope_table(piece, spec.model.max_seq)
            # the embedding stage, the MTP modules (they embed the tokens ahead) and a tied
            # head hold the embedding; stages on one device share one copy
            embedding = embedding or st.embedding or bool(st.mtp) or (tied and st.head)
            heads += 1 + st.mtp if st.head else 0
            per_batch, per_step = self.kept_bytes(st)
            acts = acts + st.in_flight * per_batch + per_step
        if embedding:
            dense_p = dense_p + self.sym[costs.embedding.key]["P"]
        param_b, grad_b = DTYPE_BYTES[pr.master_weights], DTYPE_BYTES[pr.grads]
        numel = dense_p + expert_p
        weights = param_b * (numel if z < 3 else dense_p / pd.DP + expert_p / pd.EDP)
        grads = grad_b * (numel if z < 2 else dense_p / pd.DP + expert_p / pd.EDP)
        # ZeRO-1 shards: each group padded to a multiple of its size (runtime/optim.py _Shard)
        shard_d = ceil_div(dense_p, pd.DP) if z >= 1 else dense_p
        shard_e = ceil_div(expert_p, pd.EDP) if z >= 1 else expert_p
        shards = shard_d + shard_e
        master = 0  # the parameters' own shard (fp32 in one flat buffer): no copy
        opt = 2 * DTYPE_BYTES[pr.optimizer_states] * shards
        buffers = attentions
        if moe_k_d and self._ep_active():
            _, k, d = max(moe_k_d, key=lambda t: t[0])
            copies = 2 if spec.parallel.overlap == "dual_microbatch" else 1
            per = dispatch_element_bytes(pr) + DTYPE_BYTES[pr.combine]
            buffers = buffers + copies * f * pd.T * k * d * per
        transients = self._transients(heads, shard_d, shard_e)
        out = {"weights": weights, "master_weights": master, "grads": grads,
               "optimizer_states": opt, "activations": acts, "buffers": buffers,
               "transients": transients}
        out["total"] = ssum(out.values())
        out["params"] = numel  # parameters on the device (not bytes; not in the total)
        return out

    def _transients(self, heads, shard_d, shard_e):
        """The largest temporary besides what the rows above hold: on a head stage one
        piece of the loss (runtime/loss.py: its logits in the head's dtype and in fp32, the
        log-softmax and its gradient in fp32 and the head's dtype; the head's weight in its
        format, the piece's gradient of it and their fp32 sum); the optimizer's: the
        reduce-scattered gradient shard and the all-gather's input of each group sharded
        over more than one rank (one rank reduces in place) and its fp32 temporaries of a
        piece of the update (runtime/optim.py)."""
        costs, pd = self.costs, self.pd
        V, d = costs.V, costs.embedding.dims["d"]
        b = head_weight_bytes(self.spec.precision)
        rows = smin(pd.T, loss_chunk_rows(self.spec.model.vocab))
        # the weight's cast (none in fp32), a piece's gradient of it, their fp32 sum
        copy = 0 if b == 4 else b
        loss = ((2 * b + 12) * rows * V + (copy + b + 4) * V * d) if heads else 0
        # a group of one rank (the experts when EP spans the data-parallel ranks) neither
        # reduce-scatters nor all-gathers: it steps its buffer in place
        par = self.spec.parallel
        dp, edp = (par.data, par.expert_data) if par is not None else (1, 1)
        exchange = 2 * 4 * smax(shard_d if dp > 1 else 0, shard_e if edp > 1 else 0)
        update = 3 * 4 * smin(smax(shard_d, shard_e), OPTIMIZER_UPDATE_PIECE)
        return smax(loss, exchange + update)

    def _ep_active(self) -> bool:
        return self.spec.parallel is not None and self.spec.parallel.expert > 1


def _rope_table(piece: Piece, max_seq: int):
    """The fp32 cos and sin tables (max_seq x rotary / 2 each) of one attention module."""
    rot = piece.spec.qk_rope_dim if piece.kind == "mla" else piece.spec.head_dim
    return 2 * 4 * max_seq * (rot // 2)


LABELS = {
    "weights": "parameters (fp32, as the runtime holds them)",
    "master_weights": "master weights (the parameters' shard: no copy)", "grads": "gradients",
    "optimizer_states": "optimizer states (AdamW m, v)",
    "activations": "activations at peak", "buffers": "buffers (dispatch/combine, RoPE)",
    "transients": "transients (a loss piece, the optimizer's)", "total": "total",
    "params": "  parameters on the device",
}


def memory_figures(spec, q: Quantities, costs: ModelCosts, pd: ParallelDims, layout,
                   imbalance=1, program: str = "generated") -> None:
    """Record `memory.*`: a row per device, the most loaded device's breakdown, `fits`;
    `program`: what runs the decoder blocks (`Graph.program`)."""
    model = MemoryModel(spec, q, costs, pd, imbalance, program)
    per_device = [model.device(stages) for stages in layout]
    totals = [q.num(dev["total"]) for dev in per_device]
    worst = max(range(len(totals)), key=lambda i: totals[i])
    for i, (stages, dev) in enumerate(zip(layout, per_device)):
        base = f"memory.devices.{i}"
        q.figure(f"{base}.stages", "stages", "list", [s.index for s in stages])
        q.figure(f"{base}.layers", "layers", "count", sum(len(s.layers) for s in stages))
        for name, expr in dev.items():
            q.figure(f"{base}.{name}", LABELS[name], "params" if name == "params" else "B",
                     expr)
    for name, expr in per_device[worst].items():
        q.figure(f"memory.max.{name}", LABELS[name], "params" if name == "params" else "B",
                 expr)
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
