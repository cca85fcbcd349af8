"""The schedule checker, property tests over generated schedules, and torch equivalence."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvc.compiler.schedules import (
    Action,
    ScheduleCheckError,
    build_schedule,
    check_schedule,
    formula_conditions,
    published_bubble,
    schedule_problems,
    simulate_uniform,
)
from dsvc.compiler.schedules.comms import message_for, recv_source


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["1f1b", "zb1p", "dualpipe", "dualpipev"]))
    if kind in ("1f1b", "zb1p"):
        pp = draw(st.integers(1, 9))
        n = draw(st.integers(1, 3 * pp + 2))
    elif kind == "dualpipe":
        pp = 2 * draw(st.integers(1, 5))
        n = 2 * draw(st.integers(pp, 2 * pp + 2))
    else:
        pp = 2 * draw(st.integers(1, 5))
        n = draw(st.integers(pp, 3 * pp))
    return kind, pp, n


times = st.fractions(min_value=0, max_value=6, max_denominator=4)


@settings(max_examples=60, deadline=None)
@given(requests())
def test_every_generated_schedule_is_valid(request):
    kind, pp, n = request
    schedule = build_schedule(kind, pp, n)
    check_schedule(schedule)  # includes the no-action-before-its-inputs simulation
    # every (micro-batch, stage) gets one F and one B, or one I and one W
    count = Counter(
        (p.kind, p.stage, p.microbatch)
        for acts in schedule.actions
        for a in acts
        for p in a.parts()
        if a.is_compute
    )
    for chain in schedule.chains:
        for s in chain.stages:
            for m in range(chain.num_microbatches):
                assert count[("F", s, m)] == 1
                assert (count[("B", s, m)], count[("I", s, m)], count[("W", s, m)]) in (
                    (1, 0, 0),
                    (0, 1, 1),
                )
    # sends match receives one to one, and only across devices
    sends = [a for acts in schedule.actions for a in acts if a.kind.startswith("SEND")]
    recvs = [a for acts in schedule.actions for a in acts if a.kind.startswith("RECV")]
    assert len(sends) == len(recvs) == len(set(sends)) == len(set(recvs))
    expected = {
        message_for(schedule, p)[0]
        for acts in schedule.actions
        for a in acts
        if a.is_compute
        for p in a.parts()
        if message_for(schedule, p) is not None
    }
    assert set(sends) == expected


@settings(max_examples=60, deadline=None)
@given(requests(), times, times, times, st.one_of(st.none(), times))
def test_no_action_starts_before_its_inputs(request, f, b, w, fb):
    kind, pp, n = request
    b = b + w  # W is part of B
    result = simulate_uniform(build_schedule(kind, pp, n), f, b, w, fb)
    end = {}
    for row in result.timeline:
        prev_end = 0
        for t in row:
            assert t.start >= prev_end  # a device runs one action at a time
            prev_end = t.end
            for p in t.action.parts():
                end[(p.kind if p.kind in "FW" else "X", p.stage, p.microbatch)] = t.end
    s = result.schedule
    for row in result.timeline:
        for t in row:
            for p in t.action.parts():
                needs = []
                if p.kind == "F" and s.prev_stage(p.stage) is not None:
                    needs.append(("F", s.prev_stage(p.stage), p.microbatch))
                if p.kind in "BI":
                    needs.append(("F", p.stage, p.microbatch))
                    if s.next_stage(p.stage) is not None:
                        needs.append(("X", s.next_stage(p.stage), p.microbatch))
                if p.kind == "W":
                    needs.append(("X", p.stage, p.microbatch))
                for key in needs:
                    assert end[key] <= t.start, (t.action, key)
    # and whenever the published conditions hold, the published bubble is exact
    if formula_conditions(kind, pp, n, f, b, w, fb) is None and f + b > 0:
        assert result.max_bubble == published_bubble(kind, pp, f, b, w, fb)


def _replace(schedule, device, actions):
    acts = list(schedule.actions)
    acts[device] = tuple(actions)
    return schedule.with_actions(acts)


def test_checker_finds_missing_and_duplicated_work():
    s = build_schedule("1f1b", 4, 8, with_comms=False)
    dropped = _replace(s, 2, [a for a in s.actions[2] if a != Action("B", 2, 5)])
    assert any("stage 2 micro-batch 5 has B x0" in p for p in schedule_problems(dropped))
    doubled = _replace(s, 1, s.actions[1] + (Action("F", 1, 0),))
    assert any("has 2 forwards" in p for p in schedule_problems(doubled))
    wrong_device = _replace(s, 0, s.actions[0] + (Action("F", 3, 9),))
    assert any("lives on device 3" in p for p in schedule_problems(wrong_device))
    with pytest.raises(ScheduleCheckError) as info:
        check_schedule(dropped)
    assert info.value.problems


def test_checker_finds_actions_before_their_inputs():
    s = build_schedule("zb1p", 4, 8, with_comms=False)
    acts = list(s.actions[1])
    w0 = acts.index(Action("W", 1, 0))
    acts.insert(0, acts.pop(w0))  # a weight pass before any backward
    problems = schedule_problems(_replace(s, 1, acts))
    assert any("before its inputs" in p for p in problems)


def test_checker_finds_bad_overlap_pairs():
    s = build_schedule("dualpipe", 4, 8, with_comms=False)
    acts = list(s.actions[0])
    i = next(k for k, a in enumerate(acts) if a.kind == "OVERLAP_F_B")
    f, b = acts[i].sub_actions
    acts[i] = Action("OVERLAP_F_B", -1, -1, (b, f))  # backward first: not a valid pair
    assert any("must pair a forward" in p for p in schedule_problems(_replace(s, 0, acts)))


def test_checker_finds_unmatched_and_misordered_comms():
    s = build_schedule("dualpipe", 4, 8)
    send = next(a for a in s.actions[1] if a.kind == "SEND_F")
    no_send = _replace(s, 1, [a for a in s.actions[1] if a != send])
    assert any(f"never sends {send}" in p for p in schedule_problems(no_send))

    recv = next(a for a in s.actions[2] if a.kind == "RECV_F")
    late = [a for a in s.actions[2] if a != recv] + [recv]
    assert any("before its RECV_F" in p for p in schedule_problems(_replace(s, 2, late)))

    # two adjacent receives from one sender (DualPipe: copy A's activations and copy B's
    # gradients over the same link), swapped: the order differs from the sends
    for d, acts in enumerate(s.actions):
        for i in range(len(acts) - 1):
            a, b = acts[i], acts[i + 1]
            if (
                a.is_comm
                and b.is_comm
                and a.kind.startswith("RECV")
                and b.kind.startswith("RECV")
                and recv_source(s, a) == recv_source(s, b)
            ):
                swapped = list(acts)
                swapped[i], swapped[i + 1] = b, a
                problems = schedule_problems(_replace(s, d, swapped))
                assert any("another order" in p for p in problems)
                return
    pytest.fail("expected two adjacent receives from one sender in this schedule")


def test_compute_only_and_full_lists_simulate_the_same():
    for kind in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        full = simulate_uniform(build_schedule(kind, 4, 8), 1, 3, 1, Fraction(7, 2))
        bare = simulate_uniform(
            build_schedule(kind, 4, 8, with_comms=False), 1, 3, 1, Fraction(7, 2)
        )
        assert full.timeline == bare.timeline


def test_dualpipev_equals_torch_schedule_dualpipev():
    """Our DualPipeV is torch's ScheduleDualPipeV action for action, and torch accepts our lists."""
    pytest.importorskip("torch")
    from types import SimpleNamespace

    from torch.distributed.pipelining.schedules import (
        ScheduleDualPipeV,
        _Action,
        _validate_schedule,
    )

    from dsvc.compiler.schedules import from_torch, to_torch

    for devices, n in ((1, 2), (2, 5), (4, 8), (4, 13), (8, 16)):
        ours = build_schedule("dualpipev", 2 * devices, n, with_comms=False)
        fake = SimpleNamespace(pp_group_size=devices, _n_microbatches=n)
        for rank in range(devices):
            theirs = ScheduleDualPipeV._calculate_single_rank_operations(fake, rank)
            assert [str(a) for a in theirs] == [str(a) for a in ours.actions[rank]]
            assert [from_torch(a) for a in theirs] == list(ours.actions[rank])
        torch_lists = {d: [to_torch(a) for a in ours.actions[d]] for d in range(devices)}
        _validate_schedule(torch_lists, devices, 2 * devices, n)
        for acts in torch_lists.values():
            for a in acts:
                assert _Action.from_str(str(a)) == a
    for kind in ("1f1b", "zb1p"):
        s = build_schedule(kind, 4, 8, with_comms=False)
        _validate_schedule({d: [to_torch(a) for a in s.actions[d]] for d in range(4)}, 4, 4, 8)
