"""The IR as stable text, JSON and DOT (`dsvc inspect`, golden files, DSVC_DEBUG=2).

Output is deterministic: ops in a stable topological order (creation order
breaks ties), grouped by stage once partitioned; attributes sorted; sympy
expressions through `fmt_expr` only. Filters (`select`) keep the ops of one
per-copy stage, one pipeline rank or one layer; the JSON schema is in
docs/ir.md.
"""

from __future__ import annotations

import functools

import sympy

from dsvc.compiler.ir import Graph, Op, Placement, StageInfo

JSON_FORMAT, JSON_VERSION = "dsvc-graph", 1


def fmt_expr(expr) -> str:
    """The one way a sympy expression becomes text in dsvc's IR output."""
    if isinstance(expr, (int, float)):
        return repr(expr) if isinstance(expr, float) else str(expr)
    return _fmt_sympy(expr)


@functools.cache
def _fmt_sympy(expr) -> str:
    return sympy.sstr(expr, order="lex")


def fmt_shape(shape) -> str:
    return "[" + ", ".join(fmt_expr(d) for d in shape) + "]"


def select(graph: Graph, stage: int | None = None, rank: int | None = None,
           layer: int | None = None) -> set[str]:
    """Names of the ops kept by the filters (all given filters must match)."""
    parts = None
    if rank is not None:
        parts = set(graph.partition.parts_of_device(rank)) if graph.partition else {0}
    keep = set()
    for name in graph.g.nodes:
        op = graph.op(name)
        if stage is not None and op.stage != stage:
            continue
        if parts is not None and op.stage not in parts:
            continue
        if layer is not None and op.layer != layer:
            continue
        keep.add(name)
    return keep


# ----------------------------------------------------------------------------- text


def format_text(graph: Graph, keep: set[str] | None = None) -> str:
    """Readable IR: a header, every op (by stage once partitioned), the stage and expert tables."""
    lines = _header(graph)
    ops = [op for op in graph.ops() if keep is None or op.name in keep]
    staged = graph.partition is not None
    if staged:
        ops.sort(key=lambda op: op.stage)  # stable: keeps the topological order within a stage
    current = object()
    for op in ops:
        if staged and op.stage != current:
            current = op.stage
            lines.append("")
            lines.append(f"stage {op.stage}  ({_stage_where(graph, op.stage)}):")
        lines += _op_lines(graph, op)
    if graph.fusion:
        lines.append("")
        lines += _fusion_lines(graph, keep)
    if graph.partition is not None:
        lines.append("")
        lines += _pipeline_lines(graph)
    places = graph.placements()
    if places:
        lines.append("")
        lines += _expert_lines(graph, places)
    for note in graph.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def _header(graph: Graph) -> list[str]:
    spec = graph.spec
    ops = graph.ops()
    flops = sum(graph.num(op.flops) for op in ops)
    params = sum(op.param_count for op in ops)
    pbytes = sum(op.param_bytes for op in ops)
    return [
        f"# dsvc IR of model {spec.model.name} ({spec.file}) after: {', '.join(graph.passes)}",
        f"# T = tokens per micro-batch = {graph.tokens}",
        (f"# {len(ops)} ops; per micro-batch {flops:.6g} FLOPs (fwd+dgrad+wgrad); "
         f"{params} parameters, {pbytes} bytes"),
    ]


def _stage_where(graph: Graph, part: int) -> str:
    held = [s for s in graph.partition.stages if s.part == part]
    return ", ".join(f"copy {s.copy} stage {s.index} on pipeline rank {s.device}" for s in held)


def _op_lines(graph: Graph, op: Op) -> list[str]:
    args = []
    for i in range(len(op.inputs)):
        src, sp = graph.producer(op.name, i)
        args.append(f"%{src}" + (f"#{sp}" if sp else ""))
    outs = ", ".join(f"{t.dtype}{fmt_shape(t.shape)}" for t in op.outputs) or "()"
    role = op.attr("role")
    sig = f"  %{op.name} = {op.kind}{f'<{role}>' if role else ''}({', '.join(args)}) -> {outs}"
    facts = [f"dtype={op.dtype}"]
    if op.layer is not None:
        facts.append(f"layer={op.layer}")
    if op.flops != 0:
        facts.append(f"flops={fmt_expr(op.flops_fwd)}/{fmt_expr(op.flops_dgrad)}/{fmt_expr(op.flops_wgrad)}")
    if op.param_count:
        facts.append(f"params={op.param_count} ({op.param_bytes} B)")
    if op.saved_bytes != 0:
        facts.append(f"saved={fmt_expr(op.saved_bytes)} B")
    facts += [f"{k}={_fmt_fp8(v) if k == 'fp8' else _fmt_attr(v)}" for k, v in sorted(op.attrs.items())
              if k not in ("role", "component") and v is not None and v != ()]
    src = f"  @{op.source}" if op.source else ""
    return [sig + src, "      " + " ".join(facts)]


def _fmt_fp8(f: dict) -> str:
    """`e4m3[fwd x(1x128).W(128x128), dgrad ..., wgrad ...; acc fp32/128, scales fp32]`."""
    gemms = ", ".join(f"{name} {a}({_tile(ta)}).{b}({_tile(tb)})" for name, a, ta, b, tb in f["gemms"])
    pad = ", padded K" if f.get("pad") else ""
    return (f"{f['format'].replace('fp8_', '')}[{gemms}; acc {f['accumulate']}/{f['promote_every']}, "
            f"scales {f['scales']}{pad}]")


def _tile(t) -> str:
    return "x".join(str(x) for x in t)


def _fmt_attr(v) -> str:
    if isinstance(v, Placement):
        return f"<{len(v.per_rank)} EP ranks x {len(v.per_rank[0])} experts>"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_attr(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt_attr(x) for x in v) + ")"
    if isinstance(v, (sympy.Basic, int, float)):
        return fmt_expr(v)
    return str(v)


def _fusion_lines(graph: Graph, keep: set[str] | None) -> list[str]:
    """The `fuse` pass's groups: member ops, kernels, bytes fused and one op at a time."""
    groups = [g for g in graph.fusion if keep is None or all(o in keep for o in g.ops)]
    fused = sum(graph.num(g.reads + g.writes + g.bwd_reads + g.bwd_writes) for g in groups)
    unfused = sum(graph.num(g.unfused_reads + g.unfused_writes) for g in groups)
    ratio = f"{fused / unfused:.3f}" if unfused else "n/a"
    out = [f"fusion: {len(groups)} group(s); bytes per micro-batch (T = {graph.tokens}), forward + "
           f"backward: fused {fused:.6g}, ops one by one {unfused:.6g} (ratio {ratio})"]
    for g in groups:
        part = f" ({g.part})" if g.part else ""
        out.append(f"  {g.name}: {g.kind}{part} <- {', '.join(g.ops)}")
        out.append(f"      kernels {g.kernel} / {g.backward}; reads {fmt_expr(g.reads)} B, "
                   f"writes {fmt_expr(g.writes)} B; backward reads {fmt_expr(g.bwd_reads)} B, "
                   f"writes {fmt_expr(g.bwd_writes)} B; one by one {fmt_expr(g.unfused_reads)} B "
                   f"read, {fmt_expr(g.unfused_writes)} B written")
        out.append(f"      {g.what}")
    return out


def _pipeline_lines(graph: Graph) -> list[str]:
    pipe = graph.partition
    rows = stage_rows(graph)
    out = [(f"pipeline: {pipe.schedule}, {pipe.ranks} rank(s), {pipe.parts} stage(s) per copy, "
            f"{pipe.copies} cop{'y' if pipe.copies == 1 else 'ies'}, balanced by {pipe.balanced_by}")]
    for r in rows:
        out.append(f"  stage {r['index']:>3} (copy {r['copy']} stage {r['copy_stage']}) on rank "
                   f"{r['device']}: layers {_ranges(r['layers'])}"
                   f"{' +embedding' if r['embedding'] else ''}{' +head' if r['head'] else ''}"
                   f"{' +mtp' if r['mtp'] else ''}; {r['flops']:.4g} FLOPs, {r['param_bytes']} B, "
                   f"{r['cost_s'] * 1e3:.4g} ms")
    imb = imbalance(graph)
    out.append(f"  imbalance (max/mean): stage {imb['stage']:.4f}, device {imb['device']:.4f}")
    return out


def _expert_lines(graph: Graph, places: dict[int, Placement]) -> list[str]:
    first = next(iter(places.values()))
    ep, per = len(first.per_rank), len(first.per_rank[0])
    out = [(f"experts: {len(places)} MoE layer(s), {first.routed} routed over {ep} EP rank(s), "
            f"{per} per rank, {max(first.node_of_rank) + 1} node(s)")]
    groups = {}
    for e, g in enumerate(first.group_of_expert):
        groups.setdefault(g, set()).add(first.node_of_rank[first.home_rank[e]])
    out.append("  groups -> nodes: " + ", ".join(f"{g}:{sorted(n)}" for g, n in sorted(groups.items())))
    for layer, place in places.items():
        if place.replicas:
            extra = {r: ids[len(ids) - place.replicas // ep:] for r, ids in enumerate(place.per_rank)}
            out.append(f"  layer {layer}: replicas " + " ".join(f"r{r}:{list(v)}" for r, v in extra.items()))
    return out


def _ranges(xs) -> str:
    xs = list(xs)
    if not xs:
        return "-"
    return f"{xs[0]}..{xs[-1]}" if len(xs) > 1 else str(xs[0])


# ----------------------------------------------------------------------------- tables shared by text and JSON


def stage_rows(graph: Graph) -> list[dict]:
    pipe = graph.partition
    flops = [0.0] * pipe.parts
    pbytes = [0] * pipe.parts
    pcount = [0] * pipe.parts
    names: list[list[str]] = [[] for _ in range(pipe.parts)]
    for op in graph.ops():
        flops[op.stage] += graph.num(op.flops)
        pbytes[op.stage] += op.param_bytes
        pcount[op.stage] += op.param_count
        names[op.stage] += op.params
    return [_stage_row(s, flops, pbytes, pcount, names, pipe.part_cost) for s in pipe.stages]


def _stage_row(s: StageInfo, flops, pbytes, pcount, names, cost) -> dict:
    return {"index": s.index, "copy": s.copy, "copy_stage": s.part, "device": s.device,
            "layers": list(s.layers), "embedding": s.embedding, "head": s.head, "mtp": s.mtp,
            "flops": flops[s.part], "param_count": pcount[s.part], "param_bytes": pbytes[s.part],
            "cost_s": cost[s.part], "param_names": sorted(names[s.part])}


def imbalance(graph: Graph) -> dict:
    pipe = graph.partition
    pm = sum(pipe.part_cost) / len(pipe.part_cost)
    dm = sum(pipe.device_cost) / len(pipe.device_cost)
    return {"stage": max(pipe.part_cost) / pm, "stage_min": min(pipe.part_cost) / pm,
            "device": max(pipe.device_cost) / dm, "device_min": min(pipe.device_cost) / dm}


# ----------------------------------------------------------------------------- DOT


def format_dot(graph: Graph, keep: set[str] | None = None) -> str:
    """Graphviz DOT: one cluster per stage once partitioned; edges labelled with shapes."""
    ops = [op for op in graph.ops() if keep is None or op.name in keep]
    names = {op.name for op in ops}
    lines = ["digraph dsvc {", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=8];']
    by_stage: dict = {}
    for op in ops:
        by_stage.setdefault(op.stage, []).append(op)
    for stage, members in sorted(by_stage.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        indent = "  "
        if stage is not None:
            lines.append(f'  subgraph "cluster_s{stage}" {{')
            lines.append(f'    label={_q(f"stage {stage}: " + _stage_where(graph, stage))};')
            indent = "    "
        for op in members:
            out = ", ".join(f"{t.dtype}{fmt_shape(t.shape)}" for t in op.outputs)
            label = f"{op.name}\\n{op.kind} {op.dtype}\\n{out}"
            lines.append(f"{indent}{_q(op.name)} [label={_q(label, raw=True)}{_style(op)}];")
        if stage is not None:
            lines.append("  }")
    for src, dst, sp, _dp in graph.edges():
        if src in names and dst in names:
            t = graph.op(src).outputs[sp]
            lines.append(f"  {_q(src)} -> {_q(dst)} [label={_q(fmt_shape(t.shape))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


_COLOURS = {"linear": "#dbe9f6", "experts": "#f6e0c8", "attention_core": "#e3f1da",
            "quantize": "#f4d7e8", "cast": "#f4d7e8", "dispatch": "#fff2b3", "combine": "#fff2b3",
            "send": "#e6e6e6", "recv": "#e6e6e6", "collective": "#e6e6e6"}


def _style(op: Op) -> str:
    colour = _COLOURS.get(op.kind)
    return f', style=filled, fillcolor="{colour}"' if colour else ""


def _q(text: str, raw: bool = False) -> str:
    body = text.replace("\\", "\\\\") if not raw else text
    return '"' + body.replace('"', '\\"') + '"'
