"""Timing of one pipeline action from its chunks, and the cost model the step simulator asks.

An action (a forward, a backward, or an overlapped F&B pair) is played as two
resources in time: the GPU's compute stream runs compute chunks one after the
other; all-to-alls are flows on the links (the network and NVLink), launched
asynchronously and waited for. Flows on one link share its bandwidth equally
(processor sharing: two all-to-alls in flight at once each get half), and a
flow that needs both links (two-hop dispatch: network, then NVLink forwarding
in the node, pipelined) moves at the pace of its slower share. A lone forward
or backward waits for each of its all-to-alls right away; an F&B pair follows
`overlap_order`, so one micro-batch computes while the other's all-to-all is
in flight. Exposed communication = the action's duration - its compute.

`TopologyCosts` turns these into the `compiler.schedules.CostModel` the event
simulator runs, with pipeline P2P time from message size, link bandwidth
(shared with the sender's all-to-all traffic) and latency.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from dsvc.compiler.schedules import CostModel
from dsvc.compiler.schedules.overlap_order import backward_chunks, forward_chunks, overlap_order
from dsvc.runtime.actions import BACKWARD_WEIGHT, FORWARD, OVERLAP_F_B, SEND_F

from .simulate_costs import IB, NVLINK

_EPS = 1e-15


@dataclasses.dataclass(frozen=True)
class Played:
    """One action as timed: total seconds, compute seconds, and per link the seconds
    during which at least one of its flows was in flight."""

    duration: float
    compute: float
    link_busy: tuple[tuple[str, float], ...] = ()

    @property
    def exposed(self) -> float:
        return max(0.0, self.duration - self.compute)

    def busy(self, link: str) -> float:
        return dict(self.link_busy).get(link, 0.0)


def play(steps, bandwidth: dict[str, float]) -> Played:
    """Run `steps`: ("compute", seconds, seconds while communication holds SMs), ("start",
    key, {link: bytes}, latency), ("wait", key). A compute chunk that begins while an
    all-to-all is in flight runs on the SMs communication leaves (its second time)."""
    t = ft = compute = 0.0  # compute clock, flow clock (never ahead of a wait's answer)
    active: dict = {}  # key -> [bytes left fraction, demand, latency]
    done: dict = {}
    busy: dict[str, float] = defaultdict(float)

    def rates() -> dict:
        users: dict[str, int] = defaultdict(int)
        for _, demand, _ in active.values():
            for link, b in demand.items():
                if b > 0:
                    users[link] += 1
        return {key: min(bandwidth[link] / users[link] / b for link, b in fl[1].items() if b > 0)
                for key, fl in active.items()}

    def run(until: float | None = None, target=None) -> None:
        nonlocal ft
        while active and not (target is not None and target in done):
            r = rates()
            first = min(active, key=lambda k: active[k][0] / r[k])
            dt = active[first][0] / r[first]
            if until is not None and ft + dt > until:
                dt = until - ft
                first = None
            links = {link for _, d, _ in active.values() for link, b in d.items() if b > 0}
            for link in links:
                busy[link] += dt
            for key, flow in active.items():
                flow[0] -= r[key] * dt
            ft += dt
            for key in [k for k in active if k == first or active[k][0] <= _EPS]:
                done[key] = ft + active.pop(key)[2]
            if first is None:
                return
        if until is not None:
            ft = max(ft, until)

    for step in steps:
        op = step[0]
        if op == "compute":
            run(until=t)
            seconds = step[2] if active and len(step) > 2 else step[1]
            t += seconds
            compute += seconds
        elif op == "start":
            run(until=t)
            _, key, demand, latency = step
            if any(b > 0 for b in demand.values()):
                active[key] = [1.0, demand, latency]
            else:
                done[key] = t + latency
        else:
            run(target=step[1])
            t = max(t, done[step[1]])
    run()
    return Played(t, compute, tuple(sorted(busy.items())))


class ActionCosts:
    """Played chunks per action, cached by (stage parts, kinds): every data-parallel replica
    and every device sees the same links, so one timing serves all of them."""

    def __init__(self, profiles, stage_part: dict[int, int], bandwidth: dict[str, float]):
        self.profiles, self.stage_part, self.bandwidth = profiles, stage_part, bandwidth
        self._cache: dict = {}

    def single(self, action) -> Played:
        key = (self.stage_part[action.stage], action.kind)
        if key not in self._cache:
            self._cache[key] = self._play_single(action)
        return self._cache[key]

    def pair(self, forward, backward) -> Played:
        key = (self.stage_part[forward.stage], self.stage_part[backward.stage], backward.kind)
        if key not in self._cache:
            self._cache[key] = self._play_pair(forward, backward)
        return self._cache[key]

    def played(self, action) -> Played:
        if action.kind == OVERLAP_F_B:
            return self.pair(*action.sub_actions)
        return self.single(action)

    # -- chunk lists
    def _units(self, stage: int):
        return self.profiles[self.stage_part[stage]].units

    def _kinds(self, stage: int) -> list[str]:
        return [u.kind for u in self._units(stage)]

    def _step(self, op: str, chunk, stage: int, backward: bool):
        unit = self._units(stage)[chunk.layer]
        if op == "compute":
            if backward:
                key = (chunk.part, chunk.grad)
                return ("compute", unit.bwd[key], unit.bwd_c.get(key, unit.bwd[key]))
            return ("compute", unit.fwd[chunk.part],
                    unit.fwd_c.get(chunk.part, unit.fwd[chunk.part]))
        if op == "start":
            demand, latency = unit.comm[(chunk.part, "B" if backward else "F")]
            return ("start", chunk, demand, latency)
        return ("wait", chunk)

    def _play_single(self, action) -> Played:
        if action.kind == BACKWARD_WEIGHT:
            weight = sum(u.bwd[(p, "weight")] for u in self._units(action.stage)
                         for p in ("attention", "mlp"))
            return Played(weight, weight)
        backward = action.kind != FORWARD
        make = backward_chunks if backward else forward_chunks
        steps = []
        for c in make(action, self._kinds(action.stage)):
            ops = ("start", "wait") if c.is_comm else ("compute",)
            steps += [self._step(op, c, action.stage, backward) for op in ops]
        return play(steps, self.bandwidth)

    def _play_pair(self, forward, backward) -> Played:
        from dsvc.runtime.actions import overlap

        pair = overlap(forward, backward)
        order = overlap_order(pair, self._kinds(forward.stage), self._kinds(backward.stage))
        f_name = str(forward)
        steps = []
        for op, c in order:
            fwd = c.action == f_name
            steps.append(self._step(op, c, forward.stage if fwd else backward.stage, not fwd))
        return play(steps, self.bandwidth)


class TopologyCosts(CostModel):
    """The event simulator's cost model for one spec on its cluster (times in seconds).

    `p2p[(src device, dst device)]` = (link, latency); `boundary_bytes[(part a, part b)]`
    = bytes crossing that stage boundary per micro-batch (activations forward, the same
    size of gradients back); `utilisation[device][link]` = the share of the device's
    busy time its all-to-alls keep that link occupied, which a P2P transfer shares.
    """

    time_unit = "s"

    def __init__(self, actions: ActionCosts, schedule, profiles, p2p, boundary_bytes,
                 bandwidth: dict[str, float]):
        self.actions, self.schedule, self.profiles = actions, schedule, profiles
        self.p2p, self.boundary_bytes, self.bandwidth = p2p, boundary_bytes, bandwidth
        self.utilisation = self._utilisation()

    def compute_time(self, part, device):
        return self.actions.single(part).compute

    def overlap_time(self, forward, backward, device):
        return self.actions.pair(forward, backward).compute

    def exposed_comm_time(self, action, device):
        return self.actions.played(action).exposed

    def activation_size(self, stage):
        return self.profiles[self.actions.stage_part[stage]].saved_bytes

    def p2p_time(self, send, src_device, dst_device):
        part = self.actions.stage_part[send.stage]
        edge = (part, part + 1) if send.kind == SEND_F else (part - 1, part)
        nbytes = self.boundary_bytes.get(edge, 0.0)
        link, latency = self.p2p[(src_device, dst_device)]
        # Processor sharing with the sender's all-to-alls: half the link while they run.
        share = 1.0 - self.utilisation[src_device].get(link, 0.0) / 2
        return latency + nbytes / (self.bandwidth[link] * share)

    def _utilisation(self) -> list[dict[str, float]]:
        out = []
        for acts in self.schedule.actions:
            total, busy = 0.0, {IB: 0.0, NVLINK: 0.0}
            for a in acts:
                if a.is_compute:
                    played = self.actions.played(a)
                    total += played.duration
                    for link in busy:
                        busy[link] += played.busy(link)
            out.append({k: (v / total if total else 0.0) for k, v in busy.items()})
        return out
