"""Event simulation of a schedule: when each action runs, the bubble, activations in flight.

Each device runs its action list in order; an action starts when the device is
free and its inputs exist: a forward needs the previous stage's forward of the
same micro-batch, a backward (B or I) its own forward and the next stage's
backward, a W its own I, an overlapped F&B pair the inputs of both halves.
Data that crosses devices leaves at the producer's SEND (or, in a compute-only
list, when the producer ends) and arrives a P2P latency later. SEND and RECV
take no device time (they are asynchronous posts).

Costs come from a `CostModel`: `UniformCosts` (one time per chunk kind, the
published formulas' setting) or `TableCosts` (per (stage, kind) times, per
device-pair latencies, exposed all-to-all time per chunk), the hook the
topology-level simulation drives. Times are plain numbers: ints and
`fractions.Fraction` stay exact.

Definitions (docs/schedules.md): makespan = end of the last action, all
devices starting at 0; bubble of a device = makespan - its busy time;
activations in flight = micro-batch stage activations held from the start of
a forward to the end of its B or I (W reuses saved inputs but is not counted,
matching the published tables).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict, deque
from collections.abc import Mapping

from dsvc.runtime.actions import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    INPUT_GRAD_KINDS,
    RECV_B,
    RECV_F,
    SEND_B,
    SEND_F,
    Action,
)

from .schedule_ir import Schedule


class ScheduleDeadlock(RuntimeError):
    """No device can run its next action: the order waits on something never produced."""


class CostModel:
    """Durations the simulator asks for; override what a model knows better.

    `compute_time(part, device)` is required. `overlap_time` defaults to the
    sum of the halves, `exposed_comm_time` (all-to-all time a chunk cannot hide,
    added to its duration and reported separately) and `p2p_time` to 0,
    `activation_size` to 1 per micro-batch and stage.
    """

    time_unit = "unit"

    def compute_time(self, part: Action, device: int):
        raise NotImplementedError

    def overlap_time(self, forward: Action, backward: Action, device: int):
        return self.compute_time(forward, device) + self.compute_time(backward, device)

    def exposed_comm_time(self, action: Action, device: int):
        return 0

    def p2p_time(self, send: Action, src_device: int, dst_device: int):
        return 0

    def activation_size(self, stage: int):
        return 1


@dataclasses.dataclass(frozen=True)
class UniformCosts(CostModel):
    """One time per chunk kind: F forward, B full backward, W its weight part (I = B - W),
    FB an overlapped F&B pair (default F + B). No communication."""

    f: float
    b: float
    w: float
    fb: float | None = None

    def __post_init__(self) -> None:
        if min(self.f, self.b, self.w) < 0 or (self.fb is not None and self.fb < 0):
            raise ValueError("chunk times must not be negative")
        if self.w > self.b:
            raise ValueError(f"W ({self.w}) is part of the full backward B ({self.b}), so W <= B")

    @property
    def pair(self):
        return self.f + self.b if self.fb is None else self.fb

    def compute_time(self, part: Action, device: int):
        return {
            FORWARD: self.f,
            FULL_BACKWARD: self.b,
            BACKWARD_INPUT: self.b - self.w,
            BACKWARD_WEIGHT: self.w,
        }[part.kind]

    def overlap_time(self, forward: Action, backward: Action, device: int):
        # An overlapped input-only backward leaves its weight part for later.
        return self.pair - (self.w if backward.kind == BACKWARD_INPUT else 0)


@dataclasses.dataclass(frozen=True)
class TableCosts(CostModel):
    """Per-(stage, kind) chunk times, optional per-(forward stage, backward stage) pair
    times, per-(src device, dst device) P2P latencies (else `default_p2p`), and
    per-(stage, kind) exposed all-to-all time added inside chunks."""

    times: Mapping[tuple[int, str], float]
    pair_times: Mapping[tuple[int, int], float] = dataclasses.field(default_factory=dict)
    p2p: Mapping[tuple[int, int], float] = dataclasses.field(default_factory=dict)
    default_p2p: float = 0
    exposed: Mapping[tuple[int, str], float] = dataclasses.field(default_factory=dict)
    activation_bytes: Mapping[int, float] = dataclasses.field(default_factory=dict)
    time_unit: str = "s"

    def compute_time(self, part: Action, device: int):
        return self.times[(part.stage, part.kind)]

    def overlap_time(self, forward: Action, backward: Action, device: int):
        key = (forward.stage, backward.stage)
        if key in self.pair_times:
            return self.pair_times[key]
        return super().overlap_time(forward, backward, device)

    def exposed_comm_time(self, action: Action, device: int):
        return sum(self.exposed.get((p.stage, p.kind), 0) for p in action.parts())

    def p2p_time(self, send: Action, src_device: int, dst_device: int):
        return self.p2p.get((src_device, dst_device), self.default_p2p)

    def activation_size(self, stage: int):
        return self.activation_bytes.get(stage, 1)


@dataclasses.dataclass(frozen=True)
class TimedAction:
    """One compute action as simulated: [start, end), of which `exposed_comm` was communication."""

    device: int
    action: Action
    start: float
    end: float
    exposed_comm: float = 0


@dataclasses.dataclass(frozen=True)
class SimResult:
    """What `simulate` found; per-device tuples are indexed by device."""

    schedule: Schedule
    makespan: float
    busy: tuple
    bubble: tuple
    activations_in_flight: tuple  # max micro-batch-stage activations held at once
    peak_activation: tuple  # the same weighted by `CostModel.activation_size`
    exposed_comm: tuple
    timeline: tuple[tuple[TimedAction, ...], ...]
    time_unit: str = "unit"

    @property
    def max_bubble(self):
        return max(self.bubble)


def _needs(schedule: Schedule, part: Action, has_comms: bool) -> list[tuple[tuple, int | None]]:
    """Inputs of a compute part: (key of the event that provides it, producer device, or
    None when the producer is on the same device). Across devices the event is the
    producer's SEND, or its end when the lists carry no sends."""
    s, m = part.stage, part.microbatch
    here = schedule.stage_device[s]
    out: list[tuple[tuple, int | None]] = []

    def upstream(kind: str, producer: int, send_kind: str) -> None:
        dev = schedule.stage_device[producer]
        if dev == here:
            out.append((("done", kind, producer, m), None))
        elif has_comms:
            out.append((("sent", send_kind, producer, m), dev))
        else:
            out.append((("done", kind, producer, m), dev))

    if part.kind == FORWARD:
        prev = schedule.prev_stage(s)
        if prev is not None:
            upstream(FORWARD, prev, SEND_F)
    elif part.kind in INPUT_GRAD_KINDS:
        out.append((("done", FORWARD, s, m), None))
        nxt = schedule.next_stage(s)
        if nxt is not None:
            upstream("X", nxt, SEND_B)
    elif part.kind == BACKWARD_WEIGHT:
        out.append((("done", "X", s, m), None))
    return out


def simulate(schedule: Schedule, costs: CostModel) -> SimResult:
    """Run `schedule` under `costs`; raise `ScheduleDeadlock` if it cannot finish."""
    n = schedule.num_devices
    has_comms = any(a.is_comm for acts in schedule.actions for a in acts)
    times: dict[tuple, float] = {}
    waiting: dict[tuple, list[int]] = defaultdict(list)
    ptr = [0] * n
    clock = [0] * n
    timeline: list[list[TimedAction]] = [[] for _ in range(n)]
    runnable = deque(range(n))

    def publish(key: tuple, t) -> None:
        times[key] = t
        runnable.extend(waiting.pop(key, ()))

    def advance(d: int) -> None:
        acts = schedule.actions[d]
        while ptr[d] < len(acts):
            a = acts[ptr[d]]
            if a.kind in (SEND_F, SEND_B):
                publish(("sent", a.kind, a.stage, a.microbatch), clock[d])
                ptr[d] += 1
                continue
            if a.kind in (RECV_F, RECV_B):
                ptr[d] += 1
                continue
            ready = clock[d]
            for part in a.parts():
                for key, src in _needs(schedule, part, has_comms):
                    if key not in times:
                        waiting[key].append(d)
                        return
                    t = times[key]
                    if src is not None:
                        kind = SEND_F if part.kind == FORWARD else SEND_B
                        t = t + costs.p2p_time(Action(kind, key[2], key[3]), src, d)
                    ready = max(ready, t)
            parts = a.parts()
            if len(parts) == 2:
                duration = costs.overlap_time(parts[0], parts[1], d)
            else:
                duration = costs.compute_time(a, d)
            exposed = costs.exposed_comm_time(a, d)
            end = ready + duration + exposed
            timeline[d].append(TimedAction(d, a, ready, end, exposed))
            clock[d] = end
            ptr[d] += 1
            for part in parts:
                kind = "X" if part.kind in INPUT_GRAD_KINDS else part.kind
                publish(("done", kind, part.stage, part.microbatch), end)

    while runnable:
        advance(runnable.popleft())
    stuck = [d for d in range(n) if ptr[d] < len(schedule.actions[d])]
    if stuck:
        heads = ", ".join(f"device {d} at {schedule.actions[d][ptr[d]]}" for d in stuck[:8])
        raise ScheduleDeadlock(
            f"the schedule cannot finish: {heads} wait for inputs never produced"
        )

    makespan = max((clock[d] for d in range(n)), default=0)
    busy = tuple(sum(t.end - t.start for t in timeline[d]) for d in range(n))
    held, peak = _activations(schedule, costs)
    return SimResult(
        schedule=schedule,
        makespan=makespan,
        busy=busy,
        bubble=tuple(makespan - b for b in busy),
        activations_in_flight=held,
        peak_activation=peak,
        exposed_comm=tuple(sum(t.exposed_comm for t in timeline[d]) for d in range(n)),
        timeline=tuple(tuple(t) for t in timeline),
        time_unit=getattr(costs, "time_unit", "unit"),
    )


def _activations(schedule: Schedule, costs: CostModel) -> tuple[tuple, tuple]:
    """Max activations held per device: a device's actions are sequential, so list order is
    time order; a forward holds from its start, a B or I releases at its end."""
    counts, weights = [], []
    for acts in schedule.actions:
        held = weight = max_held = max_weight = 0
        for a in acts:
            if not a.is_compute:
                continue
            for p in a.parts():
                if p.kind == FORWARD:
                    held += 1
                    weight += costs.activation_size(p.stage)
            max_held, max_weight = max(max_held, held), max(max_weight, weight)
            for p in a.parts():
                if p.kind in INPUT_GRAD_KINDS:
                    held -= 1
                    weight -= costs.activation_size(p.stage)
        counts.append(max_held)
        weights.append(max_weight)
    return tuple(counts), tuple(weights)


def simulate_uniform(schedule: Schedule, f, b, w, fb=None) -> SimResult:
    """Simulate with uniform chunk times and no communication (the published formulas' setting)."""
    return simulate(schedule, UniformCosts(f, b, w, fb))
