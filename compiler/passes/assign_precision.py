"""Pass `assign_precision`: every op gets its format from the precision policy.

GEMM-like ops compute in the policy's linear format (linears, routed and shared
experts, the MTP projection) unless their component is kept (`keep bf16 { ... }`);
the router, the output head and the attention core compute in their kept dtype, the
default one when not kept, as the runtime runs them (`Precision.compute_dtype`). Where a
GEMM needs its activation in another format than its producer makes, a
conversion op is inserted on that edge:

- FP8 GEMM: a `quantize` op (per-tile amax / 448 scales, tile from the policy,
  e.g. 1x128 along K) producing the e4m3 tensor and its fp32 scale tensor;
  one quantize is shared by all FP8 consumers of a tensor (the norm output
  feeding q_down and kv_down is quantized once). The GEMM is marked with its
  three FP8 GEMMs' operand tiles: forward x(1x128).W(128x128), dgrad
  dY(1x128).W^T(128x128), wgrad dY^T(128x1).x(128x1) (activations re-tiled
  along the token axis), accumulation and promotion interval.
- any other mismatch: a `cast` op.

Routed experts get a quantize of their own, placed before the dispatch when
the policy dispatches in FP8 (DeepSeek-V3), so the all-to-all carries e4m3
plus scales; otherwise the experts quantize after receiving (attribute
`quantize_after_dispatch`). Norms compute in their kept dtype and hand on the
default dtype. Parameter bytes are the storage format the report's memory
figure counts (`compiler.costs.memory`): FP8 linears at 1 B per element plus
one scale per weight block, kept components in their kept dtype.
"""

from __future__ import annotations

import math

import sympy

from dsvc.compiler.ir import DTYPE_BYTES, Graph, Op, Tensor, tensor

GEMM_KINDS = ("linear", "router", "experts", "swiglu_ffn", "attention_core")


def assign_precision(graph: Graph) -> Graph:
    """A copy of `graph` with formats assigned and conversion ops inserted."""
    out = graph.derive("assign_precision")
    pol = graph.spec.precision
    quantized: dict[tuple[str, int], str] = {}  # (producer, port) -> shared quantize op
    for op in graph.ops():  # topological: producers are final before consumers
        op = _refresh_inputs(out, out.op(op.name))
        fmt, is_fp8 = _format(op, pol)
        new = op.evolve(dtype=fmt, param_bytes=param_bytes(op, pol))
        if op.kind in GEMM_KINDS:
            new = _convert_inputs(out, new, fmt, is_fp8, pol, quantized)
            new = new.evolve(outputs=_gemm_outputs(new, fmt, is_fp8, pol))
            if is_fp8:
                new = _mark_fp8(new, pol)
        elif op.kind in ("norm", "embedding"):
            new = new.evolve(outputs=tuple(Tensor(t.shape, pol.default) for t in op.outputs))
        out.replace(new)
    return out


def _format(op: Op, pol) -> tuple[str, bool]:
    comp = op.attr("component")
    if op.kind in GEMM_KINDS:
        fmt = pol.compute_dtype(comp or "linear")
        return fmt, fmt == pol.linear.format and pol.linear.is_fp8
    if comp is not None and comp != "linear":
        return pol.dtype_of(comp), False
    return op.dtype, False


def param_bytes(op: Op, pol) -> int:
    """Bytes of the op's own parameters in their storage format (0 for tied weights)."""
    from dsvc.compiler.costs.memory import linear_weight_bytes, storage_dtype
    from dsvc.compiler.costs.model_costs import Linear

    if not op.param_count:
        return 0
    comp = op.attr("component") or "linear"
    weights = op.attr("weights")
    if not weights:
        return int(op.param_count * DTYPE_BYTES[storage_dtype(comp, pol)])
    total = sum(linear_weight_bytes(Linear(op.name, i, o, count=c, component=comp), pol)
                for i, o, c in weights)
    return int(total + (op.attr("bias") or 0) * DTYPE_BYTES[pol.default])


def _refresh_inputs(g: Graph, op: Op) -> Op:
    """Take the input tensors from the (already converted) producers."""
    ins = list(op.inputs)
    for src in g.g.predecessors(op.name):
        for sp, dp in g.g.edges[src, op.name]["ports"]:
            ins[dp] = g.op(src).outputs[sp]
    return op.evolve(inputs=tuple(ins)) if tuple(ins) != op.inputs else op


def _activation_ports(op: Op) -> tuple[int, ...]:
    """Inputs that are GEMM operands (not expert indices or gate weights)."""
    if op.kind == "experts":
        return (0,)
    return tuple(range(len(op.inputs)))


def _convert_inputs(g: Graph, op: Op, fmt: str, is_fp8: bool, pol, quantized) -> Op:
    ports = _activation_ports(op)
    if op.kind == "experts":
        return _convert_experts(g, op, is_fp8, pol)
    inputs, feeds = list(op.inputs), {}
    for dp in ports:
        src, sp = g.producer(op.name, dp)
        have = op.inputs[dp]
        if is_fp8:
            key = (src, sp)
            if key not in quantized:
                quantized[key] = _add_quantize(g, src, sp, have, pol, op)
            feeds[dp] = quantized[key]
        elif have.dtype != fmt:
            feeds[dp] = _add_cast(g, src, sp, have, fmt, op)
    if not feeds:
        return op
    # Rewire: an FP8 operand becomes two inputs (values, scales) at its position.
    new_inputs, rewire = [], []
    for dp, t in enumerate(inputs):
        src, sp = g.producer(op.name, dp)
        g.disconnect(src, sp, op.name, dp)
        if dp in feeds:
            conv = g.op(feeds[dp])
            for k, ct in enumerate(conv.outputs):
                rewire.append((conv.name, k, len(new_inputs)))
                new_inputs.append(ct)
        else:
            rewire.append((src, sp, len(new_inputs)))
            new_inputs.append(t)
    for src, sp, dp in rewire:
        g.connect(src, sp, op.name, dp)
    return op.evolve(inputs=tuple(new_inputs))


def _convert_experts(g: Graph, op: Op, is_fp8: bool, pol) -> Op:
    dispatch_fp8 = pol.dispatch.startswith("fp8")
    if not dispatch_fp8:
        return op.with_attrs(quantize_after_dispatch=True) if is_fp8 else op
    src, sp = g.producer(op.name, 0)
    q = _add_quantize(g, src, sp, op.inputs[0], pol, op, name=f"{op.name}.quant",
                      fmt=pol.dispatch, purpose="dispatch")
    rest = [g.producer(op.name, i) for i in range(1, len(op.inputs))]
    for i, (s, p) in enumerate([(src, sp)] + rest):
        g.disconnect(s, p, op.name, i)
    qop = g.op(q)
    feeds = [(q, 0), (q, 1)] + rest
    for dp, (s, p) in enumerate(feeds):
        g.connect(s, p, op.name, dp)
    new = op.evolve(inputs=qop.outputs + op.inputs[1:])
    return new if is_fp8 else new.with_attrs(dequantize_after_dispatch=True)


def _add_quantize(g: Graph, src: str, sp: int, have: Tensor, pol, consumer: Op, name=None,
                  fmt=None, purpose="gemm") -> str:
    lin = pol.linear
    fmt = fmt or lin.format
    k = have.shape[-1]
    tile = lin.act_tile
    scales = tensor("fp32", *have.shape[:-1], _ceil_div(k, tile[1]))
    name = name or (f"{src}.quant" if sp == 0 else f"{src}.quant{sp}")
    op = Op(name=name, kind="quantize", block=consumer.block, layer=consumer.layer, inputs=(have,),
            outputs=(Tensor(have.shape, fmt), scales), dtype=fmt, span=consumer.span,
            seq=consumer.seq - 0.5,
            attrs={"tile": tile, "scales": lin.scales, "amax_to": 448.0 if fmt == "fp8_e4m3" else 57344.0,
                   "purpose": purpose})
    g.add(op, [(src, sp)])
    return name


def _add_cast(g: Graph, src: str, sp: int, have: Tensor, fmt: str, consumer: Op) -> str:
    name = f"{src}.to_{fmt}" if sp == 0 else f"{src}.{sp}.to_{fmt}"
    if name not in g:
        op = Op(name=name, kind="cast", block=consumer.block, layer=consumer.layer, inputs=(have,),
                outputs=(Tensor(have.shape, fmt),), dtype=fmt, span=consumer.span,
                seq=consumer.seq - 0.5)
        g.add(op, [(src, sp)])
    return name


def _gemm_outputs(op: Op, fmt: str, is_fp8: bool, pol) -> tuple[Tensor, ...]:
    if op.kind == "router":
        return op.outputs  # expert indices and fp32 gate weights
    if op.kind == "experts":
        return tuple(Tensor(t.shape, pol.combine) for t in op.outputs)
    dtype = pol.default if is_fp8 else fmt
    return tuple(Tensor(t.shape, dtype) for t in op.outputs)


def _mark_fp8(op: Op, pol) -> Op:
    lin = pol.linear
    a, w = tuple(lin.act_tile), tuple(lin.weight_block)
    gemms = (("fwd", "x", a, "W", w), ("dgrad", "dY", a, "W^T", w),
             ("wgrad", "dY^T", (a[1], a[0]), "x", (a[1], a[0])))
    return op.with_attrs(
        fp8={"format": lin.format, "gemms": gemms, "accumulate": lin.accumulate,
             "promote_every": lin.promote_every, "scales": lin.scales, "pad": lin.pad})


def _ceil_div(k, d: int):
    if isinstance(k, (sympy.Integer, int)):
        return math.ceil(int(k) / d)
    return sympy.ceiling(k / d)
