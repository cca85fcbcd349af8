"""The schedule checker: every invariant a runtime relies on, all problems reported at once.

- layout: chains cover every stage once; every stage lives on a real device;
- every action's stage lives on the device that runs it, micro-batches in range;
- every (stage, micro-batch) gets exactly one F, and either one B or one I plus one W;
- overlapped pairs are a forward plus a backward (B or I) of different work;
- no action runs before its inputs exist (the schedule simulates to the end);
- sends match receives: each cross-device transfer has one SEND after its
  producer and one RECV before its consumer, nothing else is sent, and between
  any two devices the receives come in the order of the sends.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from dsvc.runtime.actions import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    INPUT_GRAD_KINDS,
    OVERLAP_F_B,
    RECV_B,
    RECV_F,
    SEND_B,
    SEND_F,
    Action,
)

from .comms import consumer_key, message_for, recv_source
from .schedule_ir import Schedule
from .timeline import ScheduleDeadlock, UniformCosts, simulate

_SHOWN = 40


class ScheduleCheckError(ValueError):
    """A schedule that breaks an invariant; `.problems` lists every one found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = problems[:_SHOWN]
        more = len(problems) - len(shown)
        text = "; ".join(shown) + (f"; ... and {more} more" if more > 0 else "")
        super().__init__(f"invalid schedule ({len(problems)} problems): {text}")


def check_schedule(schedule: Schedule) -> None:
    """Raise `ScheduleCheckError` listing every broken invariant, or return None."""
    problems = schedule_problems(schedule)
    if problems:
        raise ScheduleCheckError(problems)


def schedule_problems(schedule: Schedule) -> list[str]:
    """Every broken invariant of `schedule`, as readable sentences (empty when valid)."""
    problems = _layout_problems(schedule)
    if problems:  # nothing below is meaningful on a broken layout
        return problems
    problems += _action_problems(schedule)
    if problems:
        return problems
    problems += _comm_problems(schedule)
    if not problems:
        try:
            simulate(schedule, UniformCosts(1, 2, 1))
        except ScheduleDeadlock as exc:
            problems.append(f"an action runs before its inputs exist: {exc}")
    return problems


def _layout_problems(schedule: Schedule) -> list[str]:
    problems = []
    seen = Counter(s for c in schedule.chains for s in c.stages)
    for s in range(schedule.num_stages):
        if seen[s] != 1:
            problems.append(f"stage {s} is in {seen[s]} chains, expected 1")
    extra = sorted(s for s in seen if not 0 <= s < schedule.num_stages)
    if extra:
        problems.append(f"chains name stages {extra} that have no device")
    for s, d in enumerate(schedule.stage_device):
        if not 0 <= d < schedule.num_devices:
            problems.append(f"stage {s} is placed on device {d}, which does not exist")
    return problems


def _action_problems(schedule: Schedule) -> list[str]:
    problems: list[str] = []
    count: Counter = Counter()
    for d, acts in enumerate(schedule.actions):
        for a in acts:
            if a.kind == OVERLAP_F_B:
                f, b = a.sub_actions
                if f.kind != FORWARD or b.kind not in INPUT_GRAD_KINDS:
                    problems.append(
                        f"device {d}: {a} must pair a forward with a B or I, in that order"
                    )
                elif (f.stage, f.microbatch) == (b.stage, b.microbatch):
                    problems.append(f"device {d}: {a} overlaps a micro-batch with its own backward")
            for p in a.parts():
                if not 0 <= p.stage < schedule.num_stages:
                    problems.append(f"device {d}: {a} names stage {p.stage}, which does not exist")
                    continue
                if schedule.stage_device[p.stage] != d:
                    problems.append(
                        f"device {d}: {a} runs stage {p.stage}, which lives on device "
                        f"{schedule.stage_device[p.stage]}"
                    )
                n = schedule.chain_of(p.stage).num_microbatches
                if not 0 <= p.microbatch < n:
                    problems.append(
                        f"device {d}: {a} names micro-batch {p.microbatch}; stage {p.stage} has {n}"
                    )
                    continue
                if a.is_compute:
                    count[(p.stage, p.microbatch, p.kind)] += 1
    if problems:
        return problems
    for chain in schedule.chains:
        for s in chain.stages:
            for m in range(chain.num_microbatches):
                f, b, i, w = (
                    count[(s, m, k)]
                    for k in (FORWARD, FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)
                )
                if f != 1:
                    problems.append(f"stage {s} micro-batch {m} has {f} forwards, expected 1")
                if not ((b, i, w) == (1, 0, 0) or (b, i, w) == (0, 1, 1)):
                    problems.append(
                        f"stage {s} micro-batch {m} has B x{b}, I x{i}, W x{w}; "
                        "expected one B, or one I and one W"
                    )
    return problems


def _comm_problems(schedule: Schedule) -> list[str]:
    if not any(a.is_comm for acts in schedule.actions for a in acts):
        return []  # a compute-only list: comms are added by `insert_send_recv`
    problems: list[str] = []
    expected_sends: dict[Action, int] = {}  # send -> device that must issue it
    expected_recvs: dict[Action, int] = {}
    for d, acts in enumerate(schedule.actions):
        for a in acts:
            for p in a.parts() if a.is_compute else ():
                msg = message_for(schedule, p)
                if msg is not None:
                    expected_sends[msg[0]] = d
                    expected_recvs[msg[1]] = msg[2]

    awaited: dict[int, set[tuple]] = defaultdict(set)  # device -> receives its computes need
    for a, d in expected_recvs.items():
        awaited[d].add((a.kind, a.stage, a.microbatch))
    sends_by_pair: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    recvs_by_pair: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    for d, acts in enumerate(schedule.actions):
        done: set[tuple] = set()  # compute parts finished so far on d, as (kind, stage, mb)
        posted: set[tuple] = set()  # receives posted so far on d
        for a in acts:
            if a.kind in (SEND_F, SEND_B):
                kinds = (FORWARD,) if a.kind == SEND_F else tuple(INPUT_GRAD_KINDS)
                finished = any((k, a.stage, a.microbatch) in done for k in kinds)
                if expected_sends.get(a) != d:
                    problems.append(
                        f"device {d}: {a} sends something no stage on another device receives"
                    )
                    continue
                if not finished:
                    problems.append(f"device {d}: {a} comes before the action that computes it")
                dst = expected_recvs[_matching_recv(schedule, a)]
                sends_by_pair[(d, dst)].append((a.kind, a.stage, a.microbatch))
            elif a.kind in (RECV_F, RECV_B):
                if expected_recvs.get(a) != d:
                    problems.append(f"device {d}: {a} waits for something no other device sends")
                    continue
                posted.add((a.kind, a.stage, a.microbatch))
                src = recv_source(schedule, a)
                peer_stage = (
                    schedule.prev_stage(a.stage)
                    if a.kind == RECV_F
                    else schedule.next_stage(a.stage)
                )
                send_kind = SEND_F if a.kind == RECV_F else SEND_B
                recvs_by_pair[(src, d)].append((send_kind, peer_stage, a.microbatch))
            else:
                for p in a.parts():
                    key = consumer_key(p)
                    if key is not None and key in awaited[d] and key not in posted:
                        problems.append(
                            f"device {d}: {a} runs before its {key[0]} for stage {key[1]} is posted"
                        )
                    done.add((p.kind, p.stage, p.microbatch))

    issued = Counter(a for acts in schedule.actions for a in acts if a.is_comm)
    # only the offending entries are sorted (for a stable message order): a valid schedule
    # of tens of thousands of actions sorts nothing
    for action, n in sorted(item for item in issued.items() if item[1] > 1):
        problems.append(f"{action} appears {n} times")
    for action, d in sorted(item for item in expected_sends.items() if issued[item[0]] == 0):
        problems.append(f"device {d} never sends {action}")
    for action, d in sorted(item for item in expected_recvs.items() if issued[item[0]] == 0):
        problems.append(f"device {d} never receives {action}")
    for pair in sorted(set(sends_by_pair) | set(recvs_by_pair)):
        if sends_by_pair[pair] != recvs_by_pair[pair] and not problems:
            problems.append(
                f"device {pair[1]} receives from device {pair[0]} in another order than it sends "
                "(NCCL matches point-to-point messages in issue order)"
            )
    return problems


def _matching_recv(schedule: Schedule, send: Action) -> Action:
    if send.kind == SEND_F:
        return Action(RECV_F, schedule.next_stage(send.stage), send.microbatch)
    return Action(RECV_B, schedule.prev_stage(send.stage), send.microbatch)
