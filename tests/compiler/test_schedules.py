"""Schedule generators against the published figures: bubble and activations, exactly.

Times are ints and Fractions, so every comparison is exact (no tolerance needed).
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from dsvc.compiler.schedules import (
    Action,
    Schedule,
    ScheduleConfigError,
    ScheduleFormatError,
    build_schedule,
    formula_conditions,
    parse_action,
    published_activations,
    published_bubble,
    simulate_uniform,
)

PPS = (4, 8, 16)


def microbatch_counts(kind: str, pp: int) -> tuple[int, ...]:
    if kind == "dualpipe":
        return (2 * pp, 2 * pp + 2, 3 * pp)
    return (pp, pp + 3, 3 * pp)


# (f, b, w, fb) inside each formula's stated conditions; fb None = F + B
COSTS = {
    "1f1b": [(1, 2, 1, None), (3, 7, 2, None), (Fraction(1, 2), 5, 0, None)],
    "zb1p": [(1, 2, 1, None), (3, 5, 2, None), (2, 5, 1, None)],
    "dualpipe": [
        (1, 2, 1, None),
        (1, 2, 1, Fraction(5, 2)),
        (2, 3, 1, 4),
        (2, 3, 1, None),
        (3, 4, 1, 4),
    ],
}
COSTS["dualpipev"] = COSTS["dualpipe"]


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", PPS)
def test_bubble_matches_published_formula(kind, pp):
    for n in microbatch_counts(kind, pp):
        schedule = build_schedule(kind, pp, n)
        for f, b, w, fb in COSTS[kind]:
            assert formula_conditions(kind, pp, n, f, b, w, fb) is None
            result = simulate_uniform(schedule, f, b, w, fb)
            expected = published_bubble(kind, pp, f, b, w, fb)
            assert result.max_bubble == expected, (kind, pp, n, f, b, w, fb, result.bubble)
            if kind in ("1f1b", "zb1p") or fb is None:
                # every device idles exactly the published amount
                assert set(result.bubble) == {expected}


@pytest.mark.parametrize("pp", PPS)
def test_overlap_shrinks_dualpipe_makespan(pp):
    """--fb below F + B must shorten the step: the overlapped pairs are on the critical path."""
    schedule = build_schedule("dualpipe", pp, 2 * pp + 4)
    plain = simulate_uniform(schedule, 1, 2, 1)
    overlapped = simulate_uniform(schedule, 1, 2, 1, Fraction(5, 2))
    assert overlapped.makespan < plain.makespan
    assert overlapped.max_bubble == published_bubble("dualpipe", pp, 1, 2, 1, Fraction(5, 2))


def test_1f1b_formula_holds_for_any_costs_and_few_microbatches():
    for pp in (2, 5, 8):
        for n in (1, 2, pp - 1, pp):
            result = simulate_uniform(build_schedule("1f1b", pp, n), 3, 5, 2)
            assert set(result.bubble) == {(pp - 1) * 8}


def test_formula_conditions_name_the_broken_assumption():
    assert "B - W differs from F" in formula_conditions("dualpipe", 8, 16, 1, 3, 1)
    assert "W longer" in formula_conditions("zb1p", 8, 16, 1, 4, 2)
    assert formula_conditions("1f1b", 8, 2, 5, 1, 1) is None
    # outside the conditions the formula really is off, so the note is needed
    result = simulate_uniform(build_schedule("dualpipe", 8, 16), 2, 3, 2)
    assert result.max_bubble != published_bubble("dualpipe", 8, 2, 3, 2)


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp", PPS)
def test_activations_in_flight(kind, pp):
    for n in microbatch_counts(kind, pp):
        result = simulate_uniform(build_schedule(kind, pp, n), 1, 2, 1)
        assert max(result.activations_in_flight) == published_activations(kind, pp)
        if kind == "1f1b":  # device i holds PP - i micro-batches (the DualPipe README)
            assert result.activations_in_flight == tuple(pp - i for i in range(pp))


def test_layouts():
    dp = build_schedule("dualpipe", 8, 16)
    assert dp.num_devices == 8 and dp.num_stages == 16
    assert [dp.device_stages(d) for d in (0, 3, 7)] == [(0, 15), (3, 12), (7, 8)]
    assert [c.stages for c in dp.chains] == [tuple(range(8)), tuple(range(8, 16))]
    assert [c.num_microbatches for c in dp.chains] == [8, 8]
    assert dp.chains[1].microbatch_offset == 8
    # copy B runs from device 7 back to device 0
    assert [dp.stage_device[s] for s in dp.chains[1].stages] == list(range(7, -1, -1))

    v = build_schedule("dualpipev", 8, 8)
    assert v.num_devices == 4 and v.num_stages == 8 and len(v.chains) == 1
    assert [v.device_stages(d) for d in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert build_schedule("1f1b", 4, 4).stage_device == (0, 1, 2, 3)


def test_dualpipe_uses_overlapped_pairs_and_zero_bubble_splits():
    s = build_schedule("dualpipe", 8, 20, with_comms=False)
    kinds = {a.kind for acts in s.actions for a in acts}
    assert kinds == {"F", "B", "I", "W", "OVERLAP_F_B"}
    # the middle devices run their first steady pair apart; the ends overlap it
    first_pair = [
        next(i for i, a in enumerate(acts) if a.kind == "OVERLAP_F_B") for acts in s.actions
    ]
    assert (
        s.actions[3][first_pair[3] - 2].kind == "F" and s.actions[3][first_pair[3] - 1].kind == "B"
    )
    assert s.actions[0][first_pair[0] - 1].kind == "F"
    # each pair overlaps one copy's forward with the other copy's backward
    for acts in s.actions:
        for a in acts:
            if a.kind == "OVERLAP_F_B":
                f, b = a.sub_actions
                assert s.chain_of(f.stage) is not s.chain_of(b.stage)


@pytest.mark.parametrize(
    "kind,pp,n,words",
    [
        ("dualpipe", 5, 10, ["even number of stages", "use PP = 6 or 4"]),
        ("dualpipe", 4, 6, ["at least 2 x PP = 8", "--micro-batches 8"]),
        ("dualpipe", 4, 9, ["even number of micro-batches", "--micro-batches 10"]),
        ("dualpipev", 3, 6, ["even number of stages"]),
        ("dualpipev", 8, 6, ["at least PP = 8"]),
        ("gpipe", 4, 8, ["unknown schedule kind"]),
        ("1f1b", 0, 8, ["at least 1"]),
        ("1f1b", 4, 0, ["at least 1"]),
    ],
)
def test_impossible_requests_explain_themselves(kind, pp, n, words):
    with pytest.raises(ScheduleConfigError) as info:
        build_schedule(kind, pp, n)
    text = str(info.value) + " " + (info.value.hint or "")
    for word in words:
        assert word in text


def test_json_round_trip_and_version():
    s = build_schedule("dualpipe", 4, 8)
    doc = s.to_json()
    assert doc["version"] == 1 and doc["format"] == "dsvc-schedule"
    assert all(isinstance(a, str) for acts in doc["actions"] for a in acts)
    again = Schedule.from_json(doc)
    assert again == s
    with pytest.raises(ScheduleFormatError, match="version 99"):
        Schedule.from_json({**doc, "version": 99})
    with pytest.raises(ScheduleFormatError):
        Schedule.from_json({"format": "something else"})


def test_action_strings_are_torch_format():
    for text in ("2F0", "13B7", "0I3", "5W12", "3SEND_F1", "4RECV_B0", "(3F5;12B1)OVERLAP_F_B"):
        assert str(parse_action(text)) == text
    pair = parse_action("(3F5;12I1)OVERLAP_F_B")
    assert pair.sub_actions == (Action("F", 3, 5), Action("I", 12, 1))
    for bad in ("F0", "2X1", "(3F5)OVERLAP_F_B", "2F"):
        with pytest.raises(ValueError):
            parse_action(bad)
