"""Pass `schedule`: the per-rank pipeline action lists of a partitioned graph.

Reads the partition (`Graph.partition`: schedule kind, stages per copy, which
device holds which global stage) and the spec's micro-batch count, builds the
action lists with `compiler.schedules.build_schedule` (torch `_Action`
vocabulary, sends and receives included) and checks them. The result is
attached to a derived graph as `graph.schedule` (a `compiler.schedules.Schedule`,
whose `to_json()` is the plan's schedule section).

Dual micro-batch overlap (`parallel.overlap`): DualPipe and DualPipeV are
built around overlapped F&B pairs (`OVERLAP_F_B`); with `overlap =
dual_microbatch` the pairs stay, and the runtime runs each one in the chunk
order `overlap_order` gives (`pair_chunk_order`). With `overlap = none` every
pair is split into its forward followed by its backward, in the same place of
the list, so nothing runs overlapped. 1F1B and ZB1P have no pairs; asking for
overlap there leaves a note on the graph (the all-to-all stays exposed).
"""

from __future__ import annotations

from dsvc.dsl.diagnostics import Diagnostic, SpecError


def schedule(graph):
    """A copy of `graph` with `schedule` set to the checked per-rank action lists."""
    from dsvc.compiler.schedules import ScheduleCheckError, check_schedule

    pipe = graph.partition
    assert pipe is not None, "the schedule pass runs after partition_stages"
    spec = graph.spec
    overlap = spec.parallel.overlap if spec.parallel is not None else "none"
    sched = build_pipeline_schedule(spec, pipe, overlap=overlap)
    try:
        check_schedule(sched)
    except ScheduleCheckError as err:  # a generator bug, never the user's input
        raise AssertionError(f"generated schedule fails its check: {err}") from None
    notes = graph.notes
    if overlap == "dual_microbatch" and pipe.schedule in ("1f1b", "zb1p"):
        # refused, not modelled: neither the schedule nor the runtime has a pair to overlap
        notes = notes + (
            (f"overlap = dual_microbatch has no effect under {pipe.schedule}: it has no "
            "overlapped F&B pairs, so expert all-to-all stays exposed in the simulated step, "
            "the roofline and the trainer (use schedule = dualpipe or dualpipev)"),
        )
    out = graph.derive("schedule", notes=notes)
    out.schedule = sched
    return out


def num_microbatches(spec) -> int:
    """Micro-batches per step per pipeline (global_batch / (data x micro_batch)); 1 without
    a train block."""
    if spec.train is None or spec.parallel is None:
        return 1
    return spec.micro_batches


def build_pipeline_schedule(spec, pipe, *, overlap: str = "dual_microbatch"):
    """The `Schedule` for partition `pipe` (a `compiler.ir.Partition`), with sends and
    receives; `overlap = "none"` splits every F&B pair into F then B."""
    from dsvc.compiler.schedules import ScheduleConfigError, build_schedule, insert_send_recv

    n = num_microbatches(spec)
    try:
        sched = build_schedule(pipe.schedule, pipe.parts, n, with_comms=False)
    except ScheduleConfigError as err:  # dsl's rules normally catch these first
        raise SpecError([Diagnostic("error", str(err), spec.span("parallel.schedule"),
                                    err.hint)]) from None
    placed = tuple(s.device for s in sorted(pipe.stages, key=lambda s: s.index))
    assert placed == sched.stage_device, (
        f"partition places stages on {placed}, the {pipe.schedule} schedule on {sched.stage_device}")
    if overlap != "dual_microbatch":
        sched = split_overlaps(sched)
    return insert_send_recv(sched)


def split_overlaps(sched):
    """The same schedule with every `OVERLAP_F_B` pair run as its forward, then its backward."""
    return sched.with_actions(
        [p for a in acts for p in a.parts()] for acts in sched.actions
    )


def stage_units(graph) -> dict[int, list[tuple[str, str]]]:
    """Per per-copy stage (part): its units in forward order, as (name, kind) with kind
    "moe" (the unit has an expert all-to-all) or "dense": the embedding, decoder
    layers, the head, MTP modules. `overlap_order` takes the kinds."""
    first: dict[int, dict[str, float]] = {p: {} for p in range(graph.partition.parts)}
    moe: set[tuple[int, str]] = set()
    for op in graph.ops():
        if op.stage is None or op.block == "step" or op.kind in ("send", "recv"):
            continue
        name = unit_name(op)
        first[op.stage].setdefault(name, op.seq)
        if op.kind == "dispatch":
            moe.add((op.stage, name))
    return {p: [(u, "moe" if (p, u) in moe else "dense")
                for u in sorted(units, key=lambda u: (units[u], u))]
            for p, units in first.items()}


def unit_name(op) -> str:
    """The unit an op belongs to: "embed", "L<i>" for decoder layer i, "head", "mtp<k>"."""
    if op.block == "layer":
        return f"L{op.layer}"
    if op.block == "mtp":
        return f"mtp{op.layer}"
    return op.block


def pair_chunk_order(graph, pair):
    """The chunk order (`overlap_order`) a runtime follows for an `OVERLAP_F_B` pair of
    `graph.schedule`: per-layer attention / dispatch / MLP / combine interleaved."""
    from dsvc.compiler.schedules import overlap_order

    f, b = pair.sub_actions
    parts, units = _stage_parts(graph), stage_units(graph)
    f_units = [k for _, k in units[parts[f.stage]]]
    b_units = [k for _, k in units[parts[b.stage]]]
    return overlap_order(pair, f_units, b_units)


def _stage_parts(graph) -> dict[int, int]:
    """Global stage id -> per-copy part index."""
    return {s.index: s.part for s in graph.partition.stages}
