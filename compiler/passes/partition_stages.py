"""Pass `partition_stages`: every op on exactly one pipeline stage, balanced by cost.

Units are whole decoder layers (the runtime builds stages from layer lists);
the embedding is pinned to the first stage, the final norm, head, loss and
the MTP modules (which share the head) to the last. Stage ids follow
docs/language.md and the schedules: 1F1B / ZB1P run part p on rank p; DualPipe runs
two copies of the model, copy A's stage p (part p) on rank p and copy B's
global stage PP + p (part p) on rank PP-1-p; DualPipeV runs 2R parts of one
copy on R ranks, part p on rank min(p, 2R-1-p). Ops carry the per-copy stage
index (`part`); `Graph.pipeline` maps parts to global stages and devices.

Cost is the estimated time of a micro-batch's forward and backward on the
cluster's GPU (`op_seconds`): GEMM FLOPs over the peak of their format times
the spec's efficiency factors, element-wise traffic over HBM bandwidth. The
balancer minimises, in order: the largest stage; under DualPipe(V) the
largest device load (the two stages a rank interleaves); then the sum of
squared device and stage loads (so no stage is left nearly empty).
`parallel { layers_per_stage = [...] }` overrides it.
"""

from __future__ import annotations

import bisect
import math
import struct

from dsvc.compiler.ir import Graph, Op, Pipeline, StageInfo, num
from dsvc.dsl.diagnostics import Diagnostic, SpecError

# Nominal GPU when the spec has no cluster: an H800 at the default efficiency factors.
_NOMINAL = {"bf16": 989e12 * 0.67, "fp8": 1979e12 * 0.51, "hbm": 3.35e12 * 0.89}
_ELEMENTWISE_PASSES = 3  # forward reads + writes, backward about twice that
_EPS = 1e-9


def partition_stages(graph: Graph) -> Graph:
    """A copy of `graph` with every op on a stage and the pipeline table filled in."""
    spec = graph.spec
    p = spec.parallel
    schedule = p.schedule if p is not None else "1f1b"
    ranks = p.pipeline if p is not None else 1
    parts = 2 * ranks if schedule == "dualpipev" else ranks
    paired = schedule in ("dualpipe", "dualpipev") and parts > 1
    rates = gpu_rates(spec)
    n = spec.model.num_layers
    layer_cost, first, last = [0.0] * n, 0.0, 0.0
    for op in graph.ops():
        c = op_seconds(op, graph.tokens, rates)
        if op.block == "layer":
            layer_cost[op.layer] += c
        elif op.block == "embed":
            first += c
        else:
            last += c
    if p is not None and p.layers_per_stage is not None:
        counts, by = _explicit_counts(spec, parts), "layers_per_stage"
    else:
        counts, by = balance(layer_cost, first, last, parts, paired), "cost"
    part_of_layer = [k for k, c in enumerate(counts) for _ in range(c)]
    out = graph.derive("partition_stages")
    for op in graph.ops():
        if op.block == "layer":
            part = part_of_layer[op.layer]
        else:
            part = 0 if op.block == "embed" else parts - 1
        out.replace(op.evolve(stage=part))
    costs = _part_costs(layer_cost, first, last, counts)
    stages = _stages(schedule, ranks, parts, counts, spec.model.mtp.depth > 0)
    device_cost = [0.0] * ranks
    for s in stages:  # a device's load: every stage it holds (two under DualPipe(V))
        device_cost[s.device] += costs[s.part]
    out.pipeline = Pipeline(schedule=schedule, ranks=ranks, parts=parts,
                            copies=2 if schedule == "dualpipe" else 1, stages=tuple(stages),
                            part_cost=tuple(costs), device_cost=tuple(device_cost), balanced_by=by)
    return out


# ----------------------------------------------------------------------------- cost model


def gpu_rates(spec) -> dict[str, float]:
    """Achievable FLOP/s per format and HBM bytes/s, from the cluster's GPU."""
    c = spec.cluster
    if c is None:
        return dict(_NOMINAL)
    g = c.gpu
    return {"bf16": g.bf16_flops * g.gemm_efficiency_bf16, "fp8": g.fp8_flops * g.gemm_efficiency_fp8,
            "hbm": g.hbm * g.memory_efficiency}


def op_seconds(op: Op, tokens: int, rates: dict[str, float]) -> float:
    """Estimated forward + backward seconds of `op` for one micro-batch."""
    flops = num(op.flops, tokens)
    if flops:
        if op.dtype.startswith("fp8"):
            rate = rates["fp8"]
        elif op.dtype == "fp32":
            rate = rates["bf16"] / 2  # TF32 tensor cores: half the bf16 rate
        else:
            rate = rates["bf16"]
        return flops / rate
    traffic = sum(num(t.nbytes, tokens) for t in op.inputs + op.outputs)
    return _ELEMENTWISE_PASSES * traffic / rates["hbm"]


# ----------------------------------------------------------------------------- the balancer


def balance(costs: list[float], first: float, last: float, parts: int, paired: bool) -> list[int]:
    """Layers per part: contiguous, `first` added to part 0 and `last` to the last part.

    Minimises the largest part; when `paired` (part p shares a device with
    part parts-1-p), then the largest device load; then the sum of squares.
    """
    n = len(costs)
    if parts == 1:
        return [n]
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    extra = [(first if p == 0 else 0.0) + (last if p == parts - 1 else 0.0) for p in range(parts)]
    cap = _min_max_parts(pre, extra) * (1 + _EPS)
    flat = _min_squares_parts(pre, extra, cap)
    if not paired:
        return flat
    loads = _part_costs(costs, first, last, flat)
    bound = max(loads[p] + loads[parts - 1 - p] for p in range(parts // 2)) * (1 + _EPS)
    device_cap = _paired_dp(pre, extra, cap, bound, minimise_max=True)[0] * (1 + _EPS)
    return _paired_dp(pre, extra, cap, device_cap, minimise_max=False)[1]


def _min_max_parts(pre: list[float], extra: list[float]) -> float:
    """The least cap under which `len(extra)` contiguous parts (empty ones allowed) cover
    the layers, part p over layers [i, j) costing `extra[p] + (pre[j] - pre[i])`: the
    min-max part cost. A greedy packing (each part as far as the cap allows) decides a
    cap in O(parts log layers): a later start never raises a later part's cost, that
    expression being monotone even in floating point. Feasibility only grows with the
    cap, so a bisection over the bit patterns of the doubles finds the least feasible
    one in at most 64 checks: the exact optimum of the O(parts x layers^2) dynamic
    programme over the same expression, in linear time."""
    def fits(cap: float) -> bool:
        i, n = 0, len(pre) - 1
        for add in extra:
            if add > cap:
                return False
            lo, hi = i, n  # the furthest j with add + (pre[j] - pre[i]) <= cap
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if add + (pre[mid] - pre[i]) <= cap:
                    lo = mid
                else:
                    hi = mid - 1
            i = lo
        return i == n

    def bits(x: float) -> int:
        return struct.unpack("<q", struct.pack("<d", x))[0]

    def value(b: int) -> float:
        return struct.unpack("<d", struct.pack("<q", b))[0]

    if fits(0.0):
        return 0.0
    lo, hi = bits(0.0), bits(math.inf)  # non-negative doubles are ordered as their bits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(value(mid)):
            hi = mid
        else:
            lo = mid
    return value(hi)


def _min_squares_parts(pre: list[float], extra: list[float], cap: float) -> list[int]:
    n, inf = len(pre) - 1, float("inf")
    best: list[tuple[float, tuple]] = [(0.0, ())] + [(inf, ())] * n
    for add in extra:
        nxt = [(inf, ())] * (n + 1)
        for i in range(n + 1):
            v0, counts = best[i]
            if v0 == inf:
                continue
            for j in range(i, n + 1):
                c = add + pre[j] - pre[i]
                if c > cap:
                    break
                if v0 + c * c < nxt[j][0]:
                    nxt[j] = (v0 + c * c, counts + (j - i,))
        best = nxt
    return list(best[n][1])


def _paired_dp(pre: list[float], extra: list[float], cap: float, device_cap: float,
               minimise_max: bool):
    """DP from both ends: pair d takes part d from the front and part parts-1-d from the back.

    Parts cost at most `cap`, pairs at most `device_cap`. Minimises the largest
    pair load (`minimise_max`), else the sum of squared pair loads plus half
    the squared part loads. Returns (value, layers per part).
    """
    parts, inf = len(extra), float("inf")
    half = parts // 2
    states = {(0, len(pre) - 1): 0.0}  # (front end, back start) -> best value so far
    levels = []  # per pair: (front end, back start) -> parent state
    for d in range(half):
        add_f, add_b = extra[d], extra[parts - 1 - d]
        nxt: dict = {}
        parent: dict = {}
        last_pair = d == half - 1
        room_left = (half - d - 1) * min(2 * cap, device_cap)  # what later pairs can take
        for (i, j), v0 in sorted(states.items()):
            a_end = min(j, bisect.bisect_right(pre, pre[i] + cap - add_f) - 1)
            for a in range(i, a_end + 1):
                cf = add_f + pre[a] - pre[i]
                room = min(cap, device_cap - cf)  # what the back part may cost
                b_start = max(a, bisect.bisect_left(pre, pre[j] + add_b - room))
                if pre[j] - pre[a] > room_left + cap:  # cannot finish even with this back part
                    continue
                for b in ((a,) if a >= b_start else ()) if last_pair else range(b_start, j + 1):
                    if pre[b] - pre[a] > room_left:
                        continue  # the middle would not fit into the remaining pairs
                    cb = add_b + pre[j] - pre[b]
                    load = cf + cb
                    if minimise_max:
                        v = max(load, v0)
                    else:
                        v = v0 + load * load + 0.5 * (cf * cf + cb * cb)
                    if v < nxt.get((a, b), inf):
                        nxt[(a, b)] = v
                        parent[(a, b)] = (i, j)
        states = nxt
        levels.append(parent)
    key = min((k for k in states if k[0] == k[1]), key=lambda k: (states[k], k))
    value = states[key]
    front, back = [], []
    for parent in reversed(levels):
        i, j = parent[key]
        front.append(key[0] - i)
        back.append(j - key[1])
        key = (i, j)
    return value, front[::-1] + back


def _part_costs(layer_cost, first, last, counts) -> list[float]:
    out, i = [], 0
    for p, c in enumerate(counts):
        out.append(sum(layer_cost[i:i + c]) + (first if p == 0 else 0.0)
                   + (last if p == len(counts) - 1 else 0.0))
        i += c
    return out


def _explicit_counts(spec, parts: int) -> list[int]:
    lps = list(spec.parallel.layers_per_stage)
    if len(lps) == 2 * parts and lps[:parts] == lps[parts:] and spec.parallel.schedule == "dualpipe":
        lps = lps[:parts]  # both copies written out (global stage order): the same split
    if len(lps) != parts or sum(lps) != spec.model.num_layers:
        raise SpecError([Diagnostic(
            "error", f"layers_per_stage needs {parts} entries (stages per model copy) summing to "
            f"{spec.model.num_layers}, got {len(lps)} summing to {sum(lps)}",
            spec.span("parallel.layers_per_stage"))])
    return lps


def _stages(schedule: str, ranks: int, parts: int, counts, has_mtp: bool) -> list[StageInfo]:
    starts = [sum(counts[:p]) for p in range(parts)]

    def info(index, copy, p, device):
        return StageInfo(index=index, copy=copy, part=p, device=device,
                         layers=tuple(range(starts[p], starts[p] + counts[p])), embedding=p == 0,
                         head=p == parts - 1, mtp=p == parts - 1 and has_mtp)

    if schedule == "dualpipe":
        return ([info(p, "A", p, p) for p in range(parts)]
                + [info(parts + p, "B", p, parts - 1 - p) for p in range(parts)])
    if schedule == "dualpipev":
        return [info(p, "A", p, min(p, parts - 1 - p)) for p in range(parts)]
    return [info(p, "A", p, p) for p in range(parts)]


def stage_contents(graph: Graph, micro_batches) -> list[tuple]:
    """The partition as `compiler.costs.layout.StageContents` per device (the report's input).

    Same conventions as `costs.layout.even_layout`, which it replaces once the
    graph exists: a stage at position p of n holds n - p micro-batches at peak;
    under DualPipe each direction carries half of `micro_batches`.
    """
    from dsvc.compiler.costs.layout import StageContents

    pipe = graph.pipeline
    per_stage = micro_batches / 2 if pipe.schedule == "dualpipe" else micro_batches
    depth = graph.spec.model.mtp.depth
    out = []
    for device in range(pipe.ranks):
        held = sorted((s for s in pipe.stages if s.device == device), key=lambda s: s.index)
        out.append(tuple(StageContents(index=s.index, position=s.part, layers=s.layers,
                                       embedding=s.embedding, head=s.head,
                                       mtp=depth if s.mtp else 0, in_flight=pipe.parts - s.part,
                                       micro_batches=per_stage) for s in held))
    return out
