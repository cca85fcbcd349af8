"""The IR as JSON (`dsvc inspect --format json`); the schema is documented in docs/ir.md.

Numbers are evaluated at the spec's tokens per micro-batch (`tokens`);
shapes keep the symbol: `["T", 7168]`. Keys are stable; lists are sorted.
"""

from __future__ import annotations

import json

import sympy

from dsvc.compiler.ir import Graph, Op, Placement
from dsvc.compiler.printer import JSON_FORMAT, JSON_VERSION, fmt_expr, imbalance, stage_rows


def graph_json(graph: Graph, keep: set[str] | None = None) -> dict:
    spec = graph.spec
    ops = [op for op in graph.ops() if keep is None or op.name in keep]
    names = {op.name for op in ops}
    all_ops = graph.ops()
    out = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "spec": spec.file,
        "model": spec.model.name,
        "passes": list(graph.passes),
        "tokens_per_microbatch": graph.tokens,
        "totals": {
            "ops": len(all_ops),
            "flops": sum(graph.num(op.flops) for op in all_ops),
            "param_count": sum(op.param_count for op in all_ops),
            "param_bytes": sum(op.param_bytes for op in all_ops),
        },
        "nodes": [_node(graph, op) for op in ops],
        "edges": [_edge(graph, src, dst, sp, dp) for src, dst, sp, dp in graph.edges()
                  if src in names and dst in names],
    }
    if graph.pipeline is not None:
        out["pipeline"] = _pipeline(graph)
        out["stages"] = stage_rows(graph)
        out["devices"] = _devices(graph, out["stages"])
    places = graph.placements()
    if places:
        out["experts"] = _experts(places)
    if graph.notes:
        out["notes"] = list(graph.notes)
    return out


def _node(graph: Graph, op: Op) -> dict:
    devices = None
    if graph.pipeline is not None and op.stage is not None:
        devices = sorted({s.device for s in graph.pipeline.stages if s.part == op.stage})
    return {
        "id": op.name,
        "op": op.kind,
        "layer": op.layer,
        "block": op.block,
        "stage": op.stage,
        "devices": devices,
        "dtype": op.dtype,
        "flops": graph.num(op.flops),
        "flops_fwd": graph.num(op.flops_fwd),
        "flops_dgrad": graph.num(op.flops_dgrad),
        "flops_wgrad": graph.num(op.flops_wgrad),
        "param_count": op.param_count,
        "param_bytes": op.param_bytes,
        "saved_bytes": graph.num(op.saved_bytes),
        "params": list(op.params),
        "source": op.source,
        "inputs": [_tensor(t) for t in op.inputs],
        "outputs": [_tensor(t) for t in op.outputs],
        "attrs": {k: _value(graph, v) for k, v in sorted(op.attrs.items()) if k != "placement"},
    }


def _tensor(t) -> dict:
    return {"shape": [_dim(d) for d in t.shape], "dtype": t.dtype}


def _dim(d):
    return int(d) if isinstance(d, (int, sympy.Integer)) else fmt_expr(d)


def _edge(graph: Graph, src: str, dst: str, sp: int, dp: int) -> dict:
    t = graph.op(src).outputs[sp]
    return {"src": src, "dst": dst, "src_port": sp, "dst_port": dp,
            "shape": [_dim(d) for d in t.shape], "dtype": t.dtype, "bytes": graph.num(t.nbytes)}


def _value(graph: Graph, v):
    if isinstance(v, sympy.Basic):
        return graph.num(v)
    if isinstance(v, dict):
        return {str(k): _value(graph, x) for k, x in sorted(v.items())}
    if isinstance(v, (tuple, list)):
        return [_value(graph, x) for x in v]
    if isinstance(v, Placement):
        return None
    return v


def _pipeline(graph: Graph) -> dict:
    pipe = graph.pipeline
    return {"schedule": pipe.schedule, "ranks": pipe.ranks, "stages_per_copy": pipe.parts,
            "copies": pipe.copies, "stages": len(pipe.stages), "balanced_by": pipe.balanced_by,
            "stage_cost_s": list(pipe.part_cost), "device_cost_s": list(pipe.device_cost),
            "imbalance": imbalance(graph)}


def _devices(graph: Graph, rows: list[dict]) -> list[dict]:
    pipe = graph.pipeline
    ep = graph.spec.parallel.expert if graph.spec.parallel is not None else 1
    expert_delta = [0] * pipe.parts
    for op in graph.ops():
        if op.kind == "experts":
            place = op.attr("placement")
            share = max(len(ids) for ids in place.per_rank) if place else op.attr("routed") / ep
            expert_delta[op.stage] += int(op.param_bytes * share / op.attr("routed"))
            expert_delta[op.stage] -= op.param_bytes  # replaced by the per-GPU share below
    out = []
    for d in range(pipe.ranks):
        mine = [r for r in rows if r["device"] == d]
        per_gpu = sum(r["param_bytes"] + expert_delta[r["copy_stage"]] for r in mine)
        out.append({"device": d, "stages": [r["index"] for r in mine],
                    "copy_stages": [[r["copy"], r["copy_stage"]] for r in mine],
                    "cost_s": pipe.device_cost[d], "flops": sum(r["flops"] for r in mine),
                    "param_bytes": sum(r["param_bytes"] for r in mine),
                    "param_bytes_per_gpu": per_gpu})
    return out


def _experts(places: dict[int, Placement]) -> dict:
    first = next(iter(places.values()))
    primary = _placement(first, with_replicas=False)
    out = {"moe_layers": sorted(places), **primary, "layers": {}}
    for layer, place in places.items():
        if place.replicas:
            out["layers"][str(layer)] = {"per_rank": [list(ids) for ids in place.per_rank],
                                         "rank_load": _rank_load(place)}
    if not out["layers"]:
        del out["layers"]
    return out


def _placement(place: Placement, with_replicas: bool) -> dict:
    ep = len(place.per_rank)
    per = place.routed // ep
    ranks = [list(ids if with_replicas else ids[:per]) for ids in place.per_rank]
    home = place.home_rank
    return {"ep_ranks": ep, "routed": place.routed, "experts_per_rank": per,
            "nodes": max(place.node_of_rank) + 1, "per_rank": ranks,
            "node_of_rank": list(place.node_of_rank),
            "groups": [{"expert": e, "group": place.group_of_expert[e], "rank": home[e],
                        "node": place.node_of_rank[home[e]]} for e in range(place.routed)]}


def _rank_load(place: Placement) -> list[float]:
    from dsvc.compiler.passes.place_experts import rank_loads

    return rank_loads(place)


def to_json_dict(graph: Graph, keep: set[str] | None = None) -> dict:
    """The documented JSON form (docs/ir.md); `keep` filters nodes and edges."""
    return graph_json(graph, keep)


def format_json(graph: Graph, keep: set[str] | None = None) -> str:
    # Compact separators keep the C encoder (a pretty DeepSeek-V3 graph takes 0.5 s more).
    return json.dumps(graph_json(graph, keep), separators=(",", ":")) + "\n"
