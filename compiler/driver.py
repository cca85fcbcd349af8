"""The compiler driver: THE ordered list of passes, and the entry points that run it.

Every pass is a pure function Graph -> Graph in its own module (the first takes
the spec); `PASSES` is the only place their order is written, and a compile is one
run of it, from `lower` to the emitters that write what a build directory holds.
`run_until(spec, "partition_stages")` runs the passes up to and including the
named one, verifying the IR after each graph pass (`verify.py`); `DSVC_DEBUG=2`
prints the IR after every pass. `simulate_step` and `build_report` are the
report's and the simulator's doors in.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import NamedTuple

from dsvc.compiler.codegen.emit_build import emit_build
from dsvc.compiler.codegen.emit_plan import emit_plan
from dsvc.compiler.debug import debug_level
from dsvc.compiler.passes.assign_precision import assign_precision
from dsvc.compiler.passes.fuse import fuse
from dsvc.compiler.passes.insert_comm import insert_comm
from dsvc.compiler.passes.lower import lower
from dsvc.compiler.passes.partition_stages import partition_stages
from dsvc.compiler.passes.place_experts import place_experts
from dsvc.compiler.passes.schedule import schedule
from dsvc.compiler.passes.simulate import StepResult, missing_blocks, simulate
from dsvc.compiler.printer import format_text
from dsvc.compiler.report import Report, report_of
from dsvc.compiler.verify import verify
from dsvc.dsl.diagnostics import Diagnostic, SpecError
from dsvc.runtime.plan import dump_plan


class Pass(NamedTuple):
    name: str
    run: Callable  # (spec, graph or None, options) -> graph
    what: str


PASSES: tuple[Pass, ...] = (
    Pass("lower", lambda spec, g, o: lower(spec, program=o.get("program", "generated")),
         "Spec -> op graph of one micro-batch (sympy shapes in T, FLOPs, bytes)"),
    Pass("assign_precision", lambda spec, g, o: assign_precision(g),
         "formats per the policy; quantize/cast ops; FP8 tiles"),
    Pass("fuse", lambda spec, g, o: fuse(g),
         "memory-bound work of each block grouped into kernels (bytes per group)"),
    Pass("partition_stages", lambda spec, g, o: partition_stages(g),
         "every op on one pipeline stage, balanced by cost"),
    Pass("place_experts", lambda spec, g, o: place_experts(g, expert_load=o.get("expert_load")),
         "routed experts on EP ranks; groups on nodes; EPLB replicas"),
    Pass("insert_comm", lambda spec, g, o: insert_comm(g),
         "dispatch/combine all-to-all, PP send/recv, DP collectives"),
    Pass("schedule", lambda spec, g, o: schedule(g),
         "per-rank action lists (1F1B, ZB1P, DualPipe, DualPipeV); F&B pairs"),
    Pass("simulate", lambda spec, g, o: simulate(g),
         "one step on the cluster: time, bubble, exposed comm, memory, MFU"),
    Pass("emit_plan", lambda spec, g, o: emit_plan(g),
         "the runtime's plan (plan.json) from the graph's decisions"),
    Pass("emit_build", lambda spec, g, o: emit_build(g),
         "every file of a build directory: plan, kernels, train.py, report, schedule picture"),
)

# Passes whose result is an op graph worth printing (`dsvc inspect --after`).
GRAPH_PASSES = ("lower", "assign_precision", "fuse", "partition_stages", "place_experts", "insert_comm")
# The passes that need cluster, parallel and train blocks.
TRAINING_PASSES = ("emit_plan", "emit_build")


def pass_names() -> list[str]:
    return [p.name for p in PASSES]


def run_until(spec, until: str = "insert_comm", *, expert_load: str | None = None,
              verify_ir: bool = True, program: str = "generated"):
    """Lower `spec` and run every pass up to and including `until`; returns the Graph.

    `expert_load` (a path) overrides the spec's `parallel.expert_load`; `program` is what
    runs the decoder blocks whose costs the graph carries (`Graph.program`: "generated",
    the trainer's default, or "eager", `dsvc train --program eager`). Raises
    `ValueError` for an unknown pass name (the CLI turns it into a usage error) and
    `SpecError` when a pass needs blocks the spec lacks.
    """
    names = pass_names()
    if until not in names:
        raise ValueError(f"unknown pass {until!r}; passes in order: {', '.join(names)}")
    if until in TRAINING_PASSES and missing_blocks(spec):
        missing = missing_blocks(spec)
        raise SpecError([Diagnostic("error", f"cannot compile a trainer: no {', '.join(missing)} "
                                    "block", spec.span("model"),
                                    "a trainer needs a cluster, a parallel plan and a train block")])
    opts = {"expert_load": expert_load, "program": program}
    graph = None
    for p in PASSES:
        graph = p.run(spec, graph, opts)
        if verify_ir and p.name in GRAPH_PASSES:
            verify(graph)
        if debug_level() >= 2 and p.name in GRAPH_PASSES:
            print(f"# ---- IR after {p.name}\n{format_text(graph)}", file=sys.stderr)
        if p.name == until:
            break
    return graph


def _require_blocks(spec, what: str) -> None:
    missing = missing_blocks(spec)
    if missing:
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1
                             else missing)
        raise SpecError([Diagnostic(
            "error", f"{what} needs the {names} block{'s' if len(missing) > 1 else ''}",
            spec.span("model"),
            "add them, or include a cluster file (e.g. include \"clusters/h800_2048.dsv\")")])


def simulate_step(spec, *, overlap: str | None = None, expert_load: str | None = None,
                  program: str = "generated") -> StepResult:
    """Lower, partition, schedule and simulate `spec`; `overlap` ("none" or
    "dual_microbatch") overrides `parallel.overlap`, `program` as `run_until`'s. Raises
    `SpecError` when the spec lacks what a step needs (cluster, parallel and train
    blocks)."""
    _require_blocks(spec, "simulating a training step")
    if overlap is not None and overlap != spec.parallel.overlap:
        spec = dataclasses.replace(
            spec, parallel=dataclasses.replace(spec.parallel, overlap=overlap))
    return run_until(spec, "simulate", expert_load=expert_load, program=program).simulation


def build_report(spec, symbolic: bool = False, expert_load: str | None = None,
                 layout=None, even_split: bool = False, program: str = "generated") -> Report:
    """Every figure of `spec` (see `report.report_of`). The layout is the graph's
    `partition_stages` result and the step figures come from the `simulate` pass,
    unless `layout` is given or `even_split=True` (an even split of the layers, no
    simulation: fast, and what `--symbolic` shows as formulas). `program`: what runs the
    decoder blocks (`run_until`)."""
    graph = None
    if layout is None and not even_split and not missing_blocks(spec):
        graph = run_until(spec, "simulate", expert_load=expert_load, program=program)
    return report_of(spec, graph, symbolic=symbolic, expert_load=expert_load, layout=layout,
                     program=program)


def build_plan(spec, expert_load: str | None = None) -> dict:
    """The plan.json of `spec` as a dict (the `emit_plan` pass's record, dumped)."""
    return dump_plan(run_until(spec, "emit_plan", expert_load=expert_load).plan)
