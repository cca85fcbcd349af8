"""Point-to-point sends and receives between pipeline stages, inserted into action lists.

A forward on stage s whose next stage lives on another device is followed by
`SEND_F` (stage s) on its device and matched by `RECV_F` (stage s+1) on the
receiver; a backward (B or I) likewise sends `SEND_B` to the previous stage's
`RECV_B`. Stages on the same device (DualPipeV's turn of the V) exchange
nothing.

Placement rules, chosen so a runtime on NCCL cannot mismatch or deadlock:
sends go right after the compute that produced the data; on each receiving
device the receives from one sender appear in the order that sender issues
its sends (NCCL matches point-to-point operations between two ranks in issue
order), each before the compute that consumes it, posted as late as that
order allows.
"""

from __future__ import annotations

from collections import defaultdict

from dsvc.runtime.actions import (
    FORWARD,
    INPUT_GRAD_KINDS,
    RECV_B,
    RECV_F,
    SEND_B,
    SEND_F,
    Action,
)

from .schedule_ir import Schedule


def message_for(schedule: Schedule, part: Action) -> tuple[Action, Action, int] | None:
    """(send, matching receive, receiving device) for a compute part, or None if it sends nothing."""
    here = schedule.stage_device[part.stage]
    if part.kind == FORWARD:
        peer = schedule.next_stage(part.stage)
        send_kind, recv_kind = SEND_F, RECV_F
    elif part.kind in INPUT_GRAD_KINDS:
        peer = schedule.prev_stage(part.stage)
        send_kind, recv_kind = SEND_B, RECV_B
    else:
        return None
    if peer is None or schedule.stage_device[peer] == here:
        return None
    send = Action(send_kind, part.stage, part.microbatch)
    recv = Action(recv_kind, peer, part.microbatch)
    return send, recv, schedule.stage_device[peer]


def recv_source(schedule: Schedule, recv: Action) -> int | None:
    """The device a RECV_F / RECV_B receives from (None if its stage has no such peer)."""
    peer = (
        schedule.prev_stage(recv.stage) if recv.kind == RECV_F else schedule.next_stage(recv.stage)
    )
    return None if peer is None else schedule.stage_device[peer]


def consumer_key(part: Action) -> tuple[str, int, int] | None:
    """The receive a compute part waits for, as (kind, stage, micro-batch), if any could exist."""
    if part.kind == FORWARD:
        return (RECV_F, part.stage, part.microbatch)
    if part.kind in INPUT_GRAD_KINDS:
        return (RECV_B, part.stage, part.microbatch)
    return None


def insert_send_recv(schedule: Schedule) -> Schedule:
    """The schedule with SEND/RECV actions added to its compute-only action lists."""
    n = schedule.num_devices
    compute = [schedule.compute_actions(d) for d in range(n)]
    consumer_index: dict[tuple[str, int, int], int] = {}
    for acts in compute:
        for i, action in enumerate(acts):
            for part in action.parts():
                key = consumer_key(part)
                if key is not None:
                    consumer_index[key] = i

    with_sends: list[list[Action]] = [[] for _ in range(n)]
    recvs_by_pair: dict[tuple[int, int], list[Action]] = defaultdict(list)
    for d, acts in enumerate(compute):
        for action in acts:
            with_sends[d].append(action)
            for part in action.parts():
                msg = message_for(schedule, part)
                if msg is not None:
                    send, recv, dst = msg
                    with_sends[d].append(send)
                    recvs_by_pair[(d, dst)].append(recv)

    # before_compute[dst][i]: receives posted just before device dst's i-th compute action
    before_compute: list[dict[int, list[Action]]] = [defaultdict(list) for _ in range(n)]
    for (_src, dst), recvs in sorted(recvs_by_pair.items()):
        try:
            wanted = [consumer_index[(r.kind, r.stage, r.microbatch)] for r in recvs]
        except KeyError as exc:
            raise ValueError(f"a send has no consumer in the schedule: {exc}") from exc
        # The latest slot that keeps sender order: the minimum over this and later receives.
        slot = list(wanted)
        for j in range(len(slot) - 2, -1, -1):
            slot[j] = min(slot[j], slot[j + 1])
        for recv, i in zip(recvs, slot):
            before_compute[dst][i].append(recv)

    out: list[list[Action]] = []
    for d in range(n):
        merged: list[Action] = []
        i = 0
        for action in with_sends[d]:
            if action.is_compute:
                merged.extend(before_compute[d].get(i, ()))
                i += 1
            merged.append(action)
        out.append(merged)
    return schedule.with_actions(out)
