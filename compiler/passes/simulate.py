"""Pass `simulate`: one training step on the cluster, event by event; and `simulate_step(spec)`.

The schedule pass's action lists run on the partitioned graph's costs:

* every compute action (forward, backward, its input / weight halves, an
  overlapped F&B pair) takes the time its chunks take on the GPU, all-to-alls
  played on the links as `simulate_play` describes (exposed communication is
  what the compute stream waits for);
* pipeline sends take latency + bytes / bandwidth of their link class, shared
  with the sender's all-to-all traffic;
* after a stage's last backward its data-parallel collectives (the DualPipe
  copies' gradient sum, ZeRO-1 reduce-scatter, the optimizer step on the shard,
  the all-gather of updated weights) queue on the device's network link while
  the device's other stage may still compute.

Data-parallel replicas are symmetric, so one replica is simulated: one device
per pipeline rank, carrying its share of the expert all-to-all traffic. The
result (`StepResult`, also `graph.simulation`) has the step time, the bubble,
exposed communication, peak activation memory per rank, tokens per day and
MFU (causal and non-causal FLOPs against the dense BF16 peak, the DeepSeek-V3
report's accounting). docs/simulate.md lists the assumptions.
"""

from __future__ import annotations

import dataclasses

from .simulate_costs import IB, Rates, Topology, stage_profiles
from .simulate_play import ActionCosts, TopologyCosts

SECONDS_PER_DAY = 86400


@dataclasses.dataclass(frozen=True)
class StepResult:
    """One simulated training step. Times in seconds; per-device tuples indexed by
    pipeline rank (one data-parallel replica stands for all)."""

    kind: str
    overlap: str
    num_microbatches: int
    step_time_s: float
    pipeline_s: float  # makespan of the pipeline phase (last compute anywhere)
    compute_s: tuple  # per device: GPU compute
    exposed_comm_s: tuple  # per device: all-to-all time the compute stream waited for
    bubble_s: tuple  # per device: idle during the pipeline phase
    dp_comm_s: tuple  # per device: data-parallel collectives and optimizer step
    dp_exposed_s: float  # step time beyond the pipeline phase
    activations_in_flight: tuple  # per device: micro-batch stage activations held at most
    peak_activation_bytes: tuple  # per device: the same in bytes
    tokens_per_step: int
    flops_per_token: float  # training FLOPs, causal attention (the convention)
    flops_per_token_noncausal: float
    world: int
    peak_flops: float  # dense BF16 peak per GPU (the MFU reference)
    assumptions: tuple[str, ...]
    sim: object = dataclasses.field(repr=False, compare=False, default=None)  # SimResult
    # per device: GPU seconds per step by kind of kernel (simulate_ops.KERNEL_KINDS, the
    # optimizer's under "memory"; each with every SM: the slowdown while communication
    # kernels hold some, under dual micro-batch overlap, is in no kind) and "host", the
    # seconds its GPU waits for the host; empty without a calibrated card
    # (bench/simulate_vs_measured.py sets it beside a profiled step, bench/step_profile.py)
    gpu_by_kind: tuple = dataclasses.field(repr=False, compare=False, default=())

    @property
    def bubble_max_s(self) -> float:
        return max(self.bubble_s)

    @property
    def bubble_fraction(self) -> float:
        """Idle device-time in the step over all device-time (pipeline phase idle only)."""
        return sum(self.bubble_s) / (len(self.bubble_s) * self.step_time_s)

    @property
    def exposed_comm_max_s(self) -> float:
        return max(self.exposed_comm_s)

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_step / self.step_time_s * SECONDS_PER_DAY

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation with causal attention FLOPs (DeepSeek-V3's 38.94%)."""
        return self.tokens_per_step * self.flops_per_token / (
            self.step_time_s * self.world * self.peak_flops)

    @property
    def mfu_noncausal(self) -> float:
        return self.tokens_per_step * self.flops_per_token_noncausal / (
            self.step_time_s * self.world * self.peak_flops)

    def to_json(self) -> dict:
        """The `dsvc inspect --schedule --format json` figures (timeline excluded)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sim"}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        for name in ("bubble_max_s", "bubble_fraction", "exposed_comm_max_s", "tokens_per_day",
                     "mfu", "mfu_noncausal"):
            out[name] = getattr(self, name)
        return {"format": "dsvc-step-simulation", "version": 1, **out}


def simulate(graph):
    """A copy of `graph` with `simulation` set to the `StepResult` (None, with a note,
    when the spec lacks a cluster, parallel or train block to simulate with)."""
    sched = graph.schedule
    assert sched is not None, "the simulate pass runs after the schedule pass"
    missing = missing_blocks(graph.spec)
    if missing:
        note = f"step not simulated: no {' / '.join(missing)} block"
        out, result = graph.derive("simulate", notes=graph.notes + (note,)), None
    else:
        out, result = graph.derive("simulate"), simulate_graph(graph, sched)
    out.simulation = result
    return out


def missing_blocks(spec) -> list[str]:
    """The blocks a training step needs that `spec` lacks."""
    return [b for b in ("cluster", "parallel", "train") if getattr(spec, b) is None]


def simulate_graph(graph, sched) -> StepResult:
    """Simulate `sched` on `graph` (after insert_comm) and the spec's cluster."""
    from dsvc.compiler.schedules import simulate as run_schedule

    spec, pipe = graph.spec, graph.partition
    topo, rates = Topology(spec), Rates.of(spec.cluster.gpu)
    kernels = kernel_model(spec)
    profiles = stage_profiles(graph, topo, rates, kernels)
    stage_part = {s.index: s.part for s in pipe.stages}
    actions = ActionCosts(profiles, stage_part, topo.bandwidth)
    p2p = {}
    for s in range(sched.num_stages):
        nxt = sched.next_stage(s)
        if nxt is not None:
            a, b = sched.stage_device[s], sched.stage_device[nxt]
            ranks = [topo.rank(a), topo.rank(b)]
            p2p[(a, b)] = p2p[(b, a)] = (topo.link(ranks), topo.latency(ranks))
    boundary: dict[tuple[int, int], float] = {}
    for op in graph.ops():
        if op.kind == "send":
            edge = (op.attr("from_stage"), op.attr("to_stage"))
            boundary[edge] = boundary.get(edge, 0.0) + graph.num(op.attr("bytes"))
    costs = TopologyCosts(actions, sched, profiles, p2p, boundary, topo.bandwidth)
    sim = run_schedule(sched, costs)
    dp_busy, dp_end, optimizer = _data_parallel_tail(graph, sched, sim, topo, rates, kernels,
                                                     costs.utilisation)
    step = max([sim.makespan] + dp_end)
    n = sched.num_devices
    flops, flops_nc = _flops_per_token(graph)
    gpu = spec.cluster.gpu
    return StepResult(
        kind=sched.kind, overlap=spec.parallel.overlap, num_microbatches=sched.num_microbatches,
        step_time_s=step, pipeline_s=sim.makespan,
        compute_s=tuple(sim.busy[d] - sim.exposed_comm[d] for d in range(n)),
        exposed_comm_s=tuple(sim.exposed_comm), bubble_s=tuple(sim.bubble),
        dp_comm_s=tuple(dp_busy), dp_exposed_s=step - sim.makespan,
        activations_in_flight=tuple(sim.activations_in_flight),
        peak_activation_bytes=tuple(sim.peak_activation),
        tokens_per_step=spec.train.global_batch * spec.train.seq_len,
        flops_per_token=flops, flops_per_token_noncausal=flops_nc,
        world=spec.cluster.world_size, peak_flops=gpu.bf16_flops,
        assumptions=_assumptions(spec, topo, kernels) + tuple(graph.notes), sim=sim,
        gpu_by_kind=_by_kind(sched, profiles, stage_part, optimizer) if kernels else ())


def _by_kind(sched, profiles, stage_part, optimizer) -> tuple:
    """Per device: its stages' GPU seconds by kind, per micro-batch each stage runs there
    (its forwards in the device's actions: DualPipe splits the micro-batches between two
    directions), with its optimizer step as memory-bound work."""
    from dsvc.runtime.actions import FORWARD

    out = []
    for d in range(sched.num_devices):
        kinds: dict[str, float] = {}
        for a in sched.actions[d]:
            for part in a.parts():
                if part.kind != FORWARD:
                    continue
                for kind, t in profiles[stage_part[part.stage]].by_kind.items():
                    kinds[kind] = kinds.get(kind, 0.0) + t
        kinds["memory"] = kinds.get("memory", 0.0) + optimizer[d]
        out.append(kinds)
    return tuple(out)


STATED_FACTORS = ("gemm_efficiency_fp8", "gemm_efficiency_bf16", "memory_efficiency")


def kernel_model(spec):
    """The calibrated kernel model of the spec's GPU (`costs.kernel_rates`), or None: a card the
    calibration does not know, or a spec that states its own efficiency factors (then
    the roofline with those factors is what it asked for)."""
    from dsvc.compiler.costs.kernel_rates import KernelModel

    if any(f"cluster.gpu.{f}" in spec.spans for f in STATED_FACTORS):
        return None
    return KernelModel.for_gpu(spec.cluster.gpu)


def _data_parallel_tail(graph, sched, sim, topo: Topology, rates: Rates, kernels=None,
                        utilisation=None):
    """Per device: seconds of DP collectives + optimizer, when the last one ends, and the
    optimizer's seconds alone.

    A collective on the network shares the link with the device's all-to-alls while its
    other stage still runs them (processor sharing, as a pipeline send does: the
    device's average utilisation of that link halves the share it gets)."""
    spec, pipe = graph.spec, graph.partition
    by_part: dict[int, list] = {}
    params: dict[int, list[float]] = {p: [0.0, 0.0] for p in range(pipe.parts)}  # dense, expert
    for op in graph.ops():
        if op.kind == "collective":
            by_part.setdefault(op.stage, []).append(op)
        elif op.param_count and op.stage is not None:
            params[op.stage][op.kind == "experts"] += op.param_count
    ready = {}  # global stage -> end of its last action
    for row in sim.timeline:
        for t in row:
            for p in t.action.parts():
                ready[p.stage] = max(ready.get(p.stage, 0.0), t.end)
    part_of = {s.index: s.part for s in pipe.stages}
    part_stages: dict[int, list[int]] = {}
    for s in pipe.stages:
        part_stages.setdefault(s.part, []).append(s.index)
    order = {"all_reduce": 0, "reduce_scatter": 1, "all_gather": 3}
    busy, end = [0.0] * sched.num_devices, [0.0] * sched.num_devices
    optimizer = [0.0] * sched.num_devices
    for d in range(sched.num_devices):
        jobs = []
        for s in sorted(sched.device_stages(d), key=lambda s: (ready.get(s, 0.0), s)):
            part = part_of[s]
            peers = [x for x in part_stages[part] if x != s]
            ops = by_part.get(part, [])
            at = ready.get(s, 0.0)  # the copies' gradient sum also waits for the other copy
            if any(op.attr("group") == "copies" for op in ops):
                at = max([at] + [ready.get(x, 0.0) for x in peers])
            peer_dev = sched.stage_device[peers[0]] if peers else d
            others_busy = any(ready.get(x, 0.0) > at for x in sched.device_stages(d) if x != s)
            for op in ops:
                kind = op.attr("collective")
                members = topo.group(op.attr("group"), d, op.attr("group_size"), peer_dev)
                share = 1.0
                if utilisation is not None and others_busy:
                    share = 1.0 - utilisation[d].get(topo.link(members), 0.0) / 2
                jobs.append((at, s, order[kind], _ring_time(kind, op.attr("bytes"), members,
                                                           topo) / share))
            step = _optimizer_time(spec, params[part], rates, kernels)
            optimizer[d] += step
            jobs.append((at, s, 2, step))
        clock = 0.0
        for at, _, _, seconds in sorted(jobs):
            clock = max(clock, at) + seconds
            busy[d] += seconds
        end[d] = clock
    return busy, end, optimizer


def _ring_time(kind: str, nbytes: float, members: list[int], topo: Topology) -> float:
    """Ring algorithm: reduce-scatter / all-gather move (n-1)/n of the buffer per rank,
    all-reduce twice that; one latency per ring step."""
    n = len(members)
    if n <= 1:
        return 0.0
    rounds = 2 if kind == "all_reduce" else 1
    link = topo.link(members)
    return rounds * ((n - 1) / n * nbytes / topo.bandwidth[link]
                     + (n - 1) * topo.latency(members))


def _optimizer_time(spec, params: list[float], rates: Rates, kernels=None) -> float:
    """The optimizer step of one stage's parameters, memory-bound.

    With a calibrated card, the runtime's ZeRO-1 step (runtime/optim.py): per shard group
    the gradients flattened into one fp32 buffer (zeroed, concatenated, copied: ~16 B
    per parameter held), the shard scaled, its norm, the clip; AdamW on the shard with
    its moments round-tripped through fp32 (~60 B per shard element: master, moments,
    temporaries), and the gathered shard written back into the parameters (~8 B
    per parameter). Else the textbook AdamW traffic on the shard."""
    from dsvc.dsl.spec import DTYPE_BYTES

    p, pol = spec.parallel, spec.precision
    dense, expert = params
    expert = expert / p.expert
    if p.zero >= 1:
        shard = dense / p.data + expert / max(1, p.expert_data)
    else:
        shard = dense + expert
    if kernels is not None:
        return kernels.copy((dense + expert) * (16 + 8) + shard * 60)
    per_param = (2 * DTYPE_BYTES[pol.master_weights] + DTYPE_BYTES[pol.grads]
                 + 4 * DTYPE_BYTES[pol.optimizer_states] + DTYPE_BYTES[pol.default])
    return shard * per_param / rates.hbm


def _flops_per_token(graph) -> tuple[float, float]:
    """Training FLOPs per token of the main model (MTP excluded, the report's convention),
    with the attention core causal as lowered, and with it non-causal (twice)."""
    causal = extra = 0.0
    for op in graph.ops():
        if op.block in ("embed", "layer", "head"):
            f = graph.num(op.flops)
            causal += f
            if op.kind == "attention_core" and op.attr("causal", False):
                extra += f
    return causal / graph.tokens, (causal + extra) / graph.tokens


def _assumptions(spec, topo: Topology, kernels=None) -> tuple[str, ...]:
    g = spec.cluster.gpu
    bw = topo.bandwidth
    recompute = spec.train.recompute
    if kernels is not None:
        run = kernels.runs[0] if kernels.runs else {}
        card = (f"{kernels.card.upper()} with {kernels.borrowed_from.upper()}'s measurements"
                if kernels.borrowed_from else kernels.card.upper())
        out = [(f"kernels timed as this trainer runs them ({card}: bench/kernels_gpu.py "
                f"{run.get('date', '')}, compiler/costs/calibration.json): FP8 GEMMs in waves "
                "of 128 x 128 tiles, cuBLAS BF16, grouped experts padded to whole tiles, "
                "quantisers and element-wise kernels at their measured share of copy bandwidth, "
                f"attention at {kernels.attn_fwd:.0%} / {kernels.attn_bwd:.0%} of the BF16 peak "
                f"(forward / backward); {kernels.host_s_per_op * 1e6:.0f} us of host time per "
                f"eager op; {kernels.comm_sms} of {kernels.sms} SMs go to communication "
                "kernels while an all-to-all overlaps compute")]
    else:
        out = [(f"GEMMs at {g.gemm_efficiency_fp8:.0%} of the FP8 peak and "
                f"{g.gemm_efficiency_bf16:.0%} of the BF16 peak; memory-bound ops at "
                f"{g.memory_efficiency:.0%} of HBM bandwidth (cluster.gpu efficiency factors); "
                "attention core at the BF16 GEMM efficiency; no host overheads")]
    out += [
        (f"links: NVLink {bw['nvlink'] / 1e9:.0f} GB/s, network {bw[IB] / 1e9:.0f} GB/s per GPU "
        "(effective); transfers sharing a link split it equally"),
        (f"expert all-to-all bytes for uniform routing (the graph's); recompute = {recompute}"
         + (" (the backward replays the forward work it recomputes)" if recompute != "none"
            else "")),
        ("DP collectives: ring algorithm, after each stage's last backward, sharing the "
         "network with the device's other stage's all-to-alls; not overlapped with the next "
         "step; the optimizer step memory-bound"),
    ]
    return tuple(out)

