"""Pipeline execution of a plan's action lists by our own executor: DualPipe, overlapped pairs.

torch.distributed.pipelining maps every stage index to one rank and runs one
model copy, so it cannot run DualPipe (DeepSeek-V3 section 3.2.1): two copies
of the model fed from both ends, rank i holding copy A's stage i and copy B's
stage PP+(PP-1-i), i.e. the same layers as copy A's stage PP-1-i. Its
`OVERLAP_F_B` also runs the two halves one after the other. This executor runs
the compiled per-rank lists itself, on torch's P2P primitives:

- Stages form chains: DualPipe's copy A (stages 0..PP-1) and copy B (PP..2PP-1,
  stage PP+k on rank PP-1-k); otherwise one chain (DualPipeV folds it into a V,
  the turn handed over locally). A chain's micro-batch m is the step's
  micro-batch `offset + m` (copy B's offset is N/2).
- Actions: `sFm`, `sBm`, `sIm`, `sWm`, `sSEND_Fm`, `sRECV_Fm`, `sSEND_Bm`,
  `sRECV_Bm`, `(sFm;tBn)OVERLAP_F_B`. Sends and receives are `dist.isend` /
  `dist.irecv` on the pipeline group, tagged by (stage, micro-batch, direction);
  a receive is waited for when its data is consumed, sends when the step ends.
  Lists without comm actions send right after the producer and receive at the
  consumer.
- Backward: `B` is autograd from the stage output; `I` / `W` are torch's
  zero-bubble split (`stage_backward_input` / `stage_backward_weight`, the
  functions torch's own schedules use), or, for blocks running the build's
  generated program, the chunks' own split (`I` queues each chunk's weight
  half, `W` runs the queue: runtime/program.py). A stage fed token ids has no
  input gradient: its `I` does nothing and its `W` runs the whole backward (as torch).
- Pairs: with `schedule.overlap` the two halves interleave at their
  all-to-alls (`overlap.OverlapSession`); without it, forward then backward.
  Both record an event log of the pair (`overlap_log`, last step).
- Copies: after the last action every gradient is summed over the two ranks
  holding that parameter in the two copies (ranks i and PP-1-i hold the same
  parameter names): one all-reduce per pair of ranks. Both ranks then take the
  same optimizer step on the same numbers, so the copies stay bitwise equal.

The loss of each micro-batch is divided by the step's micro-batch count N, as
in `PipelineExecutor`: the summed gradients are those of the mean loss.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .actions import (
    COMM_KINDS,
    FORWARD,
    INPUT_GRAD_KINDS,
    OVERLAP_F_B,
    ActionSyntaxError,
    parse_action,
)
from .layers import dtype_of
from .model import StageModule
from .overlap import OverlapSession
from .plan import Plan, Stage
from .program import defer_weight_grads, run_weight_grads


def _runs_program(module) -> bool:
    """Whether a stage's blocks run a generated program (runtime/program.py)."""
    return any(getattr(b, "program", None) is not None for b in module.modules())

_COMMS = tuple(sorted(COMM_KINDS))


@dataclasses.dataclass
class _Slot:
    """One local stage and what it keeps between actions, by chain micro-batch."""

    stage: Stage
    module: StageModule
    offset: int  # the step micro-batch of this chain's micro-batch 0
    prev: Stage | None
    next: Stage | None
    fwd: dict = dataclasses.field(default_factory=dict)  # m -> (input leaf | None, output)
    inbox_x: dict = dataclasses.field(default_factory=dict)  # m -> activation (or recv pending)
    inbox_g: dict = dataclasses.field(default_factory=dict)  # m -> output grad (or pending)
    grad_x: dict = dataclasses.field(default_factory=dict)  # m -> input grad awaiting SEND_B
    pending_w: dict = dataclasses.field(default_factory=dict)  # m -> what W must still do

    @property
    def first(self) -> bool:
        return self.prev is None

    @property
    def last(self) -> bool:
        return self.next is None


def chains_of(plan: Plan) -> list[tuple[list[Stage], int]]:
    """The plan's stage chains in forward order, each with its micro-batch offset."""
    ordered = sorted(plan.stages, key=lambda s: s.index)
    if plan.schedule.kind != "dualpipe":
        return [(ordered, 0)]
    half = plan.schedule.num_microbatches // 2
    return [([s for s in ordered if s.copy == c], off) for c, off in (("A", 0), ("B", half))]


def check_dualpipe_layout(plan: Plan) -> None:
    """The layout whose copies this executor keeps equal; raises ValueError otherwise."""
    pp, n = plan.mesh.pipeline, plan.schedule.num_microbatches
    problems = []
    if pp % 2:
        problems.append(f"dualpipe needs an even number of pipeline ranks, got {pp}")
    if n % 2:
        problems.append(f"dualpipe feeds N/2 micro-batches from each end: N = {n} is odd")
    (a, _), (b, _) = chains_of(plan)
    if len(a) != pp or len(b) != pp:
        problems.append(f"dualpipe needs {pp} stages in each copy, got {len(a)} and {len(b)}")
    else:
        for k in range(pp):
            if a[k].rank != k or b[k].rank != pp - 1 - k:
                problems.append(
                    f"copy A's stage {k} must be on rank {k} and copy B's position {k} "
                    f"(stage {b[k].index}) on rank {pp - 1 - k}"
                )
            same = (a[k].layers, a[k].embedding, a[k].head, a[k].mtp)
            if same != (b[k].layers, b[k].embedding, b[k].head, b[k].mtp):
                problems.append(
                    f"copy B's stage {b[k].index} must hold what copy A's stage {k} holds "
                    f"(layers {list(a[k].layers)}); got layers {list(b[k].layers)}"
                )
    if problems:
        raise ValueError("cannot run this dualpipe plan: " + "; ".join(problems))


def _parse(text: str):
    """(kind, stage, micro-batch, text), or ("PAIR", forward, backward, text) of an overlap."""
    try:
        action = parse_action(text)
    except ActionSyntaxError as err:
        raise ValueError(f"action {text!r} is not one this executor runs: {err}") from None
    if action.kind == OVERLAP_F_B:
        fwd, bwd = action.sub_actions
        if fwd.kind != FORWARD or bwd.kind not in INPUT_GRAD_KINDS:
            raise ValueError(f"action {text!r}: an overlap pairs a forward with a backward")
        return ("PAIR", _parse(str(fwd)), _parse(str(bwd)), text)
    return (action.kind, action.stage, action.microbatch, text)


class ActionExecutor:
    """This rank's stages, run from the plan's action list (see the module docstring)."""

    def __init__(self, plan: Plan, modules: list[StageModule], mesh):
        sch = plan.schedule
        if plan.schedule.kind == "dualpipe":
            check_dualpipe_layout(plan)
        if not sch.actions:
            raise ValueError(
                f"{sch.kind} with overlap runs from the schedule's action lists; this plan has "
                "none (compile it with dsvc, whose schedule pass writes them)"
            )
        self.plan, self.mesh = plan, mesh
        self.num_microbatches = sch.num_microbatches
        self.overlap = sch.overlap
        self.slots: dict[int, _Slot] = {}
        by_index = {m.stage.index: m for m in modules}
        for chain, offset in chains_of(plan):
            for pos, stage in enumerate(chain):
                if stage.index in by_index:
                    self.slots[stage.index] = _Slot(
                        stage, by_index[stage.index], offset,
                        chain[pos - 1] if pos else None,
                        chain[pos + 1] if pos + 1 < len(chain) else None,
                    )  # fmt: skip
        self.actions = [_parse(a) for a in sch.actions[mesh.pp_rank]]
        self.has_comms = any(
            a[0] in _COMMS
            for act in self.actions
            for a in (act[1:3] if act[0] == "PAIR" else [act])
        )
        self.comms = list(
            {id(m.comm): m.comm for mod in modules for m in mod.moe_layers().values()}.values()
        )
        self.copy_group = self._copy_group() if sch.kind == "dualpipe" else None
        self.overlap_log: list[tuple[str, list]] = []  # (pair, events) of the last step
        self._sends: list = []

    def _copy_group(self):
        """The group of this rank and the one holding the other copy of its stages."""
        pp, mine = self.mesh.pp, None
        for k in range(pp // 2):  # every rank creates every group, in the same order
            group = self.mesh.pp_subgroup([k, pp - 1 - k])
            if self.mesh.pp_rank in (k, pp - 1 - k):
                mine = group
        return mine

    # -- the step --------------------------------------------------------------------
    def run(self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> None:
        n = self.num_microbatches
        self._tokens, self._labels = tokens_BS.chunk(n), labels_BS.chunk(n)
        self.overlap_log = []
        for action in self.actions:
            self._do(action)
        for work in self._sends:
            work.wait()
        self._sends = []
        left = [s.stage.index for s in self.slots.values() if s.fwd or s.pending_w]
        if left:
            raise RuntimeError(f"the action list left stages {left} without their backward")
        if self.copy_group is not None:
            self._sum_copies()

    def _do(self, action) -> None:
        kind = action[0]
        if kind == "PAIR":
            return self._pair(action)
        slot = self.slots.get(action[1])
        if slot is None:
            raise RuntimeError(f"{action[3]}: stage {action[1]} is not on this rank")
        m = action[2]
        if kind == "F":
            self._forward(slot, m)
        elif kind in ("B", "I"):
            self._backward(slot, m, split=kind == "I")
        elif kind == "W":
            self._backward_weight(slot, m)
        elif kind == "SEND_F":
            self._send(slot.fwd[m][1].detach(), slot.next, slot.next.index, m, 0)
        elif kind == "RECV_F":
            slot.inbox_x[m] = self._recv(slot.prev, slot.stage.index, m, 0)
        elif kind == "SEND_B":
            self._send(slot.grad_x.pop(m), slot.prev, slot.stage.index, m, 1)
        elif kind == "RECV_B":
            slot.inbox_g[m] = self._recv(slot.next, slot.next.index, m, 1)

    def _pair(self, action) -> None:
        _, f, b, text = action
        session = OverlapSession(f[3], b[3], interleave=self.overlap)
        for comm in self.comms:
            comm.session = session
        try:
            session.run(lambda: self._do(f), lambda: self._do(b))
        finally:
            for comm in self.comms:
                comm.session = None
        self.overlap_log.append((text, session.log))

    # -- compute ---------------------------------------------------------------------
    def _forward(self, slot: _Slot, m: int) -> None:
        step_mb = slot.offset + m
        leaf = None
        if slot.first:
            x = self._tokens[step_mb]
        else:
            x = leaf = self._take(slot.inbox_x, m, slot.prev, slot.stage.index, 0)
            x.requires_grad_(True)
        out = slot.module(x, labels=self._labels[step_mb])
        if slot.last:
            out = out.sum() / self.num_microbatches
        slot.fwd[m] = (leaf, out)
        if not slot.last:
            nxt = self._local(slot.next)
            if nxt is not None:  # DualPipeV's turn: the next stage is on this rank
                nxt.inbox_x[m] = out.detach()
            elif not self.has_comms:
                self._send(out.detach(), slot.next, slot.next.index, m, 0)

    def _backward(self, slot: _Slot, m: int, split: bool) -> None:
        leaf, out = slot.fwd.pop(m)
        grads = None if slot.last else [self._take(slot.inbox_g, m, slot.next, slot.next.index, 1)]
        if leaf is None:  # fed token ids: no input gradient to hurry for
            if split:
                slot.pending_w[m] = ("full", out, grads)
            else:
                torch.autograd.backward([out], grads)
            return
        if split and _runs_program(slot.module):
            # generated chunks split themselves: their weight halves wait in a queue
            key = (slot.stage.index, m)
            with defer_weight_grads(key):
                torch.autograd.backward([out], grads)
            slot.pending_w[m] = ("program", key)
            grad_x = leaf.grad
        elif split:
            from torch.distributed.pipelining._backward import stage_backward_input

            dx, groups = stage_backward_input([out], grads, [leaf], slot.module.parameters())
            slot.pending_w[m] = ("weight", groups)
            grad_x = dx[0]
        else:
            torch.autograd.backward([out], grads)
            grad_x = leaf.grad
        if grad_x is None:
            grad_x = torch.zeros_like(leaf)
        prev = self._local(slot.prev)
        if prev is not None:
            prev.inbox_g[m] = grad_x
        elif self.has_comms:
            slot.grad_x[m] = grad_x
        else:
            self._send(grad_x, slot.prev, slot.stage.index, m, 1)

    def _backward_weight(self, slot: _Slot, m: int) -> None:
        what = slot.pending_w.pop(m)
        if what[0] == "full":
            torch.autograd.backward([what[1]], what[2])
        elif what[0] == "program":
            run_weight_grads(what[1])
        else:
            from torch.distributed.pipelining._backward import stage_backward_weight

            stage_backward_weight(slot.module.parameters(), what[1])

    # -- point to point --------------------------------------------------------------
    def _local(self, stage: Stage | None) -> _Slot | None:
        if stage is not None and stage.rank == self.mesh.pp_rank:
            return self.slots[stage.index]
        return None

    def _tag(self, stage_index: int, m: int, direction: int) -> int:
        # unique per (receiving stage of an activation / sending stage of a gradient, mb, dir)
        return (stage_index * 2 + direction) * (self.num_microbatches + 1) + m

    def _peer(self, stage: Stage) -> int:
        return self.mesh.global_rank(stage.rank, self.mesh.dp_rank)

    def _send(self, t: torch.Tensor, peer: Stage, stage_index: int, m: int, direction: int):
        t = t.contiguous()
        tag = self._tag(stage_index, m, direction)
        self._sends.append(dist.isend(t, self._peer(peer), group=self.mesh.pp_group, tag=tag))

    def _recv(self, peer: Stage, stage_index: int, m: int, direction: int):
        p = self.plan
        shape = (p.train.micro_batch, p.train.seq_len, p.model.hidden)
        buf = torch.empty(shape, dtype=dtype_of(p.precision.default), device=self.mesh.device)
        tag = self._tag(stage_index, m, direction)
        return (buf, dist.irecv(buf, self._peer(peer), group=self.mesh.pp_group, tag=tag))

    def _take(self, inbox: dict, m: int, peer: Stage, stage_index: int, direction: int):
        item = inbox.pop(m, None)
        if item is None:
            if self.has_comms:
                what = "RECV_F" if direction == 0 else "RECV_B"
                raise RuntimeError(
                    f"stage {stage_index}, micro-batch {m}: no {what} before its consumer in "
                    f"rank {self.mesh.pp_rank}'s action list"
                )
            item = self._recv(peer, stage_index, m, direction)
        if isinstance(item, tuple):  # a receive in flight
            buf, work = item
            work.wait()
            return buf
        return item

    # -- the two copies --------------------------------------------------------------
    def _sum_copies(self) -> None:
        """Sum every gradient with the other copy's (same names on both ranks)."""
        seen, params = set(), []
        for slot in self.slots.values():
            for name, p in slot.module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append((name, p))
        params.sort(key=lambda kv: kv[0])
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in params]
        )
        dist.all_reduce(flat, group=self.copy_group)
        off = 0
        for _, p in params:
            summed = flat[off : off + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = summed.clone()
            else:  # in place: the optimizer's gradient buffer holds it
                p.grad.copy_(summed)
            off += p.numel()
