"""Whole-graph invariants, checked at pass boundaries (`compiler.driver` runs it).

A failure here is a compiler bug, not a user error: `IRVerifyError` lists
every broken invariant at once, each naming the op or edge.

Checked always: acyclic; every edge port names an existing output and input;
every input fed exactly once; the tensor on each edge (shape and dtype) is
the one the producer makes and the consumer expects; dtypes are known.
After `partition_stages`: every op on exactly one stage in range, data flows
forward through the stages; after `insert_comm`: an edge crosses stages only
from a `send` to its `recv` on the next stage. After `place_experts`: every
routed expert of every MoE layer sits on at least one EP rank.
"""

from __future__ import annotations

import networkx as nx

from dsvc.compiler.ir import DTYPE_BYTES, Graph


class IRVerifyError(AssertionError):
    """The IR broke an invariant (a compiler bug); `problems` lists each one."""

    def __init__(self, problems: list[str], after: str = ""):
        self.problems = problems
        head = f"IR invariants broken after `{after}`" if after else "IR invariants broken"
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        super().__init__(head + ":\n  " + "\n  ".join(shown))


def verify(graph: Graph) -> None:
    """Raise `IRVerifyError` if any invariant fails for the passes run so far."""
    problems = check(graph)
    if problems:
        raise IRVerifyError(problems, graph.passes[-1] if graph.passes else "")


def check(graph: Graph) -> list[str]:
    """Every broken invariant, as messages (empty when the graph is sound)."""
    g, out = graph.g, []
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        out.append("cycle: " + " -> ".join(u for u, _ in cycle))
    fed: dict[tuple[str, int], int] = {}
    nodes = g.nodes
    for src, dst, data in g.edges(data=True):
        a, b = nodes[src]["op"], nodes[dst]["op"]
        for sp, dp in data["ports"]:
            out += _check_edge(a, b, sp, dp, fed)
    for name in g.nodes:
        op = nodes[name]["op"]
        for i in range(len(op.inputs)):
            n = fed.get((op.name, i), 0)
            if n != 1:
                out.append(f"{op.name}: input {i} fed {n} times")
        for t in op.inputs + op.outputs:
            if t.dtype not in DTYPE_BYTES:
                out.append(f"{op.name}: unknown dtype {t.dtype}")
        if op.dtype not in DTYPE_BYTES:
            out.append(f"{op.name}: unknown compute dtype {op.dtype}")
    if "partition_stages" in graph.passes:
        out += _check_stages(graph)
    if "place_experts" in graph.passes:
        out += _check_experts(graph)
    return sorted(out)


def _check_edge(a, b, sp: int, dp: int, fed: dict) -> list[str]:
    where = _Where(a.name, sp, b.name, dp)
    if not 0 <= sp < len(a.outputs):
        return [f"{where}: {a.name} has no output {sp}"]
    if not 0 <= dp < len(b.inputs):
        return [f"{where}: {b.name} has no input {dp}"]
    fed[(b.name, dp)] = fed.get((b.name, dp), 0) + 1
    made, wanted = a.outputs[sp], b.inputs[dp]
    out = []
    if made.shape != wanted.shape:
        out.append(f"{where}: shape {_fmt(made.shape)} != {_fmt(wanted.shape)}")
    if made.dtype != wanted.dtype:
        out.append(f"{where}: dtype {made.dtype} != {wanted.dtype}")
    return out


def _check_stages(graph: Graph) -> list[str]:
    out = []
    pipe = graph.pipeline
    if pipe is None:
        return ["partition_stages ran but the graph has no pipeline table"]
    for name in graph.g.nodes:
        op = graph.op(name)
        if op.stage is None or not 0 <= op.stage < pipe.parts:
            out.append(f"{op.name}: stage {op.stage} not in 0..{pipe.parts - 1}")
    comm = "insert_comm" in graph.passes
    for src, dst in graph.g.edges:
        a, b = graph.op(src), graph.op(dst)
        if a.stage is None or b.stage is None or a.stage == b.stage:
            continue
        if b.stage < a.stage:
            out.append(f"edge {src}->{dst} flows backwards from stage {a.stage} to {b.stage}")
        elif comm and not (a.kind == "send" and b.kind == "recv" and b.stage == a.stage + 1):
            out.append(f"edge {src}->{dst} crosses stages {a.stage}->{b.stage} without send/recv")
    covered = sorted(p for s in pipe.stages for p in [s.part])
    if sorted(set(covered)) != list(range(pipe.parts)):
        out.append(f"pipeline stages cover parts {sorted(set(covered))}, not 0..{pipe.parts - 1}")
    return out


def _check_experts(graph: Graph) -> list[str]:
    out = []
    for name in graph.g.nodes:
        op = graph.op(name)
        if op.kind != "experts":
            continue
        place = op.attr("placement")
        if place is None:
            out.append(f"{op.name}: routed experts have no placement")
            continue
        held = {e for ids in place.per_rank for e in ids}
        missing = sorted(set(range(op.attr("routed"))) - held)
        if missing:
            out.append(f"{op.name}: experts {missing[:8]} are on no EP rank")
        if len({len(ids) for ids in place.per_rank}) > 1:
            out.append(f"{op.name}: EP ranks hold different numbers of experts")
    return out


class _Where:
    """`edge a:0->b:1`, formatted only when a problem is reported."""

    def __init__(self, *parts):
        self.parts = parts

    def __format__(self, spec: str) -> str:
        a, sp, b, dp = self.parts
        return f"edge {a}:{sp}->{b}:{dp}"


def _fmt(shp) -> str:
    return "[" + ", ".join(str(d) for d in shp) + "]"
