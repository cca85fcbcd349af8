"""Dual micro-batch overlap: the chunk order inside one `OVERLAP_F_B` pair.

DeepSeek-V3 hides expert all-to-all time by running the forward of one
micro-batch and the backward of another together. Each MoE layer's forward is
four chunks, attention (compute), dispatch (all-to-all), MLP (compute),
combine (all-to-all); its backward runs them in reverse, with the two
compute chunks split into an input-gradient and a weight-gradient part:
combine-backward (all-to-all), MLP input + weight grads, dispatch-backward
(all-to-all), attention input + weight grads. A dense layer has no
all-to-alls. When the backward half is an `I` (zero-bubble split), its
weight parts are left to the later `W` action.

`overlap_order` interleaves the two chunk streams so that whenever one
micro-batch has an all-to-all in flight, the other computes. The result is a
flat list of steps a runtime executes in order:

    ("start", chunk)    launch the all-to-all asynchronously
    ("compute", chunk)  run a compute chunk
    ("wait", chunk)     wait for a launched all-to-all

For MoE layers in steady state this gives the DeepSeek-V3 figure's pattern:
F attention under B combine, B MLP under F dispatch, F MLP under B dispatch,
B attention under F combine, then the next layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dsvc.runtime.actions import BACKWARD_INPUT, OVERLAP_F_B, Action

MOE, DENSE = "moe", "dense"
COMM_PARTS = ("dispatch", "combine")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One piece of one layer of one half of the pair.

    `action` is the half's torch string ("3F5"); `layer` counts within the
    stage; `part` is attention, dispatch, mlp or combine; `grad` is None for
    forward chunks and all-to-alls, else "input" or "weight".
    """

    action: str
    layer: int
    part: str
    grad: str | None = None

    @property
    def is_comm(self) -> bool:
        return self.part in COMM_PARTS

    def __str__(self) -> str:
        suffix = f".{self.grad}" if self.grad else ""
        return f"{self.action}:L{self.layer}.{self.part}{suffix}"


Layers = int | Sequence[str]


def _kinds(layers: Layers) -> list[str]:
    kinds = [MOE] * layers if isinstance(layers, int) else list(layers)
    bad = [k for k in kinds if k not in (MOE, DENSE)]
    if bad:
        raise ValueError(f"layer kinds must be {MOE!r} or {DENSE!r}, got {bad}")
    return kinds


def forward_chunks(action: Action, layers: Layers) -> list[Chunk]:
    """A forward's chunks in execution order."""
    name, out = str(action), []
    for i, kind in enumerate(_kinds(layers)):
        out.append(Chunk(name, i, "attention"))
        if kind == MOE:
            out.append(Chunk(name, i, "dispatch"))
        out.append(Chunk(name, i, "mlp"))
        if kind == MOE:
            out.append(Chunk(name, i, "combine"))
    return out


def backward_chunks(action: Action, layers: Layers) -> list[Chunk]:
    """A backward's chunks in execution order (last layer first); an `I` has no weight parts."""
    name, out = str(action), []
    grads = ("input",) if action.kind == BACKWARD_INPUT else ("input", "weight")
    kinds = _kinds(layers)
    for i in reversed(range(len(kinds))):
        if kinds[i] == MOE:
            out.append(Chunk(name, i, "combine"))
        out += [Chunk(name, i, "mlp", g) for g in grads]
        if kinds[i] == MOE:
            out.append(Chunk(name, i, "dispatch"))
        out += [Chunk(name, i, "attention", g) for g in grads]
    return out


def overlap_order(
    pair: Action, forward_layers: Layers, backward_layers: Layers
) -> list[tuple[str, Chunk]]:
    """The interleaved (step, chunk) order for an `OVERLAP_F_B` pair.

    `forward_layers` / `backward_layers` give the layers of the stages the two
    halves run on: a count (all MoE) or a list of "moe" / "dense".
    """
    if pair.kind != OVERLAP_F_B:
        raise ValueError(f"{pair} is not an OVERLAP_F_B pair")
    f, b = pair.sub_actions
    streams = [forward_chunks(f, forward_layers), backward_chunks(b, backward_layers)]
    pos = [0, 0]
    in_flight: list[Chunk | None] = [None, None]
    launched: list[int] = []  # stream ids with an all-to-all in flight, oldest first
    steps: list[tuple[str, Chunk]] = []
    while pos[0] < len(streams[0]) or pos[1] < len(streams[1]) or launched:
        for k in (0, 1):  # launch every all-to-all whose inputs are ready
            if in_flight[k] is None and pos[k] < len(streams[k]) and streams[k][pos[k]].is_comm:
                in_flight[k] = streams[k][pos[k]]
                pos[k] += 1
                launched.append(k)
                steps.append(("start", in_flight[k]))
        ready = [
            k
            for k in (0, 1)
            if in_flight[k] is None and pos[k] < len(streams[k]) and not streams[k][pos[k]].is_comm
        ]
        if ready:
            # Prefer the stream whose partner is communicating: that compute hides it.
            k = max(ready, key=lambda j: (in_flight[1 - j] is not None, j == 0))
            steps.append(("compute", streams[k][pos[k]]))
            pos[k] += 1
            continue
        k = launched.pop(0)  # nothing can compute: wait for the oldest all-to-all
        steps.append(("wait", in_flight[k]))
        in_flight[k] = None
    return steps


def hidden_comm_chunks(steps: list[tuple[str, Chunk]]) -> list[Chunk]:
    """All-to-alls during which the *other* micro-batch ran at least one compute chunk."""
    open_at: dict[Chunk, int] = {}
    hidden = []
    for i, (op, chunk) in enumerate(steps):
        if op == "start":
            open_at[chunk] = i
        elif op == "wait":
            start = open_at.pop(chunk)
            if any(o == "compute" and c.action != chunk.action for o, c in steps[start + 1 : i]):
                hidden.append(chunk)
    return hidden
