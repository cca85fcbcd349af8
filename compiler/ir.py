"""The op graph: what the compiler knows about a model once it is lowered.

A `Graph` wraps a networkx DiGraph whose nodes are op names and whose node
attribute `op` holds a frozen `Op`. Tensor shapes and FLOPs are sympy
expressions in one symbol, `T`: the tokens of one micro-batch (micro_batch x
seq_len), so the same graph answers "how much per micro-batch" for any batch.
Edges carry `ports`: the (producer output, consumer input) index pairs they
connect, so two tensors between the same ops are one edge with two pairs.

Passes never mutate a graph they are given: `Graph.derive()` copies the
networkx structure (ops themselves are immutable and shared) and passes
replace ops with `dataclasses.replace`. Numbers are evaluated through
`num(expr, tokens)`, which caches by expression: layers of one kind share
their expression objects, so a 61-layer model evaluates each formula once.

Legend of op kinds (docs/ir.md has the full table): input, embedding, norm,
linear, rope, attention_core, act, add, concat, router, experts (a layer's
routed experts as one grouped op with a placement table), head, loss;
after assign_precision: quantize, cast; after insert_comm: dispatch, combine,
send, recv, collective.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import networkx as nx
import sympy

from dsvc.dsl.diagnostics import Span

T = sympy.Symbol("T", positive=True, integer=True)  # tokens in one micro-batch

# Bytes per element of every dtype the IR uses (int32 for token ids and expert indices).
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4, "bf16": 2, "fp16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1, "int32": 4, "int64": 8,
}  # fmt: skip

Expr = Any  # a sympy expression or a plain int


@functools.cache
def shape(*dims: Any) -> tuple:
    """A shape tuple; cached so that equal shapes are the same object (cheap to compare)."""
    return tuple(sympy.sympify(d) for d in dims)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A value flowing along an edge: shape (sympy, in T) and dtype."""

    shape: tuple
    dtype: str

    @property
    def numel(self) -> Expr:
        return sympy.Mul(*self.shape) if self.shape else sympy.Integer(1)

    @property
    def nbytes(self) -> Expr:
        return _nbytes(self.shape, self.dtype)


@functools.cache
def _nbytes(shp: tuple, dtype: str) -> Expr:
    return sympy.Mul(*shp) * sympy.Rational(DTYPE_BYTES[dtype]) if shp else sympy.Integer(
        int(DTYPE_BYTES[dtype]))


def tensor(dtype: str, *dims: Any) -> Tensor:
    return Tensor(shape(*dims), dtype)


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of the model, per micro-batch.

    `block` names the partition unit the op belongs to: "embed" (first stage),
    "layer" (a decoder layer, `layer` its index), "head" and "mtp" (the last
    stage). MTP module k carries layer = num_layers + k, as DeepSeek-V3's
    checkpoints number it. `params` lists the parameter names (Hugging Face
    DeepSeek-V3 naming; `*` stands for every routed expert id).
    """

    name: str
    kind: str
    block: str
    layer: int | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    dtype: str  # compute dtype
    flops_fwd: Expr = 0
    flops_dgrad: Expr = 0
    flops_wgrad: Expr = 0
    param_count: int = 0
    param_bytes: int = 0
    saved_bytes: Expr = 0  # activations kept for the backward pass
    params: tuple[str, ...] = ()
    span: Span | None = None
    stage: int | None = None  # per-copy stage index, set by partition_stages
    seq: float = 0.0  # creation order; breaks ties in the stable topological order
    attrs: dict = dataclasses.field(default_factory=dict)  # never mutated: replace instead

    @property
    def flops(self) -> Expr:
        """Forward + input-gradient + weight-gradient FLOPs."""
        return self.flops_fwd + self.flops_dgrad + self.flops_wgrad

    @property
    def source(self) -> str:
        return self.span.short if self.span is not None else ""

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def evolve(self, **changes: Any) -> Op:
        """A copy with `changes` (dataclasses.replace without re-running __init__: passes
        evolve every op of a 1600-op graph, and this is 3x faster)."""
        new = object.__new__(Op)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def with_attrs(self, **changes: Any) -> Op:
        return self.evolve(attrs={**self.attrs, **changes})


@dataclasses.dataclass(frozen=True)
class StageInfo:
    """One pipeline stage: a part of one model copy on one pipeline rank (device).

    `index` is the global stage id the schedules use (DualPipe: copy A stages
    0..PP-1, copy B stages PP..2PP-1); `part` the per-copy stage index that
    ops carry; `device` the pipeline rank holding it.
    """

    index: int
    copy: str
    part: int
    device: int
    layers: tuple[int, ...]
    embedding: bool
    head: bool
    mtp: bool


@dataclasses.dataclass(frozen=True)
class Placement:
    """Routed experts of one MoE layer over the EP ranks.

    `per_rank[r]` lists the expert ids EP rank r holds (primary copies first,
    then replicas); `group_of_expert[e]` the routing group of expert e;
    `node_of_rank[r]` the node (within the EP group) of EP rank r; `load` the
    histogram the replicas were chosen from (empty: uniform).
    """

    routed: int
    per_rank: tuple[tuple[int, ...], ...]
    group_of_expert: tuple[int, ...]
    node_of_rank: tuple[int, ...]
    replicas: int = 0
    load: tuple[float, ...] = ()

    @property
    def home_rank(self) -> tuple[int, ...]:
        """The EP rank holding each expert's primary copy."""
        home = [-1] * self.routed
        per = self.routed // len(self.per_rank)
        for r, ids in enumerate(self.per_rank):
            for e in ids[:per]:
                home[e] = r
        return tuple(home)

    def ranks_of(self, expert: int) -> tuple[int, ...]:
        return tuple(r for r, ids in enumerate(self.per_rank) if expert in ids)


@dataclasses.dataclass(frozen=True)
class FusionGroup:
    """Memory-bound work the `fuse` pass puts in one kernel (docs/ir.md).

    `ops` are the member ops; a composite op (routed experts, shared experts) takes part
    through its named `part`. `kernel` and `backward` name the functions of the
    generated kernel module that run it; the byte counts (per micro-batch, sympy in T)
    are what the fused kernels read and write, forward and backward, and `unfused_*`
    what the member ops move one by one (each reading its inputs and writing its
    outputs), so the pass's saving can be read off the IR.
    """

    name: str
    kind: str
    ops: tuple[str, ...]
    layer: int | None
    kernel: str
    backward: str
    reads: Any
    writes: Any
    bwd_reads: Any
    bwd_writes: Any
    unfused_reads: Any
    unfused_writes: Any
    part: str = ""
    what: str = ""


@dataclasses.dataclass(frozen=True)
class Partition:
    """The partition: parts per copy, stages, and the cost model's figures."""

    schedule: str
    ranks: int  # pipeline ranks (devices along the pipeline axis)
    parts: int  # stages per model copy
    copies: int
    stages: tuple[StageInfo, ...]
    part_cost: tuple[float, ...]  # estimated seconds per micro-batch, fwd + bwd
    device_cost: tuple[float, ...]
    balanced_by: str  # "cost" or "layers_per_stage"

    def parts_of_device(self, device: int) -> tuple[int, ...]:
        return tuple(sorted({s.part for s in self.stages if s.device == device}))


class Graph:
    """The IR: op graph plus what the passes decided.

    Set by the passes, in order (None before): `fusion` (fuse: a tuple of `FusionGroup`),
    `partition` (partition_stages), `schedule`
    (schedule: a `compiler.schedules.Schedule`), `simulation` (simulate: a
    `passes.simulate.StepResult`, None without cluster, parallel and train blocks),
    `plan` (emit_plan: a `dsvc.runtime.plan.Plan`), `files` (emit_build: a build
    directory's files, relative path -> bytes). Expert placement rides on the ops.
    """

    def __init__(self, spec, tokens: int, nxg: nx.DiGraph | None = None, passes: tuple = (),
                 partition: Partition | None = None, notes: tuple[str, ...] = ()):
        self.spec = spec
        self.tokens = tokens  # the value of T for this spec
        self.g = nxg if nxg is not None else nx.DiGraph()
        self.passes = passes
        self.partition = partition
        self.fusion: tuple[FusionGroup, ...] | None = None
        # what runs the decoder blocks the costs are of (runtime/plan.PROGRAM_CHOICES):
        # the generated program where it covers them (the trainer's default), or "eager"
        self.program = "generated"
        self.schedule: Any = None
        self.simulation: Any = None
        self.plan: Any = None
        self.files: dict[str, bytes] | None = None
        self.notes = notes  # remarks a pass wants users to see (e.g. a defaulted setting)
        self._order: list[str] | None = None  # cached topological order of op names

    # -- building and deriving
    def derive(self, pass_name: str | None = None, **changes: Any) -> Graph:
        """A copy to be changed by a pass (the networkx structure is copied, ops shared)."""
        new = Graph.__new__(Graph)
        new.__dict__.update(self.__dict__)  # includes what later passes attach (e.g. a schedule)
        new.g = self.g.copy()
        if pass_name is not None:
            new.passes = self.passes + (pass_name,)
        for key, value in changes.items():
            setattr(new, key, value)
        return new

    def add(self, op: Op, feeds: Iterable[tuple[str, int]] = ()) -> Op:
        """Add `op`; `feeds[i]` = (producer name, output port) feeding input i."""
        assert op.name not in self.g, f"duplicate op {op.name}"
        self._order = None
        self.g.add_node(op.name, op=op)
        for dst_port, (src, src_port) in enumerate(feeds):
            self.connect(src, src_port, op.name, dst_port)
        return op

    def connect(self, src: str, src_port: int, dst: str, dst_port: int) -> None:
        self._order = None
        if self.g.has_edge(src, dst):
            ports = self.g.edges[src, dst]["ports"]
            self.g.edges[src, dst]["ports"] = tuple(sorted(ports + ((src_port, dst_port),)))
        else:
            self.g.add_edge(src, dst, ports=((src_port, dst_port),))

    def disconnect(self, src: str, src_port: int, dst: str, dst_port: int) -> None:
        self._order = None
        ports = tuple(p for p in self.g.edges[src, dst]["ports"] if p != (src_port, dst_port))
        if ports:
            self.g.edges[src, dst]["ports"] = ports
        else:
            self.g.remove_edge(src, dst)

    def replace(self, op: Op) -> None:
        """Swap in a changed op of the same name (its `seq` must not change)."""
        self.g.nodes[op.name]["op"] = op

    # -- reading
    def op(self, name: str) -> Op:
        return self.g.nodes[name]["op"]

    def __contains__(self, name: str) -> bool:
        return name in self.g

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    def ops(self) -> list[Op]:
        """Every op in a stable topological order (creation order breaks ties)."""
        nodes = self.g.nodes
        if self._order is None:
            self._order = list(nx.lexicographical_topological_sort(
                self.g, key=lambda n: (nodes[n]["op"].seq, n)))
        return [nodes[n]["op"] for n in self._order]

    def producer(self, name: str, port: int) -> tuple[str, int]:
        """(producer op, its output port) feeding input `port` of op `name`."""
        for src in self.g.predecessors(name):
            for sp, dp in self.g.edges[src, name]["ports"]:
                if dp == port:
                    return src, sp
        raise KeyError(f"input {port} of {name} is not connected")

    def consumers(self, name: str, port: int | None = None) -> list[tuple[str, int, int]]:
        """(consumer, producer port, consumer port) of `name`'s outputs, sorted."""
        out = []
        for dst in self.g.successors(name):
            for sp, dp in self.g.edges[name, dst]["ports"]:
                if port is None or sp == port:
                    out.append((dst, sp, dp))
        return sorted(out)

    def edges(self) -> Iterator[tuple[str, str, int, int]]:
        """(src, dst, src port, dst port) for every connection, sorted."""
        for src, dst, data in sorted(self.g.edges(data=True), key=lambda e: (e[0], e[1])):
            for sp, dp in data["ports"]:
                yield src, dst, sp, dp

    def num(self, expr: Expr) -> float | int:
        """`expr` evaluated at this spec's tokens per micro-batch."""
        return num(expr, self.tokens)

    def placements(self) -> dict[int, Placement]:
        """Expert placement of every MoE layer (after place_experts)."""
        out = {}
        for name in self.g.nodes:
            op = self.g.nodes[name]["op"]
            if op.kind == "experts" and op.attr("placement") is not None:
                out[op.layer] = op.attr("placement")
        return dict(sorted(out.items()))


def num(expr: Expr, tokens: int) -> float | int:
    """A shape or cost expression evaluated at T = tokens (cached per expression)."""
    if isinstance(expr, (int, float)):
        return expr
    return _num(expr, tokens)


@functools.cache
def _num(expr, tokens: int) -> float | int:
    value = expr.xreplace({T: tokens})
    if value.is_Integer:
        return int(value)
    if value.is_Rational and value.q == 1:
        return int(value.p)
    return float(value)
