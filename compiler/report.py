"""`dsvc report`: assemble the cost figures of a spec and render them (text, JSON, A vs B).

Python API (`driver.build_report` runs the passes, then `report_of` here):

    from dsvc.compiler.driver import build_report
    from dsvc.compiler.report import render_text, report_json
    r = build_report(dsl.load("examples/deepseek_v3.dsv"))
    r.value("model.kv_cache_bytes_per_token")        # 70272
    print(render_text(r))

Figures come from the formula families in `compiler.costs` (model, memory,
comm, network, decode, step). By default they are evaluated on plain numbers
(sympy is not imported); `symbolic=True` builds every figure as a sympy formula
in the spec's own symbols as well, and the text and JSON then show both. The
JSON schema (`SCHEMA`, `SCHEMA_VERSION`) is documented in docs/report.md.
"""

from __future__ import annotations

import dataclasses
import json
import os

from dsvc.compiler.costs.quantities import format_delta, format_value
from dsvc.compiler.costs.symbols import BaseSymbol, Derived, Figure, Quantities, formula_text

SCHEMA = "dsvc.report"
SCHEMA_VERSION = 1

# Keys every report has (value None where the spec lacks what a figure needs), with the
# label and unit used when a figure is missing.
REQUIRED = {
    "model.params_total": ("parameters, total (main model)", "params"),
    "model.params_active": ("parameters active per token", "params"),
    "model.params_mtp": ("MTP modules' own parameters", "params"),
    "model.kv_cache_bytes_per_token": ("KV cache per token", "B"),
    "model.train_flops_per_token": ("training FLOPs per token (causal)", "FLOP"),
    "memory.max_gpu_bytes": ("memory on the most loaded GPU", "B"),
    "memory.fits": ("fits", "bool"),
    "network.endpoints": ("endpoints (capacity)", "count"),
    "network.switches": ("switches", "count"),
    "network.links": ("switch-to-switch links", "count"),
    "network.cost_usd": ("cost", "USD"),
    "network.used_endpoints": ("endpoints used (one NIC per GPU)", "count"),
    "decode.comm_s_per_stage": ("communication per stage", "s"),
    "decode.tpot_s": ("time per output token", "s"),
    "decode.tokens_per_s": ("tokens/s per sequence (upper bound)", "tok/s"),
    "step.time_s": ("step time", "s"),
    "step.mfu": ("MFU (causal FLOPs, BF16 peak)", "%"),
}
SECTIONS = ("model", "memory", "comm", "network", "decode", "step")
EVEN_SPLIT_NOTE = ("layout: layers split evenly over pipeline stages (embedding first, head and "
                   "MTP last); the graph's partition_stages will supply the balanced layout")


@dataclasses.dataclass(frozen=True)
class Report:
    """Figures of one spec, in the order the families recorded them."""

    spec_file: str
    model_name: str
    figures: tuple[Figure, ...]
    notes: tuple[str, ...] = ()
    symbols: tuple[BaseSymbol, ...] = ()  # symbolic reports only
    derived: tuple[Derived, ...] = ()
    spans: dict = dataclasses.field(default_factory=dict)  # symbol name -> "file:line"
    program: str = "generated"  # what runs the decoder blocks (`--program`)

    def value(self, key: str):
        """The value of figure `key` (KeyError when the report has no such figure)."""
        for f in self.figures:
            if f.key == key:
                return f.value
        raise KeyError(key)

    def figure(self, key: str) -> Figure:
        return next(f for f in self.figures if f.key == key)


def moe_layer_indices(spec) -> list[int]:
    """Layer indices of the MoE layers, MTP modules included (as `num_layers + k`)."""
    m = spec.model
    out = [i for i in range(m.num_layers) if m.ffn_of(i).kind == "moe"]
    if m.layers and m.ffns[m.layers[-1].ffn].kind == "moe":  # MTP blocks use the last FFN
        out += [m.num_layers + k for k in range(m.mtp.depth)]
    return out


def expert_load_imbalance(spec, path: str, ep: int, span=None) -> float:
    """Mean over the MoE layers of (hottest EP rank's load / mean rank load), a layer the
    file does not give counting as balanced (1.0), as the simulator charges it.

    The file is read by the graph's own reader (`place_experts.read_expert_load`, over
    the runtime's reader of the format in docs/ir.md), so the report, `inspect` and
    `compile` accept the same files and reject bad ones with the same diagnostics
    (`SpecError`). Experts sit on EP ranks in contiguous blocks of routed / EP, as
    primary copies (the redundant replicas the graph adds are not counted here).
    """
    from dsvc.compiler.passes.place_experts import primary_imbalance, read_expert_load

    m = spec.model
    routed = {layer: (m.ffn_of(layer) if layer < m.num_layers else m.ffns[m.layers[-1].ffn]).routed
              for layer in moe_layer_indices(spec)}
    histogram = read_expert_load(path, routed, span)
    # not measured: routed as assumed without a file
    ratios = [primary_imbalance(histogram[layer], ep) if layer in histogram else 1.0
              for layer in routed]
    return sum(ratios) / len(ratios) if ratios else 1.0


def _simulated_figures(q, r) -> None:
    """The step as the `simulate` pass played it on the topology (numbers, not formulas)."""
    q.figure("step.time_s", "step time (simulated)", "s", r.step_time_s)
    q.figure("step.bubble_s", f"pipeline bubble, busiest device ({r.kind})", "s", r.bubble_max_s)
    q.figure("step.bubble_fraction", "bubble fraction (simulated)", "%", r.bubble_fraction)
    q.figure("step.exposed_comm_s", "exposed all-to-all, worst device (simulated)", "s",
             r.exposed_comm_max_s)
    q.figure("step.tokens_per_day", "tokens per day (simulated)", "count", r.tokens_per_day)
    q.figure("step.mfu", "MFU (simulated; causal FLOPs, BF16 peak)", "%", r.mfu)
    q.figure("step.mfu_noncausal", "MFU (simulated; non-causal FLOPs)", "%", r.mfu_noncausal)
    q.figure("step.gpu_hours_per_trillion_tokens", "GPU-hours per trillion tokens (simulated)",
             "count", r.world * r.step_time_s / r.tokens_per_step * 1e12 / 3600)


def report_of(spec, graph=None, symbolic: bool = False, expert_load: str | None = None,
              layout=None, program: str = "generated") -> Report:
    """Every figure of `spec`. `expert_load` (a path) overrides `parallel.expert_load`;
    `program` is what runs the decoder blocks (`Graph.program`, the graph's when given).

    With `graph` (run through the `simulate` pass) the layout is its partition and
    the step figures are the simulated ones (the roofline ones are kept beside them,
    as `step.roofline_*`). Without, `layout(spec, M)` gives, per device, the
    `StageContents` it holds (M is the micro-batches per step, a number or a symbol),
    by default an even split of the layers (`costs.layout.even_layout`).
    `driver.build_report` runs the passes first.
    """
    from dsvc.compiler.costs.comm import comm_figures
    from dsvc.compiler.costs.decode_costs import decode_figures
    from dsvc.compiler.costs.layout import even_layout, parallel_dims
    from dsvc.compiler.costs.memory import memory_figures
    from dsvc.compiler.costs.model_costs import build_model
    from dsvc.compiler.costs.model_figures import model_figures
    from dsvc.compiler.costs.network import network_figures
    from dsvc.compiler.costs.step import StepModel

    q = Quantities(symbolic)
    notes = []
    if graph is not None:
        program = graph.program
    if program == "eager":
        notes.append("decoder blocks: the runtime's eager modules (as `dsvc train --program "
                     "eager` runs them), not the generated stage program")
    costs = build_model(spec, q)
    model_figures(spec, q, costs)
    moes = [p.spec for p in costs.ffns.values() if p.kind == "moe"]
    imbalance = 1
    p = spec.parallel
    load_span = None
    if expert_load is None and p is not None and p.expert_load is not None:
        expert_load = os.path.join(os.path.dirname(spec.file), p.expert_load)
        load_span = spec.span("parallel.expert_load")
    if expert_load is not None and moes and p is not None:
        value = expert_load_imbalance(spec, expert_load, p.expert, load_span)
        imbalance = q.sym("f_load", value, "expert load histogram")
        notes.append(f"expert load: {os.path.basename(expert_load)}, hottest EP rank at "
                     f"{value:.2f}x the mean")
    elif expert_load is not None:
        notes.append("expert load: ignored (no MoE layers or no parallel block)")
    if spec.cluster is not None and p is not None and spec.train is not None:
        pd = parallel_dims(spec, q, costs.S)
        if graph is not None:
            from dsvc.compiler.passes.partition_stages import stage_contents

            layout = lambda spec_, m: stage_contents(graph, m)  # noqa: E731
        elif layout is None:
            layout = even_layout
            notes.append(EVEN_SPLIT_NOTE)
        layout = layout(spec, pd.M)
        memory_figures(spec, q, costs, pd, layout, imbalance, program)
        comm = comm_figures(spec, q, costs, pd, layout, imbalance)
        StepModel(spec, q, costs, pd, comm, imbalance).figures(layout)
        if graph is not None and graph.simulation is not None:
            _simulated_figures(q, graph.simulation)
        if graph is not None:
            notes.extend(graph.notes)  # what the passes want users to see
    else:
        notes.append("memory, comm, step: need cluster, parallel and train blocks")
    if spec.cluster is not None:
        network_figures(spec, q)
    decode_figures(spec, q, costs)
    have = {f.key for f in q.figures}
    figures = list(q.figures)
    missing = "needs a cluster block" if spec.cluster is None else "needs parallel and train blocks"
    figures += [Figure(k, *REQUIRED[k], None, note=missing) for k in REQUIRED if k not in have]
    spans = {}
    for s in q.base.values():
        span = spec.span(s.path.split(" ")[0]) if s.path else None
        if span is not None:
            spans[s.name] = span.short
    return Report(spec.file, spec.model.name, tuple(figures), tuple(notes),
                  tuple(q.base.values()) if symbolic else (),
                  tuple(q.derived.values()) if symbolic else (), spans, program)


# ----------------------------------------------------------------------------- JSON


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists(out)


def _lists(node):
    """Dicts keyed 0..n-1 (per-device rows) become lists."""
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node) and sorted(map(int, node)) == list(range(len(node))):
        return [node[str(i)] for i in range(len(node))]
    return node


def report_json(r: Report) -> dict:
    """The report as a JSON-able dict (schema in docs/report.md)."""
    out = {"schema": SCHEMA, "version": SCHEMA_VERSION, "spec": r.spec_file,
           "model_name": r.model_name, "notes": list(r.notes)}
    body = _nest({f.key: f.value for f in r.figures})
    for section in SECTIONS:
        out[section] = body.get(section, {})
    if r.symbols:
        out["formulas"] = {f.key: formula_text(f.formula) for f in r.figures
                           if f.formula is not None}
        out["symbols"] = {s.name: {"value": s.value, "path": s.path,
                                   "source": r.spans.get(s.name)} for s in r.symbols}
        out["derived"] = {d.name: {"formula": formula_text(d.formula), "value": d.value,
                                   "meaning": d.label} for d in r.derived}
    return out


def compare_json(a: Report, b: Report) -> dict:
    """Two reports, the delta (B - A) of every numeric figure both have (per-device memory
    rows on the same device index) and `busiest`: which device each side's
    `memory.max.*`, comm and step figures describe."""
    va = {f.key: f.value for f in a.figures}
    delta = {}
    for f in b.figures:
        x, y = va.get(f.key), f.value
        if _numeric(x) and _numeric(y) and f.unit != "index":
            delta[f.key] = y - x
    busiest = {key: {"a": _busiest(a, key), "b": _busiest(b, key)}
               for key in ("memory.max_device", "comm.device", "step.device")}
    return {"schema": SCHEMA + ".compare", "version": SCHEMA_VERSION,
            "a": report_json(a), "b": report_json(b), "delta": delta, "busiest": busiest}


def _numeric(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


# ----------------------------------------------------------------------------- text

TITLES = {
    "model": "model",
    "memory": "memory per GPU",
    "comm": "communication per training step, per GPU",
    "network": "network",
    "decode": "decode speed limit under EP (paper section 2.3)",
    "step": "training step: roofline model, then the schedule simulated on the topology",
}
TABLE_COLUMNS = ("stages", "layers", "weights", "master_weights", "grads", "optimizer_states",
                 "activations", "buffers", "transients", "total")
TABLE_HEADS = ("stages", "layers", "params", "master", "grads", "optim", "activ", "buffers",
               "transient", "total")


def _is_row(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 4 and parts[1] == "devices" and parts[2].isdigit()


def _section(key: str) -> str:
    return key.split(".", 1)[0]


def _table(figures) -> list[str]:
    rows: dict[int, dict] = {}
    for f in figures:
        _, _, i, col = f.key.split(".")
        rows.setdefault(int(i), {})[col] = f
    cells = [("device",) + TABLE_HEADS]
    for i in sorted(rows):
        row = rows[i]
        cells.append((str(i),) + tuple(
            format_value(row[c].value, row[c].unit) if c in row else "" for c in TABLE_COLUMNS))
    widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def render_text(r: Report) -> str:
    """The human report: one section per family; formulas under values when symbolic."""
    lines = [f"dsvc report: {r.spec_file} (model {r.model_name})"]
    shown = [f for f in r.figures if f.value is not None or f.key in REQUIRED]
    width = min(58, max(len(f.label) for f in shown if not _is_row(f.key)))
    for section in SECTIONS:
        figs = [f for f in shown if _section(f.key) == section]
        if not figs:
            continue
        lines += ["", TITLES[section]]
        rows = [f for f in figs if _is_row(f.key)]
        if rows:
            lines += _table(rows)
        for f in figs:
            if _is_row(f.key):
                continue
            value = format_value(f.value, f.unit)
            if f.value is None and f.note:
                value += f" ({f.note})"
            lines.append(f"  {f.label.ljust(width)}  {value}".rstrip())
            if f.formula is not None and not _trivial(f):
                lines.append(f"  {'':{width}}    = {formula_text(f.formula)}")
    if r.symbols:
        lines += _legend(r)
    if r.notes:
        lines += ["", "notes"] + [f"  - {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def _trivial(f: Figure) -> bool:
    return getattr(f.formula, "is_Number", False)


def _plain(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e18:
        v = int(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:.6g}"


def _legend(r: Report) -> list[str]:
    out = ["", "symbols (from the spec)"]
    w = max(len(s.name) for s in r.symbols)
    for s in r.symbols:
        where = f"  [{r.spans[s.name]}]" if s.name in r.spans else ""
        out.append(f"  {s.name.ljust(w)} = {_plain(s.value):<20} {s.path}{where}".rstrip())
    if r.derived:
        out += ["", "derived quantities"]
        w = max(len(d.name) for d in r.derived)
        for d in r.derived:
            out.append(f"  {d.name.ljust(w)} = {formula_text(d.formula)}")
            out.append(f"  {'':{w}}   ({d.label + ': ' if d.label else ''}{_plain(d.value)})")
    return out


def both_labels(la: str, lb: str) -> str:
    """One row label for two sides whose labels differ only in their settings:
    "pipeline bubble, busiest device (dualpipe)" and "(1f1b)" -> "(dualpipe | 1f1b)"."""
    if la == lb:
        return la
    start = 0
    while start < min(len(la), len(lb)) and la[start] == lb[start]:
        start += 1
    while start > 0 and la[start - 1] not in " (,:":  # differ from a word's start
        start -= 1
    end = 0
    while end < min(len(la), len(lb)) - start and la[-1 - end] == lb[-1 - end]:
        end += 1
    while end > 0 and la[len(la) - end] not in " ),:":
        end -= 1
    mid_a, mid_b = la[start:len(la) - end], lb[start:len(lb) - end]
    return f"{la[:start]}{mid_a} | {mid_b}{la[len(la) - end:]}"


def _compare_row(key: str, x: Figure | None, y: Figure | None, label: str | None = None):
    f = x or y
    va = format_value(x.value, f.unit, compact=True) if x is not None else "-"
    vb = format_value(y.value, f.unit, compact=True) if y is not None else "-"
    d = rel = ""
    if (x is not None and y is not None and _numeric(x.value) and _numeric(y.value)
            and f.unit != "index"):
        d, rel = format_delta(x.value, y.value, f.unit)
    if label is None:
        label = both_labels(x.label, y.label) if x is not None and y is not None else f.label
    return (label, va, vb, d, rel)


def _busiest(r: Report, key: str):
    try:
        return r.value(key)
    except KeyError:
        return None


def _same_device_rows(a: Report, b: Report, fa: dict, fb: dict) -> list:
    """Memory on the same device index: A's most loaded device (and B's, when it is another
    one), so a difference is the plans', not which device each side happened to load most."""
    rows = []
    da, db = _busiest(a, "memory.max_device"), _busiest(b, "memory.max_device")
    for device, whose in ((da, "A's most loaded"), (db, "B's most loaded")):
        if device is None or (whose.startswith("B") and device == da):
            continue
        title = f"device {device} ({whose}{', B' if device == db and whose[0] == 'A' else ''})"
        rows.append((f"on {title}:", "", "", "", ""))
        for col in ("weights", "grads", "optimizer_states", "activations", "total"):
            key = f"memory.devices.{device}.{col}"
            x, y = fa.get(key), fb.get(key)
            if x is None and y is None:
                continue
            rows.append(_compare_row(key, x, y, "  " + (x or y).label))
    return rows


def render_compare(a: Report, b: Report) -> str:
    """Side by side: A, B, B - A and the relative change of every figure both have.

    Rows are labelled with both sides' settings where they differ; a relative change
    is shown only between values of one sign. Figures of each side's busiest device
    (`memory.max.*`, the comm and step devices) say which device that is on each side,
    and memory is also compared on the same device index."""
    fb = {f.key: f for f in b.figures}
    def runs(r: Report) -> str:
        return "; decoder blocks: eager modules" if r.program == "eager" else ""

    lines = [f"dsvc report: A = {a.spec_file} (model {a.model_name}{runs(a)})",
             f"             B = {b.spec_file} (model {b.model_name}{runs(b)})"]
    rows_by_section: dict[str, list] = {}
    keys = [f.key for f in a.figures] + [f.key for f in b.figures if f.key not in
                                          {x.key for x in a.figures}]
    fa = {f.key: f for f in a.figures}
    for key in keys:
        if _is_row(key):
            continue
        x, y = fa.get(key), fb.get(key)
        f = x or y
        if f.unit in ("list",) or (x is not None and x.value is None and
                                   (y is None or y.value is None)):
            continue
        rows_by_section.setdefault(_section(key), []).append(_compare_row(key, x, y))
    notes = {}
    da, db = _busiest(a, "memory.max_device"), _busiest(b, "memory.max_device")
    if da is not None and db is not None:
        notes["memory"] = (f"the rows down to `total` are each side's most loaded device "
                           f"(A: device {da}, B: device {db}); the same device below")
        rows_by_section["memory"] = rows_by_section.get("memory", []) + _same_device_rows(
            a, b, fa, fb)
    for section, key, what in (("comm", "comm.device", "device with the most communication"),
                               ("step", "step.device", "busiest device (roofline)")):
        ca, cb = _busiest(a, key), _busiest(b, key)
        if ca is not None and cb is not None and ca != cb:
            notes[section] = f"per-device rows: each side's {what} (A: device {ca}, B: {cb})"
    for section in SECTIONS:
        rows = rows_by_section.get(section)
        if not rows:
            continue
        head = [("", "A", "B", "B - A", "change")]
        widths = [max(len(r[j]) for r in head + rows) for j in range(5)]
        widths[0] = min(widths[0], 58)
        lines += ["", TITLES[section]]
        if section in notes:
            lines.append(f"  ({notes[section]})")
        for r in head + rows:
            lines.append("  " + r[0].ljust(widths[0]) + "  " + "  ".join(
                c.rjust(w) for c, w in zip(r[1:], widths[1:])).rstrip())
    return "\n".join(lines) + "\n"


__all__ = [
    "REQUIRED",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Report",
    "report_of",
    "compare_json",
    "dumps",
    "expert_load_imbalance",
    "render_compare",
    "render_text",
    "report_json",
]
