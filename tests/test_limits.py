"""The limits `dsvc check` enforces (dsl/limits.py) and the page that states them (docs/limits.md).

What must hold (issue 19): every limit the page quotes is the constant the code
uses; a random spec anywhere inside the limits (counts drawn up to them) passes
`check` and `report` finishes on it (how its time grows is `bench/scaling.py`'s
business, not a test's); the pipeline balancer, once quadratic in layers per
stage, gives exactly what its dynamic programme gave.
"""

from __future__ import annotations

import importlib
import pathlib
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsvc import dsl
from dsvc.dsl import limits
from tests.compiler.test_passes_props import spec_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "limits.md").read_text()
MODULES = {"inputs": "dsvc.runtime.inputs", "limits": "dsvc.dsl.limits",
           "elaborate": "dsvc.dsl.elaborate", "parser": "dsvc.dsl.parser",
           "diagnostics": "dsvc.dsl.diagnostics", "schedule": "dsvc.compiler.cli.schedule"}


def _numbers(cell: str) -> set[int]:
    found = {10 ** int(e) for e in re.findall(r"10\^(\d+)", cell)}
    cell = re.sub(r"10\^\d+", "", cell)
    return found | {int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", cell)}


def test_every_limit_quoted_is_the_constant_the_code_uses():
    rows = re.findall(r"^\|([^|\n]+)\|([^|\n]+)\|\s*`(\w+)\.(\w+)`\s*\|", DOC, re.M)
    assert len(rows) >= 15
    for _, value, module, name in rows:
        constant = getattr(importlib.import_module(MODULES[module]), name)
        assert constant in _numbers(value), (module, name, value)
    for name in ("MAX_LAYERS", "MAX_WORLD_SIZE", "MAX_EXPERTS", "MAX_REDUNDANT_EXPERTS",
                 "MAX_SCHEDULE_CHUNKS", "MAX_INTEGER"):
        assert f"`limits.{name}`" in DOC, f"docs/limits.md does not state {name}"


@st.composite
def specs_up_to_the_limits(draw):
    """A valid spec with every count drawn up to its limit: layers, stages, micro-batches
    (so schedule chunks), GPUs, routed experts and EP ranks."""
    schedule = draw(st.sampled_from(["1f1b", "zb1p", "dualpipe", "dualpipev"]))
    dual = schedule in ("dualpipe", "dualpipev")
    per_rank = 2 if schedule == "dualpipev" else 1
    # DualPipe(V) need at least 2 x ranks micro-batches: stages x that fit the chunk limit
    top = 1
    while 2 * (top + 1) * per_rank * (top + 1) <= limits.MAX_SCHEDULE_CHUNKS:
        top += 1
    pipeline = draw(st.integers(1, top if dual else limits.MAX_LAYERS))
    if schedule == "dualpipe" and pipeline % 2:
        pipeline = pipeline + 1 if pipeline < top else pipeline - 1
    stages = per_rank * pipeline
    layers = draw(st.integers(max(stages, 2), limits.MAX_LAYERS))
    least = 2 * pipeline if dual else 1
    micro_batches = draw(st.integers(least, limits.MAX_SCHEDULE_CHUNKS // stages))
    micro_batches -= micro_batches % 2 if schedule == "dualpipe" else 0
    gpn = draw(st.sampled_from([1, 2, 8]))
    data = gpn * draw(st.integers(1, limits.MAX_WORLD_SIZE // (pipeline * gpn * gpn)))
    routed = draw(st.sampled_from([0, 8, 64, limits.MAX_EXPERTS]))
    eps = [e for e in (1, 2, 8, 64, 1024) if data % e == 0 and routed and routed % e == 0]
    expert = draw(st.sampled_from(eps)) if eps else 1
    return spec_text(layers=layers, dense_layers=1, routed=routed, nodes=pipeline * data // gpn,
                     gpn=gpn, pipeline=pipeline, expert=expert, schedule=schedule,
                     micro_batches=micro_batches, mtp=draw(st.integers(0, 2)))


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs_up_to_the_limits())
def test_report_finishes_on_any_spec_inside_the_limits(text):
    from dsvc.compiler.driver import build_report

    spec = dsl.loads(text, "limits.dsv")  # check accepts it: a SpecError would fail here
    report = build_report(spec)
    assert report.value("step.time_s") > 0
    assert report.value("model.params_total") > 0


def _min_max_by_dynamic_programme(pre: list[float], extra: list[float]) -> float:
    """The balancer's old O(parts x layers^2) programme (over the part cost expression
    the new one uses): the reference it must equal exactly."""
    n, inf = len(pre) - 1, float("inf")
    best = [0.0] + [inf] * n
    for add in extra:
        nxt = [inf] * (n + 1)
        for i in range(n + 1):
            if best[i] == inf:
                continue
            for j in range(i, n + 1):
                nxt[j] = min(nxt[j], max(best[i], add + (pre[j] - pre[i])))
        best = nxt
    return best[n]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(costs=st.lists(st.floats(0, 1e3, allow_nan=False) | st.sampled_from([0.0, 1.0, 2.5]),
                      min_size=1, max_size=24),
       extra=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=10))
def test_the_linear_balancer_matches_the_dynamic_programme(costs, extra):
    from dsvc.compiler.passes.partition_stages import _min_max_parts

    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    assert _min_max_parts(pre, extra) == _min_max_by_dynamic_programme(pre, extra)


def _replicas_by_scanning(ranks, node_of_rank, load, redundant):
    """The replica placement as first written, scanning every rank per slot: the reference."""
    import heapq

    ep = len(ranks)
    free = [redundant // ep] * ep
    copies = [1] * len(load)
    holders = [[] for _ in load]
    for r, ids in enumerate(ranks):
        for e in ids:
            holders[e].append(r)
    rank_load = [sum(load[e] for e in ids) for ids in ranks]
    heap = [(-load[e], e) for e in range(len(load))]
    heapq.heapify(heap)
    for _ in range(redundant):
        open_ranks = [r for r in range(ep) if free[r]]
        skipped = []
        while True:
            key, e = heapq.heappop(heap)
            candidates = [r for r in open_ranks if r not in holders[e]]
            if candidates:
                break
            skipped.append((key, e))
        for item in skipped:
            heapq.heappush(heap, item)
        used_nodes = {node_of_rank[r] for r in holders[e]}
        other = [r for r in candidates if node_of_rank[r] not in used_nodes]
        r = min(other or candidates, key=lambda x: (rank_load[x], x))
        before = load[e] / copies[e]
        copies[e] += 1
        share = load[e] / copies[e]
        for q in holders[e]:
            rank_load[q] -= before - share
        holders[e].append(r)
        ranks[r].append(e)
        free[r] -= 1
        rank_load[r] += share
        heapq.heappush(heap, (-share, e))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ep=st.sampled_from([2, 4, 8, 16]), per=st.sampled_from([1, 2, 4]),
       gpn=st.sampled_from([1, 2, 4, 8]), slots=st.integers(1, 4), data=st.data())
def test_replica_placement_by_heap_matches_the_scan(ep, per, gpn, slots, data):
    from dsvc.compiler.passes.place_experts import _add_replicas

    routed = ep * per
    load = data.draw(st.lists(st.sampled_from([0.0, 1.0, 3.0, 7.5]) | st.floats(0, 1e4),
                              min_size=routed, max_size=routed))
    nodes = tuple(r // gpn for r in range(ep))
    new, old = ([list(range(r * per, (r + 1) * per)) for r in range(ep)] for _ in range(2))
    slots = min(slots, routed - per)  # a rank replicates only experts it does not hold
    _add_replicas(new, nodes, load, slots * ep)
    _replicas_by_scanning(old, nodes, load, slots * ep)
    assert new == old
