"""Cost model of the `simulate` pass: chunk times from the graph, links from the cluster.

Three pieces, all pure Python (docs/simulate.md has the derivations):

* `Rates` and `op_times`: one op's forward, input-gradient and weight-gradient
  seconds for one micro-batch, a roofline: FLOPs over the GPU peak of the op's
  format times the spec's GEMM efficiency, or bytes over HBM bandwidth times
  its memory efficiency, whichever is longer; `roofline_times` the same as the
  code that runs the op moves its bytes (a program block's fusion groups).
* `Topology`: link classes (NVLink inside an NVLink domain, the network across),
  their effective bandwidth and latency, and which class a group of ranks
  (data-parallel, expert-data-parallel, pipeline neighbours) talks over. Ranks
  are laid out as the graph's insert_comm assumes: global = pipeline x data + dp.
* `Unit` / `stage_profiles`: per pipeline stage, its units (embedding, decoder
  layers, head, MTP modules) split into the chunks of dual micro-batch overlap
  (attention, dispatch, MLP, combine; backward into input and weight parts),
  with each chunk's compute seconds or all-to-all bytes per link class.

The action-level timing (chunks played against shared links) is in
`simulate_play.py`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from dsvc.compiler.ir import num

from .simulate_ops import two_hop_route
from .simulate_program import NO_WORK, ProgramBlocks, op_coster

IB, NVLINK = "ib", "nvlink"
BACKWARD_TRAFFIC = 2  # a memory-bound op's backward moves about twice its forward bytes
COMM_KINDS = ("dispatch", "combine")


@dataclasses.dataclass(frozen=True)
class Rates:
    """Achieved FLOP/s per compute format and HBM bytes/s of one GPU."""

    fp8: float
    bf16: float
    hbm: float

    @classmethod
    def of(cls, gpu) -> Rates:
        return cls(fp8=gpu.fp8_flops * gpu.gemm_efficiency_fp8,
                   bf16=gpu.bf16_flops * gpu.gemm_efficiency_bf16,
                   hbm=gpu.hbm * gpu.memory_efficiency)

    def flops(self, dtype: str) -> float:
        if dtype.startswith("fp8"):
            return self.fp8
        if dtype == "fp32":
            return self.bf16 / 2  # TF32 tensor cores: half the BF16 rate
        return self.bf16


def op_times(op, tokens: int, rates: Rates, ep: int = 1,
             load: float = 1.0) -> tuple[float, float, float]:
    """(forward, input-gradient, weight-gradient) seconds of `op` for one micro-batch.

    `load`: the busiest EP rank's share of routed tokens over the mean (an `experts`
    op under a measured histogram): its FLOPs and activations scale with it, its
    weights do not, and the all-to-all waits for that rank.
    """
    io = sum(num(t.nbytes, tokens) for t in op.inputs + op.outputs) * load
    flops = [num(op.flops_fwd, tokens), num(op.flops_dgrad, tokens), num(op.flops_wgrad, tokens)]
    flops = [f * load for f in flops]
    if not any(flops):  # memory-bound: norms, quantisation, RoPE, adds, the loss, gathers
        return io / rates.hbm, BACKWARD_TRAFFIC * io / rates.hbm, 0.0
    params = 0 if op.kind == "embedding" else op.param_bytes
    if op.kind == "experts":
        params /= ep  # each EP rank reads only its own experts' weights
    rate, moved = rates.flops(op.dtype), (io + params) / rates.hbm
    return tuple(max(f / rate, moved) if f else 0.0 for f in flops)  # type: ignore[return-value]


def roofline_times(op, blocks: ProgramBlocks, tokens: int, rates, ep: int = 1,
                   load: float = 1.0) -> tuple[float, float, float]:
    """(forward, input-gradient, weight-gradient) roofline seconds of `op` on a card the
    calibration does not know, the backward's replay of its forward included: in a
    program block, a memory-bound op a group covers costs nothing of its own and each
    group its bytes at the HBM rate (the GEMMs keep `op_times`'s roofline)."""
    t = dict.fromkeys(("fwd", "dgrad", "wgrad"), 0.0)
    if not (blocks.runs(op) and (blocks.covered(op) or op.kind in NO_WORK)):
        t["fwd"], t["dgrad"], t["wgrad"] = op_times(op, tokens, rates, ep, load)
    for phase, _, nbytes in blocks.kernels_at(op, tokens, load):
        t[phase] += nbytes / rates.hbm
    return t["fwd"], t["dgrad"] + (t["fwd"] if blocks.replayed(op) else 0.0), t["wgrad"]


def expert_skew(graph) -> dict[str, float]:
    """`experts` op name -> busiest EP rank's expected tokens over the mean rank's.

    From the placement's load histogram over the primary copies (EP rank r serves
    experts [r E/R, (r+1) E/R)): what the runtime executes, since plan v1 carries no
    replicas (the redundant experts place_experts adds are shown by inspect, not run).
    The report's `comm.expert_load_imbalance` is the mean of these over the layers.
    Ops without a histogram are absent (uniform routing, 1.0).
    """
    from dsvc.compiler.passes.place_experts import primary_imbalance

    out = {}
    for op in graph.ops():
        place = op.attr("placement") if op.kind == "experts" else None
        if place is not None and place.load:
            out[op.name] = primary_imbalance(place.load, len(place.per_rank))
    return out


# ----------------------------------------------------------------------------- topology


class Topology:
    """Link classes and rank layout of the cluster, for one data-parallel replica."""

    def __init__(self, spec):
        c, p = spec.cluster, spec.parallel
        self.gpn = c.gpus_per_node
        self.domain = c.nvlink.domain or c.gpus_per_node
        self.data = p.data if p is not None else 1
        self.ep = p.expert if p is not None else 1
        net = c.network
        self.bandwidth = {NVLINK: c.nvlink.effective,
                          IB: net.effective if net is not None else c.nvlink.effective}
        self.nvlink_latency = c.nvlink.latency
        self.ib_latency = (net.latency, net.latency_cross) if net is not None else (
            c.nvlink.latency, c.nvlink.latency)
        tree = net.topology if net is not None else None
        self.leaf_nodes = max(1, tree.radix // 2) if tree is not None and tree.layers >= 2 else None

    def rank(self, pp_rank: int, dp_rank: int = 0) -> int:
        return pp_rank * self.data + dp_rank

    def link(self, ranks) -> str:
        """NVLink when every rank is in one NVLink domain, else the network."""
        return NVLINK if len({r // self.domain for r in ranks}) <= 1 else IB

    def latency(self, ranks) -> float:
        if self.link(ranks) == NVLINK:
            return self.nvlink_latency
        if self.leaf_nodes is None:
            return self.ib_latency[0]
        leaves = {(r // self.gpn) // self.leaf_nodes for r in ranks}
        return self.ib_latency[0] if len(leaves) <= 1 else self.ib_latency[1]

    def group(self, name: str, pp_rank: int, size: int, peer_pp_rank: int | None = None):
        """Global ranks of a collective group on pipeline rank `pp_rank` (replica 0)."""
        if name == "data":
            return [self.rank(pp_rank, i) for i in range(size)]
        if name == "expert_data":
            return [self.rank(pp_rank, j * self.ep) for j in range(size)]
        if name == "expert":
            return [self.rank(pp_rank, i) for i in range(size)]
        if name == "copies":
            return [self.rank(pp_rank), self.rank(peer_pp_rank)]
        raise ValueError(f"unknown collective group {name!r}")


# ----------------------------------------------------------------------------- stage profiles


@dataclasses.dataclass
class Unit:
    """One unit of a stage, per micro-batch: chunk seconds and all-to-all demands.

    `fwd[part]` (attention, mlp), `bwd[(part, grad)]` (grad input or weight),
    `comm[(part, direction)]` = ({link: bytes}, latency) for dispatch/combine,
    direction "F" or "B". A dense unit has no comm and all its compute in "attention".
    `fwd_c` / `bwd_c`: the same chunks while communication kernels hold some SMs.
    """

    name: str
    kind: str
    fwd: dict = dataclasses.field(default_factory=lambda: defaultdict(float))
    bwd: dict = dataclasses.field(default_factory=lambda: defaultdict(float))
    comm: dict = dataclasses.field(default_factory=dict)
    fwd_c: dict = dataclasses.field(default_factory=lambda: defaultdict(float))
    bwd_c: dict = dataclasses.field(default_factory=lambda: defaultdict(float))
    host_wait: float = 0.0  # of its chunks' seconds, those the GPU waits for the host


@dataclasses.dataclass
class StageProfile:
    """What one per-copy stage costs per micro-batch."""

    part: int
    units: list[Unit]
    saved_bytes: float  # activations kept for the backward
    forward_s: float
    backward_input_s: float
    backward_weight_s: float
    comm_bytes: dict  # link -> all-to-all bytes per forward + backward
    # GPU seconds by kind of kernel (simulate_ops.KERNEL_KINDS) over forward and backward,
    # and "host": chunk seconds the GPU idles waiting for the host (calibrated cards only)
    by_kind: dict = dataclasses.field(default_factory=dict)


def stage_profiles(graph, topo: Topology, rates: Rates,
                   kernels=None) -> dict[int, StageProfile]:
    """Per-copy stage -> its profile, from the graph after insert_comm. With `kernels` (a
    `costs.kernel_rates.KernelModel`) ops cost what the runtime's kernels take on the card
    (`simulate_program.op_coster`: the generated program's in the blocks it runs, the
    eager modules' elsewhere); without, the roofline (`roofline_times`)."""
    from dsvc.compiler.passes.schedule import stage_units, unit_name

    tokens = graph.tokens
    units = {p: {n: Unit(n, k) for n, k in us} for p, us in stage_units(graph).items()}
    ops = [op for op in graph.ops()
           if op.stage is not None and op.block != "step" and op.kind not in ("send", "recv")]
    pre_dispatch = _attention_side(graph, ops)
    skew = expert_skew(graph)
    saved: dict[int, float] = defaultdict(float)
    by_kind: dict[int, dict] = defaultdict(lambda: defaultdict(float))
    chunks = _Chunks(kernels)
    coster = op_coster(graph, kernels, topo.ep) if kernels is not None else None
    blocks = ProgramBlocks(graph)
    full = blocks.recompute == "full"
    for op in ops:
        unit = units[op.stage][unit_name(op)]
        saved[op.stage] += num(op.saved_bytes, tokens)
        if op.kind in COMM_KINDS:  # "<experts op>.dispatch" / ".combine"
            _add_comm(graph, unit, op, topo, skew.get(op.name.rsplit(".", 1)[0], 1.0), full)
            continue
        part = "attention" if unit.kind == "dense" or op.name in pre_dispatch else "mlp"
        load = skew.get(op.name, 1.0)
        if coster is None:
            times = roofline_times(op, blocks, tokens, rates, topo.ep, load)
            for phase, t in zip(("fwd", "dgrad", "wgrad"), times):
                chunks.add(unit, (phase, part), t, t, 0)
            continue
        cost = coster.cost(op, load)
        for phase in ("fwd", "dgrad", "wgrad"):
            chunks.add(unit, (phase, part), cost.gpu[phase], cost.gpu_c[phase], cost.host[phase])
        for (_, kind), t in cost.by_kind.items():
            by_kind[op.stage][kind] += t
    if coster is not None:
        _host_syncs(graph, units, chunks, topo, kernels, full)
    chunks.finish(units)
    out = {}
    for p, by_name in units.items():
        us = list(by_name.values())
        comm: dict[str, float] = defaultdict(float)
        for u in us:
            for demand, _ in u.comm.values():
                for link, b in demand.items():
                    comm[link] += b
        out[p] = StageProfile(
            part=p, units=us, saved_bytes=saved[p],
            forward_s=sum(sum(u.fwd.values()) for u in us),
            backward_input_s=sum(v for u in us for (_, gr), v in u.bwd.items() if gr == "input"),
            backward_weight_s=sum(v for u in us for (_, gr), v in u.bwd.items() if gr == "weight"),
            comm_bytes=dict(comm), by_kind=dict(by_kind[p]))
        if kernels is not None:
            out[p].by_kind["host"] = sum(u.host_wait for u in us)
    return out


def _attention_side(graph, ops) -> set[str]:
    """Names of ops that feed their unit's dispatch (attention, router): the rest of a
    MoE unit (experts, shared expert, the residual add) is its MLP chunk."""
    from dsvc.compiler.passes.schedule import unit_name

    unit_of = {op.name: (op.stage, unit_name(op)) for op in ops}
    out: set[str] = set()
    for op in ops:
        if op.kind != "dispatch":
            continue
        todo = [op.name]
        while todo:
            for src in graph.g.predecessors(todo.pop()):
                if unit_of.get(src) == unit_of[op.name] and src not in out:
                    out.add(src)
                    todo.append(src)
    return out


def _add_comm(graph, unit: Unit, op, topo: Topology, load: float = 1.0,
              replayed: bool = False) -> None:
    """Forward bytes from the op; the backward of a dispatch carries gradients in the
    combine's format and the backward of a combine in the dispatch's (DeepSeek-V3:
    dispatch-direction traffic in FP8, combine-direction in BF16), so each backward
    all-to-all is filled in from its mirror when both are known. `load`: the busiest EP
    rank's share over the mean (it receives, and later sends back, that many rows).
    `replayed` (full recomputation): the layer's forward runs again in its backward, so
    each backward all-to-all also carries the forward's bytes of the same kind."""
    tokens = graph.tokens
    demand = {IB: float(num(op.attr("ib_bytes", 0), tokens)) * load,
              NVLINK: float(num(op.attr("nvlink_bytes", 0), tokens)) * load}
    members = topo.group("expert", 0, max(1, op.attr("ep", topo.ep)))
    lat = topo.latency(members) if demand[IB] else topo.nvlink_latency
    unit.comm[(op.kind, "F")] = (demand, lat)
    mirror = "combine" if op.kind == "dispatch" else "dispatch"
    unit.comm[(mirror, "B")] = (demand, lat)
    if replayed:
        for key in ((op.kind, "B"), (mirror, "B")):
            if key in unit.comm:
                back, _ = unit.comm[key]
                unit.comm[key] = ({link: b + demand[link] for link, b in back.items()}, lat)


class _Chunks:
    """Per (unit, phase, part): GPU seconds (all SMs, and with communication's SMs taken)
    and host ops; `finish` sets each chunk to the longer of its GPU and host time."""

    def __init__(self, kernels):
        self.host_s = kernels.host_s_per_op if kernels is not None else 0.0
        self.units: dict[int, Unit] = {}
        self.gpu: dict = defaultdict(float)
        self.gpu_c: dict = defaultdict(float)
        self.host: dict = defaultdict(float)

    def add(self, unit: Unit, key, gpu: float, gpu_c: float, host_ops: float) -> None:
        self.units[id(unit)] = unit
        k = (id(unit),) + key
        self.gpu[k] += gpu
        self.gpu_c[k] += gpu_c
        self.host[k] += host_ops * self.host_s

    def stall(self, unit: Unit, key, seconds: float) -> None:
        """Time neither the GPU nor the host computes (a host synchronisation)."""
        self.add(unit, key, seconds, seconds, 0)
        self.host[(id(unit),) + key] += seconds
        unit.host_wait += seconds

    def finish(self, units) -> None:
        for (uid, phase, part), g in self.gpu.items():
            unit, host = self.units[uid], self.host[(uid, phase, part)]
            t, t_c = max(g, host), max(self.gpu_c[(uid, phase, part)], host)
            unit.host_wait += t - g
            if phase == "fwd":
                unit.fwd[part] += t
                unit.fwd_c[part] += t_c
            else:
                grad = "input" if phase == "dgrad" else "weight"
                unit.bwd[(part, grad)] += t
                unit.bwd_c[(part, grad)] += t_c


def _host_syncs(graph, units, chunks: _Chunks, topo: Topology, kernels, full: bool) -> None:
    """An EP route reads its row counts back to the host before it can size the exchange
    (runtime/ep.py `Route`: one synchronous count exchange and `.tolist()`; the two-hop
    route four times): the GPU drains, the counts cross the EP group, and the host issues
    the next kernel. Charged to the attention chunk of each MoE unit's forward (and of
    its replay under full recomputation)."""
    spec = graph.spec
    if topo.ep <= 1:
        return
    from dsvc.compiler.passes.schedule import unit_name

    members = topo.group("expert", 0, topo.ep)
    routes = 4 if two_hop_route(spec, topo.ep) else 1
    per = routes * (2 * topo.latency(members) + kernels.host_s_per_op)
    for op in graph.ops():
        if op.kind != "dispatch" or op.stage is None:
            continue
        unit = units[op.stage][unit_name(op)]
        chunks.stall(unit, ("fwd", "attention"), per)
        if full:
            chunks.stall(unit, ("dgrad", "attention"), per)
