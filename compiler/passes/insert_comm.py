"""Pass `insert_comm`: the communication a step needs, as ops with byte sizes.

- Expert parallelism: a `dispatch` all-to-all before each layer's routed
  experts (the tokens in the dispatch format, DeepSeek-V3: e4m3 + fp32 scales,
  with the gate weight and expert index per row as `meta_bytes`) and a
  `combine` all-to-all after them (the combine format, bf16). Under node-limited two-hop routing
  (`parallel.two_hop`, the default) a token crosses InfiniBand once per
  remote target node, to the GPU with the same local rank there, and is
  forwarded over NVLink to its experts' GPUs; combine runs the reverse (NVLink
  reduction in the node, then one IB transfer per node). Byte sizes are per
  EP rank per micro-batch, expected under uniform routing, with the copies
  per token of the report's `compiler.costs.comm.routing_copies` (nodes are
  NVLink domains: 8 GPUs of a node, or 72 of an NVL72 rack).
- Pipeline: a `send` on the producer's stage and a `recv` on the next stage
  for every tensor that crosses a stage boundary (tensors skipping a stage are
  forwarded hop by hop, as a pipeline runtime does); the gradient of the same
  size flows back.
- Data parallelism (once per step, on each stage): ZeRO-1 reduce-scatter of
  gradients and all-gather of the updated weights over the data-parallel
  group; expert weights over their expert-data-parallel group (data / EP);
  under DualPipe an all-reduce summing the two model copies' gradients.
"""

from __future__ import annotations

import math

import sympy

from dsvc.compiler.ir import DTYPE_BYTES, Graph, Op, T, Tensor, tensor


def insert_comm(graph: Graph) -> Graph:
    """A copy of `graph` with dispatch/combine, send/recv and DP collectives inserted."""
    assert graph.partition is not None, "insert_comm runs after partition_stages"
    out = graph.derive("insert_comm")
    topo = _Topology(graph.spec)
    for op in graph.ops():
        if op.kind == "experts":
            _wrap_experts(out, op, topo)
    _insert_p2p(out, topo)
    _insert_collectives(out, topo)
    return out


class _Topology:
    def __init__(self, spec):
        p, c = spec.parallel, spec.cluster
        self.spec = spec
        self.ep = p.expert if p is not None else 1
        self.data = p.data if p is not None else 1
        self.expert_data = p.expert_data if p is not None else 1  # each expert's replicas
        self.zero = p.zero if p is not None else 1
        self.two_hop = p.two_hop if p is not None else True
        self.gpn = c.gpus_per_node if c is not None else max(self.ep, 1)
        self.domain = c.nvlink.domain if c is not None else max(self.ep, 1)
        self.nodes = max(1, math.ceil(self.ep / self.domain))  # NVLink domains an EP group spans

    def node_of_pp_rank(self, pp_rank: int) -> int:
        return (pp_rank * self.data) // self.gpn  # global rank = pp x data + dp


# ----------------------------------------------------------------------------- expert all-to-all


def _traffic(topo: _Topology, ffn, row_bytes) -> dict:
    """Expected IB and NVLink bytes one EP rank sends for one micro-batch's tokens.

    Copies per token come from the report's `routing_copies` (one formula for both).
    """
    from dsvc.compiler.costs.comm import routing_copies

    reached, ib, nvl, _ = routing_copies(ffn.top_k, ffn.groups, ffn.top_groups, topo.ep,
                                         topo.domain, topo.two_hop)
    two_hop = topo.two_hop and topo.nodes > 1
    route = ("two-hop: IB once per target node to the same local rank, then NVLink" if two_hop
             else "direct: one transfer per (token, expert)")
    return {"ib_bytes": T * _exact(ib) * row_bytes, "nvlink_bytes": T * _exact(nvl) * row_bytes,
            "row_bytes": row_bytes, "route": route, "nodes": topo.nodes, "ep": topo.ep,
            "nodes_per_token": _exact(reached)}


def _exact(x) -> sympy.Expr:
    """A copy count as an exact rational (the formulas give floats for fractions)."""
    return sympy.Rational(x).limit_denominator(10**6) if isinstance(x, float) else sympy.sympify(x)


def _wrap_experts(g: Graph, op: Op, topo: _Topology) -> None:
    ffn = g.spec.model.ffns[op.attr("ffn")]
    rows = T * ffn.top_k
    feeds = [g.producer(op.name, i) for i in range(len(op.inputs))]
    for i, (src, sp) in enumerate(feeds):
        g.disconnect(src, sp, op.name, i)
    # Inputs: the tokens (and their FP8 scales), then expert indices and gate weights
    # (T, top_k); a rank receives one row per (token, expert) pair routed to it.
    n_act = len(op.inputs) - 2
    received = [tensor(t.dtype, rows, *t.shape[1:]) for t in op.inputs[:n_act]]
    received += [tensor(t.dtype, rows) for t in op.inputs[n_act:]]
    row = sum((_row_bytes(t) for t in received[:n_act]), sympy.Integer(0))  # payload + scales
    meta = sum((_row_bytes(t) for t in received[n_act:]), sympy.Integer(0))  # index + gate
    dispatch = Op(name=f"{op.name}.dispatch", kind="dispatch", block=op.block, layer=op.layer,
                  inputs=op.inputs, outputs=tuple(received), dtype=op.inputs[0].dtype,
                  span=op.span, stage=op.stage, seq=op.seq - 0.25,
                  attrs={"collective": "all_to_all", "group": "expert", "meta_bytes": meta,
                         **_traffic(topo, ffn, row)})
    g.add(dispatch, feeds)
    out_t = op.outputs[0]
    result = tensor(out_t.dtype, rows, *out_t.shape[1:])
    new = op.evolve(inputs=tuple(received), outputs=(result,))
    consumers = g.consumers(op.name)
    for dst, sp, dp in consumers:
        g.disconnect(op.name, sp, dst, dp)
    g.replace(new)
    for i in range(len(received)):
        g.connect(dispatch.name, i, op.name, i)
    combine = Op(name=f"{op.name}.combine", kind="combine", block=op.block, layer=op.layer,
                 inputs=(result,), outputs=(out_t,), dtype=out_t.dtype, span=op.span,
                 stage=op.stage, seq=op.seq + 0.25,
                 attrs={"collective": "all_to_all", "group": "expert",
                        **_traffic(topo, ffn, _row_bytes(result))})
    g.add(combine, [(op.name, 0)])
    for dst, _, dp in consumers:
        g.connect(combine.name, 0, dst, dp)


def _row_bytes(t: Tensor) -> sympy.Expr:
    per_row = sympy.Mul(*t.shape[1:]) if len(t.shape) > 1 else sympy.Integer(1)
    return per_row * sympy.Rational(DTYPE_BYTES[t.dtype])


# ----------------------------------------------------------------------------- pipeline send/recv


def _insert_p2p(g: Graph, topo: _Topology) -> None:
    pipe = g.partition
    crossing: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for src, dst, sp, dp in list(g.edges()):
        if g.op(src).stage != g.op(dst).stage:
            crossing.setdefault((src, sp), []).append((dst, dp))
    for (src, sp), dsts in sorted(crossing.items()):
        a = g.op(src)
        t = a.outputs[sp]
        for dst, dp in dsts:
            g.disconnect(src, sp, dst, dp)
        by_stage: dict[int, list[tuple[str, int]]] = {}
        for dst, dp in dsts:
            by_stage.setdefault(g.op(dst).stage, []).append((dst, dp))
        holder, port = src, sp  # the op holding the tensor on the current stage
        base = src if sp == 0 else f"{src}.{sp}"
        for s in range(a.stage, max(by_stage)):
            send = Op(name=f"{base}.send_s{s}", kind="send", block=a.block, layer=a.layer,
                      inputs=(t,), outputs=(t,), dtype=t.dtype, span=a.span, stage=s,
                      seq=a.seq + 0.1, attrs=_p2p_attrs(pipe, topo, t, s, s + 1))
            recv = Op(name=f"{base}.recv_s{s + 1}", kind="recv", block=a.block, layer=a.layer,
                      inputs=(t,), outputs=(t,), dtype=t.dtype, span=a.span, stage=s + 1,
                      seq=a.seq + 0.2, attrs=_p2p_attrs(pipe, topo, t, s, s + 1))
            g.add(send, [(holder, port)])
            g.add(recv, [(send.name, 0)])
            holder, port = recv.name, 0
            for dst, dp in by_stage.get(s + 1, []):
                g.connect(holder, 0, dst, dp)


def _p2p_attrs(pipe, topo: _Topology, t: Tensor, src_part: int, dst_part: int) -> dict:
    devices = {}
    for copy in sorted({s.copy for s in pipe.stages}):
        dev = {s.part: s.device for s in pipe.stages if s.copy == copy}
        devices[copy] = (dev[src_part], dev[dst_part])
    links = {topo.node_of_pp_rank(a) == topo.node_of_pp_rank(b) for a, b in devices.values()}
    return {"bytes": t.nbytes, "grad_bytes": t.nbytes, "devices": devices,
            "link": "nvlink" if links == {True} else "ib", "from_stage": src_part,
            "to_stage": dst_part}


# ----------------------------------------------------------------------------- data-parallel


def _insert_collectives(g: Graph, topo: _Topology) -> None:
    pipe, pol = g.partition, g.spec.precision
    dense = [0] * pipe.parts
    expert = [0] * pipe.parts
    for op in g.ops():
        if op.kind == "experts":
            expert[op.stage] += op.param_count
        elif op.param_count:
            dense[op.stage] += op.param_count
    grad_b, w_b = DTYPE_BYTES[pol.grads], DTYPE_BYTES[pol.default]
    ep, edp = topo.ep, topo.expert_data
    for p in range(pipe.parts):
        ops = []
        if topo.data > 1:
            ops += _dp_pair(f"s{p}.dense", dense[p], grad_b, w_b, "data", topo.data, topo.zero)
        if expert[p] and edp > 1:
            ops += _dp_pair(f"s{p}.experts", expert[p] // ep, grad_b, w_b, "expert_data", edp,
                            topo.zero)
        if pipe.copies == 2:
            local = dense[p] + expert[p] // ep
            ops.append(("copies.all_reduce", "all_reduce", "copies", 2, local * grad_b,
                        "sum the two DualPipe copies' gradients"))
        for i, (name, coll, group, size, nbytes, what) in enumerate(ops):
            g.add(Op(name=f"s{p}.{name}" if name.startswith("copies") else name, kind="collective",
                     block="step", layer=None, inputs=(), outputs=(), dtype=pol.grads,
                     stage=p, seq=1e9 + 10 * p + i,
                     attrs={"collective": coll, "group": group, "group_size": size,
                            "bytes": int(nbytes), "what": what}))


def _dp_pair(prefix: str, params: int, grad_b: float, w_b: float, group: str, size: int,
             zero: int) -> list[tuple]:
    if not params:
        return []
    if zero >= 1:
        return [(f"{prefix}.reduce_scatter", "reduce_scatter", group, size, params * grad_b,
                 "gradients onto their optimizer shard (ZeRO-1)"),
                (f"{prefix}.all_gather", "all_gather", group, size, params * w_b,
                 "updated weights from every shard")]
    return [(f"{prefix}.all_reduce", "all_reduce", group, size, params * grad_b, "gradients")]
