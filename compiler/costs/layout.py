"""What each pipeline stage and device holds: the input of the memory, comm and step formulas.

The memory, communication and step figures are computed per pipeline stage from
a `StageContents` (its layers, whether it holds the embedding, the head, MTP
modules) and per device from the stages it holds. `even_layout` is the simple
placement used until the graph's `partition_stages` pass provides the real,
cost-balanced one (it will build the same `StageContents` from its partition):

* a model copy is cut into PP stages (PP = `pipeline` ranks; 2 x ranks for
  DualPipeV) of contiguous layers, as even as possible, earlier stages taking
  the remainder; the embedding goes on the first stage, the head and the MTP
  modules on the last;
* 1F1B / ZB1P: device i holds stage i. DualPipe: device i holds stage i of copy
  A and stage PP-1-i of copy B (global ids i and 2PP-1-i). DualPipeV: device i
  holds stages i and 2R-1-i of one copy (R ranks, 2R stages);
* a stage at position p of a chain of n stages holds n - p micro-batches of
  activations at peak (1F1B warm-up): PP on device 0 under 1F1B, and p + (PP-1-p)
  chunks = PP + 1 on every DualPipe device, as the DualPipe README's table says;
* micro-batches through a stage per step: all M of them, except DualPipe, whose
  two directions each take half.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dsvc.runtime.plan import split_layers

from .symbols import Quantities


@dataclasses.dataclass(frozen=True)
class StageContents:
    """One pipeline stage: what it holds and how busy it is per step."""

    index: int  # global stage id (DualPipe: copy A 0..PP-1, copy B PP..2PP-1)
    position: int  # position along its model copy, 0 = first
    layers: tuple[int, ...]
    embedding: bool = False
    head: bool = False
    mtp: int = 0  # MTP modules (with the head)
    in_flight: int = 1  # micro-batches of activations held at peak
    micro_batches: Any = 1  # micro-batches through this stage per step


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """Parallel sizes, as numbers or symbols (see `parallel_dims`)."""

    PP: int  # pipeline ranks (devices along the pipeline)
    stages_per_copy: int  # PP of the published formulas
    DP: Any
    EP: Any
    EDP: Any  # expert-data-parallel degree: DP / EP
    T: Any  # tokens per micro-batch per GPU: S x micro_batch
    M: Any  # micro-batches per step per pipeline
    zero: int
    world: int


def parallel_dims(spec, q: Quantities, S) -> ParallelDims:
    """Symbols for the parallel plan (`spec.parallel` and `spec.train` must exist)."""
    p, t = spec.parallel, spec.train
    DP = q.sym("DP", p.data, "parallel.data")
    EP = q.sym("EP", p.expert, "parallel.expert") if p.expert > 1 else 1
    b = q.sym("b", t.micro_batch, "train.micro_batch") if t.micro_batch > 1 else 1
    B = q.sym("B_g", t.global_batch, "train.global_batch")
    M = q.let("M", B / (DP * b), "micro-batches per step per pipeline")
    world = spec.cluster.world_size if spec.cluster is not None else p.pipeline * p.data
    return ParallelDims(p.pipeline, p.stages_per_copy, DP, EP, DP / EP, S * b, M, p.zero, world)


def even_layout(spec, M) -> list[tuple[StageContents, ...]]:
    """Stages held by each device under the even split (see the module docstring).

    `M` is the number of micro-batches per step (a number or a symbol).
    Without a `parallel` block the whole model is one stage on one device.
    """
    p = spec.parallel
    kind = p.schedule if p is not None else "1f1b"
    n = p.stages_per_copy if p is not None else 1
    groups = split_layers(spec.model.num_layers, n)
    mtp = spec.model.mtp.depth
    per_stage = M / 2 if kind == "dualpipe" else M

    def stage(index: int, pos: int) -> StageContents:
        return StageContents(index=index, position=pos, layers=groups[pos], embedding=pos == 0,
                             head=pos == n - 1, mtp=mtp if pos == n - 1 else 0,
                             in_flight=n - pos, micro_batches=per_stage)

    if kind == "dualpipe":
        return [(stage(i, i), stage(2 * n - 1 - i, n - 1 - i)) for i in range(n)]
    if kind == "dualpipev":
        r = n // 2
        return [(stage(i, i), stage(2 * r - 1 - i, 2 * r - 1 - i)) for i in range(r)]
    return [(stage(i, i),) for i in range(n)]
