"""THE ordered list of compiler passes, and how to run them up to any point.

Every pass is a pure function Graph -> Graph in its own module under
`compiler/passes/`; this list is the only place their order is written.
`run_until(spec, "partition_stages")` lowers a spec and runs the passes up to
and including the named one, verifying the IR after each
(`compiler.verify`); `DSVC_DEBUG=2` prints the IR after every pass.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _lower(spec, graph, opts):  # the first pass takes the spec, not a graph
    from dsvc.compiler.passes.lower import lower

    return lower(spec)


def _assign_precision(spec, graph, opts):
    from dsvc.compiler.passes.assign_precision import assign_precision

    return assign_precision(graph)


def _partition_stages(spec, graph, opts):
    from dsvc.compiler.passes.partition_stages import partition_stages

    return partition_stages(graph)


def _place_experts(spec, graph, opts):
    from dsvc.compiler.passes.place_experts import place_experts

    return place_experts(graph, expert_load=opts.get("expert_load"))


def _insert_comm(spec, graph, opts):
    from dsvc.compiler.passes.insert_comm import insert_comm

    return insert_comm(graph)


def _schedule(spec, graph, opts):
    from dsvc.compiler.passes.schedule import schedule

    return schedule(graph)


def _simulate(spec, graph, opts):
    from dsvc.compiler.passes.simulate import simulate

    return simulate(graph)


# (name, runner, what it does). Code generation (compiler/codegen/build.py) reads the result.
PASSES: list[tuple[str, Callable, str]] = [
    ("lower", _lower, "Spec -> op graph of one micro-batch (sympy shapes in T, FLOPs, bytes)"),
    ("assign_precision", _assign_precision, "formats per the policy; quantize/cast ops; FP8 tiles"),
    ("partition_stages", _partition_stages, "every op on one pipeline stage, balanced by cost"),
    ("place_experts", _place_experts, "routed experts on EP ranks; groups on nodes; EPLB replicas"),
    ("insert_comm", _insert_comm, "dispatch/combine all-to-all, PP send/recv, DP collectives"),
    ("schedule", _schedule, "per-rank action lists (1F1B, ZB1P, DualPipe, DualPipeV); F&B pairs"),
    ("simulate", _simulate, "one step on the cluster: time, bubble, exposed comm, memory, MFU"),
]

GRAPH_PASSES = ("lower", "assign_precision", "partition_stages", "place_experts", "insert_comm")


def pass_names() -> list[str]:
    return [name for name, _, _ in PASSES]


def run_until(spec, until: str = "insert_comm", *, expert_load: str | None = None,
              verify: bool = True):
    """Lower `spec` and run every pass up to and including `until`; returns the Graph.

    `expert_load` (a path) overrides the spec's `parallel.expert_load`.
    Raises `ValueError` for an unknown pass name (the CLI turns it into a usage error).
    """
    names = pass_names()
    if until not in names:
        raise ValueError(f"unknown pass {until!r}; passes in order: {', '.join(names)}")
    from dsvc.compiler.debug import debug_level
    from dsvc.compiler.verify import verify as check

    opts = {"expert_load": expert_load}
    graph = None
    for name, runner, _ in PASSES:
        graph = runner(spec, graph, opts)
        if verify:
            check(graph)
        if debug_level() >= 2:
            from dsvc.compiler.printer import format_text

            print(f"# ---- IR after {name}\n{format_text(graph)}", file=sys.stderr)
        if name == until:
            break
    return graph
