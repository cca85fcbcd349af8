"""Schedule generators: 1F1B, ZB1P (zero-bubble H1), DualPipe and DualPipeV.

`build_schedule(kind, pp, num_microbatches)` is the entry point. PP is the PP
of the published bubble formulas, i.e. pipeline stages per model copy:

| kind      | devices | stages (global ids)                     | micro-batches |
|-----------|---------|-----------------------------------------|---------------|
| 1f1b      | PP      | 0..PP-1, stage s on device s            | any >= 1      |
| zb1p      | PP      | same                                    | any >= 1      |
| dualpipe  | PP      | copy A 0..PP-1 on devices 0..PP-1; copy B PP..2PP-1, PP+k on device PP-1-k | even, >= 2 PP |
| dualpipev | PP/2    | 0..PP-1 in a V: stage s on device min(s, PP-1-s) | >= PP       |

So under DualPipe device i holds stages i and 2PP-1-i (the V placement) but
they belong to two independent chains, each fed half the micro-batches.
"""

from __future__ import annotations

from collections import deque

from dsvc.runtime.actions import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    Action,
    overlap,
)

from .comms import insert_send_recv
from .schedule_ir import Chain, Schedule

KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")


class ScheduleConfigError(ValueError):
    """An impossible schedule request (odd PP for DualPipe, too few micro-batches...)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def validate_request(kind: str, pp: int, num_microbatches: int) -> None:
    """Raise `ScheduleConfigError` (with a hint) unless the request can be built."""
    if kind not in KINDS:
        raise ScheduleConfigError(
            f"unknown schedule kind {kind!r}", hint=f"use one of {', '.join(KINDS)}"
        )
    if pp < 1:
        raise ScheduleConfigError(f"PP must be at least 1, got {pp}")
    if num_microbatches < 1:
        raise ScheduleConfigError(
            f"the number of micro-batches must be at least 1, got {num_microbatches}"
        )
    if kind in ("dualpipe", "dualpipev") and pp % 2:
        what = (
            "DualPipe puts stage i of copy A and stage PP-1-i of copy B on one device"
            if kind == "dualpipe"
            else "DualPipeV holds stages i and PP-1-i on device i"
        )
        raise ScheduleConfigError(
            f"{kind} needs an even number of stages, got PP = {pp}",
            hint=f"{what}; use PP = {pp + 1} or {pp - 1}" if pp > 1 else f"{what}; use PP = 2",
        )
    if kind == "dualpipe":
        need = 2 * pp
        if num_microbatches % 2 or num_microbatches < need:
            good = max(need, num_microbatches + num_microbatches % 2)
            raise ScheduleConfigError(
                f"dualpipe needs an even number of micro-batches, at least 2 x PP = {need}; "
                f"got {num_microbatches}",
                hint=f"half the micro-batches enter from each end; use --micro-batches {good}",
            )
    if kind == "dualpipev" and num_microbatches < pp:
        raise ScheduleConfigError(
            f"dualpipev needs at least PP = {pp} micro-batches (2 per device), got {num_microbatches}",
            hint=f"use --micro-batches {pp}",
        )


def build_schedule(
    kind: str, pp: int, num_microbatches: int, *, with_comms: bool = True
) -> Schedule:
    """Per-device action lists for `kind` with PP stages per copy and N micro-batches.

    With `with_comms` (the default) the lists carry SEND/RECV actions, ready for
    a runtime; without, only compute actions (torch's "simple" format).
    """
    validate_request(kind, pp, num_microbatches)
    if kind in ("1f1b", "zb1p"):
        chains = (Chain("main", tuple(range(pp)), num_microbatches),)
        make = _one_f_one_b if kind == "1f1b" else _zero_bubble_h1
        actions = tuple(make(pp, d, num_microbatches) for d in range(pp))
        schedule = Schedule(kind, pp, num_microbatches, chains, tuple(range(pp)), actions)
    elif kind == "dualpipe":
        schedule = _dualpipe(pp, num_microbatches)
    else:
        schedule = _dualpipev(pp, num_microbatches)
    return insert_send_recv(schedule) if with_comms else schedule


def _one_f_one_b(pp: int, d: int, n: int) -> tuple[Action, ...]:
    """1F1B on device d: PP-1-d warm-up forwards, then alternate, then drain backwards."""
    out: list[Action] = []
    warm = min(pp - 1 - d, n)
    out += [Action(FORWARD, d, m) for m in range(warm)]
    for m in range(n - warm):
        out.append(Action(FORWARD, d, warm + m))
        out.append(Action(FULL_BACKWARD, d, m))
    out += [Action(FULL_BACKWARD, d, m) for m in range(n - warm, n)]
    return tuple(out)


def _zero_bubble_h1(pp: int, d: int, n: int) -> tuple[Action, ...]:
    """ZB-H1 on device d: 1F1B's F/I order; the first d weight passes are deferred.

    Running input-gradient passes without their W lets the gradient reach the
    upstream devices sooner; the d deferred W's then fill device d's cool-down,
    which keeps activations in flight at 1F1B's PP and gives (PP-1)(F+B-2W).
    """
    out: list[Action] = []
    warm = min(pp - 1 - d, n)
    out += [Action(FORWARD, d, m) for m in range(warm)]
    pending: deque[int] = deque()

    def backward_input(m: int) -> None:
        out.append(Action(BACKWARD_INPUT, d, m))
        pending.append(m)
        if m >= d:  # past the deferral: one W per I, oldest first
            out.append(Action(BACKWARD_WEIGHT, d, pending.popleft()))

    for m in range(n - warm):
        out.append(Action(FORWARD, d, warm + m))
        backward_input(m)
    for m in range(n - warm, n):
        backward_input(m)
    out += [Action(BACKWARD_WEIGHT, d, m) for m in pending]
    return tuple(out)


# --- the DualPipe family -----------------------------------------------------
# One device's steps in terms of two phases: phase 0 is the chain in which the
# device sits `r` stages from the start ("near"), phase 1 the chain in which it
# sits r stages from the end ("far"); r = min(d, PP-1-d) under DualPipe and
# r = d under DualPipeV. Steps: ("F", phase), ("B", phase), ("I", phase),
# ("W",) = the oldest deferred weight pass, ("FB", forward phase, backward phase).


def _dual_steps(num_half: int, r: int, n: int) -> list[tuple]:
    """The eight-part DualPipe construction for one device (n micro-batches per chain)."""
    warm = num_half - r - 1
    steps: list[tuple] = [("F", 0)] * (2 * warm)  # 1. run ahead on the near chain
    steps += [("F", 0), ("F", 1)] * (r + 1)  # 2. forwards in both directions
    steps += [("I", 1), ("W",), ("F", 1)] * warm  # 3. first far backwards, zero-bubble split
    for i in range(n - 2 * num_half + r + 1):  # 4. steady state: overlapped F&B pairs
        if i == 0 and r == num_half - 1:
            # The middle devices run their first steady F and B apart, as the reference
            # construction does (kept so our lists equal torch's ScheduleDualPipeV).
            steps += [("F", 0), ("B", 1)]
        else:
            steps.append(("FB", 0, 1))
        steps.append(("FB", 1, 0))
    steps += [("B", 1), ("FB", 1, 0)] * warm  # 5. the near chain's last forwards
    switch = (r + 1) // 2  # 6. drain backwards; from the middle on, defer W to fill 7-8
    for i in range(r + 1):
        far_split = i > switch or (i == switch and r % 2 == 1)
        steps.append(("I" if far_split else "B", 1))
        steps.append(("I" if i >= switch else "B", 0))
    steps += [("W",), ("I", 0)] * warm  # 7. weight passes between the last backwards
    steps += [("W",)] * (r + 1)  # 8. the remaining weight passes
    return steps


def _resolve(steps: list[tuple], stage_of: tuple[int, int]) -> tuple[Action, ...]:
    """Number the micro-batches of abstract steps per stage; W's pop a FIFO of I's."""
    next_f: dict[int, int] = {}
    next_b: dict[int, int] = {}
    deferred: deque[tuple[int, int]] = deque()

    def take(counter: dict[int, int], stage: int) -> int:
        m = counter.get(stage, 0)
        counter[stage] = m + 1
        return m

    out: list[Action] = []
    for step in steps:
        op = step[0]
        if op == "F":
            s = stage_of[step[1]]
            out.append(Action(FORWARD, s, take(next_f, s)))
        elif op in ("B", "I"):
            s = stage_of[step[1]]
            m = take(next_b, s)
            out.append(Action(FULL_BACKWARD if op == "B" else BACKWARD_INPUT, s, m))
            if op == "I":
                deferred.append((s, m))
        elif op == "W":
            assert deferred, "DualPipe construction popped a weight pass that was never deferred"
            s, m = deferred.popleft()
            out.append(Action(BACKWARD_WEIGHT, s, m))
        else:  # ("FB", forward phase, backward phase)
            fs, bs = stage_of[step[1]], stage_of[step[2]]
            out.append(
                overlap(
                    Action(FORWARD, fs, take(next_f, fs)),
                    Action(FULL_BACKWARD, bs, take(next_b, bs)),
                )
            )
    assert not deferred, "DualPipe construction left weight passes undone"
    return tuple(out)


def _dualpipe(pp: int, n: int) -> Schedule:
    half = pp // 2
    per_chain = n // 2
    copy_a = tuple(range(pp))
    copy_b = tuple(range(pp, 2 * pp))
    stage_device = tuple(range(pp)) + tuple(pp - 1 - k for k in range(pp))
    actions = []
    for d in range(pp):
        r = min(d, pp - 1 - d)
        a_stage, b_stage = d, 2 * pp - 1 - d
        near_far = (a_stage, b_stage) if d < half else (b_stage, a_stage)
        actions.append(_resolve(_dual_steps(half, r, per_chain), near_far))
    chains = (Chain("A", copy_a, per_chain, 0), Chain("B", copy_b, per_chain, per_chain))
    return Schedule("dualpipe", pp, n, chains, stage_device, tuple(actions))


def _dualpipev(pp: int, n: int) -> Schedule:
    devices = pp // 2
    stage_device = tuple(min(s, pp - 1 - s) for s in range(pp))
    actions = tuple(_resolve(_dual_steps(devices, d, n), (d, pp - 1 - d)) for d in range(devices))
    chains = (Chain("main", tuple(range(pp)), n, 0),)
    return Schedule("dualpipev", pp, n, chains, stage_device, actions)
