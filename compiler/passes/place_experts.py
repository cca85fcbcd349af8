"""Pass `place_experts`: routed experts of every MoE layer onto expert-parallel ranks.

Primary copies are contiguous: EP rank r holds experts [r*E/R, (r+1)*E/R).
Routing groups are contiguous id ranges too (group g = experts
[g*E/G, (g+1)*E/G)), and EP ranks fill nodes in order (EP rank r sits on
node r // gpus_per_node of its EP group: global rank = pipeline rank x data +
data rank, data innermost), so with G equal to the nodes an EP group spans,
group g lives entirely on node g: DeepSeek-V3's 256 experts, 4 per GPU on 64
GPUs, group g on node g of 8. Node-limited routing then bounds the nodes a
token reaches by `top_groups`.

Redundant experts (EPLB-style): from a load histogram (`--expert-load F` or
`parallel { expert_load = "F" }`, format in docs/ir.md) each layer's hottest
experts get extra replicas, `parallel.redundant_experts` slots in all
(default: one per EP rank when a histogram is given). Replica counts go
greedily to the expert with the highest load per copy; each replica goes to
the least-loaded rank with a free slot on a node that holds no copy of that
expert yet (other nodes first, so a hot expert is served from several nodes).
"""

from __future__ import annotations

import functools
import heapq
import os

from dsvc.compiler.ir import Graph, Placement
from dsvc.dsl.diagnostics import Diagnostic, Span, SpecError


def place_experts(graph: Graph, expert_load: str | None = None) -> Graph:
    """A copy of `graph` whose `experts` ops carry a `Placement`.

    `expert_load` (a path) overrides the spec's `parallel.expert_load`.
    """
    spec = graph.spec
    p = spec.parallel
    ep = p.expert if p is not None else 1
    gpn = spec.cluster.gpus_per_node if spec.cluster is not None else ep
    experts = [op for op in graph.ops() if op.kind == "experts"]
    histogram, source = _read_histogram(spec, expert_load,
                                        {op.layer: op.attr("routed") for op in experts})
    redundant = p.redundant_experts if p is not None else 0
    out = graph.derive("place_experts")
    if histogram is not None and redundant == 0 and ep > 1:
        redundant = ep
        out.notes = out.notes + (
            f"expert load from {source}: redundant_experts unset, using one per EP rank ({ep})",)
    for op in experts:
        routed = op.attr("routed")
        ffn = spec.model.ffns[op.attr("ffn")]
        load = histogram.get(op.layer, ()) if histogram is not None else ()
        place = place_layer(routed, ffn.groups, ep, gpn, redundant if load else 0, load)
        out.replace(op.with_attrs(placement=place))
    return out


@functools.cache
def place_layer(routed: int, groups: int, ep: int, gpus_per_node: int, redundant: int = 0,
                load: tuple[float, ...] = ()) -> Placement:
    """The placement of one layer's routed experts (cached: layers usually share it)."""
    per = routed // ep
    size = routed // max(groups, 1)
    node_of_rank = tuple(r // max(gpus_per_node, 1) for r in range(ep))
    ranks = [list(range(r * per, (r + 1) * per)) for r in range(ep)]
    if redundant and load and ep > 1:
        _add_replicas(ranks, node_of_rank, load, redundant)
    return Placement(routed=routed, per_rank=tuple(tuple(r) for r in ranks),
                     group_of_expert=tuple(e // size for e in range(routed)),
                     node_of_rank=node_of_rank, replicas=redundant if load and ep > 1 else 0,
                     load=load)


def _add_replicas(ranks: list[list[int]], node_of_rank, load, redundant: int) -> None:
    """Fill `redundant` extra slots (evenly over ranks) with replicas of hot experts.

    Each slot: the expert with the most load per copy that some open rank does not hold
    yet; its replica goes to the least-loaded such rank (lowest index on a tie), on a
    node without a copy of it if there is one. Open ranks wait in a heap by (load,
    index) whose stale entries are skipped, so a slot costs O(log EP) plus the ranks
    passed over on nodes that already hold the expert, not a scan of every rank."""
    ep = len(ranks)
    free = [redundant // ep] * ep
    copies = [1] * len(load)
    holders: list[set[int]] = [set() for _ in load]  # ranks holding each expert
    for r, ids in enumerate(ranks):
        for e in ids:
            holders[e].add(r)
    rank_load = [sum(load[e] for e in ids) for ids in ranks]
    open_ranks = sum(1 for f in free if f)
    by_load = [(rank_load[r], r) for r in range(ep) if free[r]]  # open ranks, lazily current
    heapq.heapify(by_load)
    heap = [(-load[e], e) for e in range(len(load))]  # most load per copy first
    heapq.heapify(heap)
    for _ in range(redundant):
        skipped = []
        while True:  # the hottest expert some open rank does not hold yet
            key, e = heapq.heappop(heap)
            if open_ranks > sum(1 for q in holders[e] if free[q]):
                break
            skipped.append((key, e))
        for item in skipped:
            heapq.heappush(heap, item)
        used_nodes = {node_of_rank[q] for q in holders[e]}
        r = fallback = None
        passed = []
        while by_load:  # least-loaded open rank without e, on another node if any
            entry = heapq.heappop(by_load)
            x_load, x = entry
            if not free[x] or x_load != rank_load[x]:
                continue  # stale: full since, or its load changed (a newer entry exists)
            passed.append(entry)
            if x in holders[e]:
                continue
            if node_of_rank[x] not in used_nodes:
                r = x
                break
            if fallback is None:
                fallback = x
        r = fallback if r is None else r
        for entry in passed:
            heapq.heappush(by_load, entry)
        before = load[e] / copies[e]
        copies[e] += 1
        share = load[e] / copies[e]
        for q in holders[e]:  # every holder now serves a smaller share of e
            rank_load[q] -= before - share
            if free[q]:
                heapq.heappush(by_load, (rank_load[q], q))
        holders[e].add(r)
        ranks[r].append(e)
        free[r] -= 1
        rank_load[r] += share
        if free[r]:
            heapq.heappush(by_load, (rank_load[r], r))
        else:
            open_ranks -= 1
        heapq.heappush(heap, (-share, e))


def primary_imbalance(load, ep: int) -> float:
    """Busiest EP rank's tokens over the mean rank's, experts in contiguous blocks of
    E / EP (primary copies; replicas not counted). Loads are scaled to the hottest
    expert first, so huge counts cannot overflow; all-zero loads give 1.0."""
    per = len(load) // ep
    top = max(load, default=0) or 1
    ranks = [sum(x / top for x in load[r * per : (r + 1) * per]) for r in range(ep)]
    mean = sum(ranks) / ep
    return max(ranks) / mean if mean > 0 else 1.0


def rank_loads(place: Placement) -> list[float]:
    """Expected tokens per EP rank when each expert's load splits evenly over its copies."""
    if not place.load:
        return [float(len(ids)) for ids in place.per_rank]
    copies = [0] * place.routed
    for ids in place.per_rank:
        for e in ids:
            copies[e] += 1
    return [sum(place.load[e] / copies[e] for e in ids) for ids in place.per_rank]


# ----------------------------------------------------------------------------- the histogram file


def read_expert_load(path: str, routed: dict[int, int], span: Span | None = None
                     ) -> dict[int, tuple[float, ...]]:
    """Per-expert loads of each MoE layer (`routed`: layer -> routed experts, MTP modules
    as `num_layers + k`) from a histogram file, read by the runtime's one reader of the
    format (`dsvc.runtime.expert_load.read_histogram`, docs/ir.md); its problems become a
    `SpecError` at `span` (the spec's `expert_load` entry) or at the file."""
    from dsvc.runtime.expert_load import HistogramError, read_histogram
    from dsvc.runtime.inputs import InputError

    where = span or Span(path, 0, 0)
    try:
        return read_histogram(path, routed)
    except HistogramError as err:
        raise _error(f"expert load file '{path}' {err.reason}", where,
                     "the format is in docs/ir.md; `dsvc train` writes it as "
                     "RUN_DIR/expert_load.json") from None
    except InputError as err:
        if err.line is not None:  # a JSON syntax error: point at it
            raise _error(f"expert load file is {err.reason}", Span(path, err.line, err.col)
                         ) from None
        raise _error(f"cannot read expert load file '{path}': {err.reason}", where) from None


def _read_histogram(spec, override: str | None, routed: dict[int, int]):
    if override is not None:
        path, span = override, None
    elif spec.parallel is not None and spec.parallel.expert_load is not None:
        path = os.path.join(os.path.dirname(spec.file), spec.parallel.expert_load)
        span = spec.span("parallel.expert_load")
    else:
        return None, ""
    return read_expert_load(path, routed, span), path


def _error(message: str, span: Span | None, hint: str | None = None) -> SpecError:
    return SpecError([Diagnostic("error", message, span, hint)])
