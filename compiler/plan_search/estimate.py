"""A fast step-time estimate per candidate plan, to order them before any is simulated.

The same kernel costs as the simulator (`passes.simulate_program.op_coster`: the
generated program's kernels in an FP8 plan's blocks, the eager modules' elsewhere, on
the calibrated card; `simulate_costs.roofline_times` elsewhere), summed per unit
(embedding, each kind of decoder layer, head, MTP module) of a graph lowered once per
(micro-batch size, recomputation); the units dealt to stages evenly; per device the
micro-batches through its stages times each stage's forward, backward and the expert
all-to-all it cannot hide (all of it without overlap; with dual micro-batch overlap,
what outlasts the compute, and the compute it slows: the simulator runs a chunk that
starts while an all-to-all is in flight on the SMs the communication kernels leave,
so as much compute as the all-to-all lasts is charged at that rate); the published
bubble of the schedule with the slowest stage's chunk times; the data-parallel
reduce-scatter, all-gather and optimizer step of the device's parameters. It ignores
what only the event simulation sees (where exposed communication falls, P2P latency,
the balancer's cuts), which is why the best estimates are then simulated in full.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

PHASES = ("fwd", "dgrad", "wgrad")
SKIPPED = ("input", "dispatch", "combine", "send", "recv", "collective")


@dataclasses.dataclass
class UnitCost:
    """One unit per micro-batch: seconds of forward, input-gradient and weight-gradient work,
    its parameters (non-expert, routed experts all copies), whether it has an all-to-all."""

    fwd: float = 0.0
    dgrad: float = 0.0
    wgrad: float = 0.0
    params: float = 0.0
    expert_params: float = 0.0
    moe: bool = False
    balance: float = 0.0  # the pipeline balancer's cost of the unit (partition_stages)


def variant(spec, c):
    """`spec` with candidate `c`'s parallel and train values (no rules run: for estimates;
    `search.evaluate` elaborates the candidates it simulates)."""
    p, t = spec.parallel, spec.train
    world = spec.cluster.world_size
    par = dataclasses.replace(p, pipeline=c.pipeline, data=world // c.pipeline, expert=c.expert,
                   schedule=c.schedule, overlap=c.overlap, zero=1)
    tr = dataclasses.replace(t, micro_batch=c.micro_batch, recompute=c.recompute)
    return dataclasses.replace(spec, parallel=par, train=tr)


class Estimator:
    """Step-time estimates of `spec`'s candidates (see the module docstring)."""

    def __init__(self, spec):
        from dsvc.compiler.passes.simulate import kernel_model
        from dsvc.compiler.passes.simulate_costs import Rates

        self.spec, self.kernels = spec, kernel_model(spec)
        self.rates = Rates.of(spec.cluster.gpu)
        k = self.kernels
        # compute time while communication kernels hold SMs, relative to all SMs
        self.contended = k.sms / k.contended_sms if k is not None else 1.0
        self._units: dict = {}
        self._graphs: dict = {}  # (micro-batch size, recompute) -> the lowered graph
        self._splits: dict = {}  # (units, schedule, stages) -> layers per stage
        c, net = spec.cluster, spec.cluster.network
        self.domain = c.nvlink.domain
        self.bw_nv = c.nvlink.effective
        self.bw_ib = net.effective if net is not None else c.nvlink.effective
        self.lat = net.latency_cross if net is not None else c.nvlink.latency

    # -- units -------------------------------------------------------------------------
    def units(self, micro_batch: int, recompute: str, ep: int,
              micro: int | None = None) -> dict[str, UnitCost]:
        """Unit kind ("embed", "layer:<attention>+<ffn>", "head", "mtp") -> its cost;
        `micro`: micro-batches per step (the generated program quantises each weight once
        a step; default: the spec's own)."""
        key = (micro_batch, recompute, ep, micro)
        if key not in self._units:
            self._units[key] = self._cost_units(micro_batch, recompute, ep, micro)
        return self._units[key]

    def _cost_units(self, micro_batch: int, recompute: str, ep: int,
                    micro: int | None) -> dict[str, UnitCost]:
        from dsvc.compiler.driver import run_until
        from dsvc.compiler.passes.partition_stages import gpu_rates, op_seconds
        from dsvc.compiler.passes.simulate_costs import roofline_times
        from dsvc.compiler.passes.simulate_program import ProgramBlocks, op_coster

        spec = self.spec
        key = (micro_batch, recompute)
        if key not in self._graphs:  # EP changes only the routed experts' local share
            spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, micro_batch=micro_batch,
                                                 recompute=recompute))
            # the passes up to `fuse`: the formats and fusion groups the simulator's graph
            # has (FP8 GEMMs, the generated program's kernels)
            self._graphs[key] = run_until(spec, "fuse", verify_ir=False)
        graph = self._graphs[key]
        spec = graph.spec
        balance_rates = gpu_rates(spec)
        coster = op_coster(graph, self.kernels, ep) if self.kernels is not None else None
        if coster is not None and micro is not None:
            coster.micro = max(1, micro)
        blocks = ProgramBlocks(graph)
        host_s = self.kernels.host_s_per_op if self.kernels is not None else 0.0
        m = spec.model
        first: dict[str, str] = {}  # unit kind -> the unit instance costed
        gpu: dict = defaultdict(float)
        host: dict = defaultdict(float)
        out: dict[str, UnitCost] = {}
        for op in graph.ops():
            if op.block == "layer":
                kind, inst = f"layer:{m.layers[op.layer].attention}+{m.layers[op.layer].ffn}", \
                    f"L{op.layer}"
            else:
                kind, inst = op.block, f"{op.block}{op.layer}"
            if first.setdefault(kind, inst) != inst:
                continue
            u = out.setdefault(kind, UnitCost())
            u.balance += op_seconds(op, graph.tokens, balance_rates)
            u.params += op.param_count if op.kind != "experts" else 0
            if op.kind == "experts":
                u.expert_params += op.param_count
                u.moe = True
            if op.kind in SKIPPED:
                continue
            if coster is None:
                for phase, t in zip(PHASES, roofline_times(op, blocks, graph.tokens, self.rates, ep)):
                    gpu[(kind, phase)] += t
                continue
            cost = coster.cost(op)
            for phase in PHASES:
                gpu[(kind, phase)] += cost.gpu[phase]
                host[(kind, phase)] += cost.host[phase] * host_s
        for kind, u in out.items():
            for phase in PHASES:
                setattr(u, phase, max(gpu[(kind, phase)], host[(kind, phase)]))
        return out

    # -- communication -----------------------------------------------------------------
    def alltoall_s(self, tokens: int, ep: int, recompute: str) -> float:
        """Seconds of one MoE layer's all-to-alls per micro-batch, forward and backward
        (dispatch and combine each way; a full recomputation sends the forward's again)."""
        from dsvc.compiler.costs.comm import routing_copies
        from dsvc.compiler.costs.memory import dispatch_element_bytes
        from dsvc.dsl.spec import DTYPE_BYTES

        if ep <= 1:
            return 0.0
        spec = self.spec
        ffn = next(f for f in spec.model.ffns.values() if f.kind == "moe")
        _, ib, nv, _ = routing_copies(ffn.top_k, ffn.groups, ffn.top_groups, ep, self.domain,
                                      spec.parallel.two_hop)
        per_row = spec.model.hidden * (dispatch_element_bytes(spec.precision)
                                       + DTYPE_BYTES[spec.precision.combine])
        one_way = max(tokens * ib * per_row / self.bw_ib, tokens * nv * per_row / self.bw_nv)
        directions = 3 if recompute == "full" else 2
        return directions * (one_way + 2 * self.lat)

    # -- one candidate -----------------------------------------------------------------
    def step_s(self, c) -> float:
        """The estimated step time of candidate `c`."""
        from dsvc.compiler.schedules.formulas import published_bubble

        spec = self.spec
        m, world = spec.model, spec.cluster.world_size
        data = world // c.pipeline
        micro = spec.train.global_batch // (data * c.micro_batch)
        units = self.units(c.micro_batch, c.recompute, c.expert, micro)
        tokens = c.micro_batch * spec.train.seq_len
        comm = self.alltoall_s(tokens, c.expert, c.recompute)
        n = 2 * c.pipeline if c.schedule == "dualpipev" else c.pipeline
        overlap = c.overlap == "dual_microbatch"
        stages = []
        for s, layers in enumerate(self._split(units, c, n)):
            kinds = [f"layer:{m.layers[i].attention}+{m.layers[i].ffn}" for i in layers]
            if s == 0:
                kinds.append("embed")
            if s == n - 1:
                kinds += ["head"] + ["mtp"] * m.mtp.depth
            us = [units[k] for k in kinds if k in units]
            f = sum(u.fwd for u in us)
            b = sum(u.dgrad + u.wgrad for u in us)
            w = sum(u.wgrad for u in us)
            a2a = comm * sum(u.moe for u in us)
            if overlap:  # compute beside an all-to-all in flight runs on the SMs it leaves
                slowed = (f + b) + min(f + b, a2a) * (self.contended - 1.0)
                exposed = max(a2a, slowed) - (f + b)
            else:
                exposed = a2a
            params = sum(u.params + u.expert_params / max(1, c.expert) for u in us)
            stages.append((f, b, w, exposed, params))
        if c.schedule == "dualpipe":
            held = [(i, n - 1 - i) for i in range(c.pipeline)]
            per_stage = micro / 2
        elif c.schedule == "dualpipev":
            held = [(i, n - 1 - i) for i in range(c.pipeline)]
            per_stage = micro
        else:
            held = [(i,) for i in range(n)]
            per_stage = micro
        busy = [sum(per_stage * (stages[s][0] + stages[s][1] + stages[s][3]) for s in d)
                for d in held]
        f = max(st[0] for st in stages)
        b = max(st[1] + st[3] for st in stages)
        w = max(st[2] for st in stages)
        bubble = max(0.0, published_bubble(c.schedule, n, f, b, w))
        tail = max(self._dp_tail(sum(stages[s][4] for s in d), data) for d in held)
        return max(busy) + bubble + tail

    def _split(self, units: dict, c, n: int) -> list[range]:
        """The layers of each of candidate `c`'s `n` stages as the pipeline balancer cuts
        them (`units` its unit costs; an explicit `layers_per_stage` as written)."""
        from dsvc.compiler.passes.partition_stages import balance

        m, p = self.spec.model, self.spec.parallel
        if p.layers_per_stage is not None:
            counts = list(p.layers_per_stage)
        else:
            kinds = [f"layer:{layer.attention}+{layer.ffn}" for layer in m.layers]
            schedule = c.schedule
            key = (c.micro_batch, c.recompute, schedule, n)  # no EP: the balancer counts all experts
            if key not in self._splits:
                costs = [units[k].balance for k in kinds]
                last = sum(units[k].balance for k in ("head", "mtp") if k in units)
                last += units["mtp"].balance * (m.mtp.depth - 1) if "mtp" in units else 0.0
                first = units["embed"].balance if "embed" in units else 0.0
                paired = schedule in ("dualpipe", "dualpipev") and n > 1
                self._splits[key] = balance(costs, first, last, n, paired)
            counts = self._splits[key]
        out, start = [], 0
        for c in counts:
            out.append(range(start, start + c))
            start += c
        return out

    def _dp_tail(self, params: float, data: int) -> float:
        """Reduce-scatter of fp32 gradients and all-gather of fp32 weights over DP, and the
        optimizer step of the shard (the simulator's, simplified to one group)."""
        link = self.bw_nv if data <= self.domain else self.bw_ib
        ring = 2 * 4 * params * (data - 1) / data / link if data > 1 else 0.0
        if self.kernels is not None:
            return ring + self.kernels.copy(params * 24 + params / data * 60)
        return ring + params / data * 20 / self.rates.hbm
