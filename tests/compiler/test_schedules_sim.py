"""The general simulator (per-stage costs, P2P latency, exposed all-to-all), the dual
micro-batch chunk order, and the trace / picture outputs."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from dsvc.compiler.schedules import (
    Action,
    ScheduleDeadlock,
    TableCosts,
    build_schedule,
    chrome_trace,
    draw_timeline,
    overlap_order,
    parse_action,
    simulate,
    simulate_uniform,
)
from dsvc.compiler.schedules.overlap_order import (
    backward_chunks,
    forward_chunks,
    hidden_comm_chunks,
)


def _table(pp: int, f, b, w=0):
    times = {}
    for s in range(pp):
        times.update({(s, "F"): f, (s, "B"): b, (s, "I"): b - w, (s, "W"): w})
    return times


def test_p2p_latency_and_exposed_comm_plug_in():
    s = build_schedule("1f1b", 2, 1)  # F0 -> F1 -> B1 -> B0, one hop each way
    base = simulate(s, TableCosts(_table(2, 1, 2)))
    assert base.makespan == 6
    half = Fraction(1, 2)
    latency = simulate(s, TableCosts(_table(2, 1, 2), default_p2p=half))
    assert latency.makespan == 6 + 2 * half
    assert latency.timeline[1][0].start == 1 + half  # F1 waits for the activation to arrive
    exposed = simulate(
        s, TableCosts(_table(2, 1, 2), p2p={(0, 1): half}, exposed={(1, "F"): Fraction(1, 4)})
    )
    assert exposed.makespan == 6 + half + Fraction(1, 4)
    assert exposed.exposed_comm == (0, Fraction(1, 4))
    assert exposed.time_unit == "s"


def test_per_stage_costs_move_the_critical_path():
    times = _table(4, 1, 2)
    times[(2, "F")] = 3  # a slow stage throttles the whole pipeline to its pace
    result = simulate(build_schedule("1f1b", 4, 8), TableCosts(times))
    uniform = simulate_uniform(build_schedule("1f1b", 4, 8), 1, 2, 0)
    assert result.makespan > uniform.makespan
    assert result.busy[2] == 8 * (3 + 2)
    assert result.bubble[2] == min(result.bubble)  # the bottleneck device idles least


def test_pair_times_and_activation_sizes():
    s = build_schedule("dualpipev", 4, 4)
    pairs = {(f, b): 2 for f in range(4) for b in range(4)}
    result = simulate(s, TableCosts(_table(4, 1, 2, 1), pair_times=pairs, activation_bytes={0: 10}))
    overlapped = [t for row in result.timeline for t in row if t.action.kind == "OVERLAP_F_B"]
    assert overlapped and all(t.end - t.start == 2 for t in overlapped)
    # device 0 holds stage 0 (10 bytes per micro-batch) and stage 3 (1 by default)
    assert result.peak_activation[0] > result.activations_in_flight[0]


def test_deadlock_is_reported_not_hung():
    s = build_schedule("1f1b", 2, 2, with_comms=False)
    acts = list(s.actions)
    acts[0] = (Action("B", 0, 0), *acts[0])  # a backward before any forward: never runnable
    with pytest.raises(ScheduleDeadlock, match="device 0 at 0B0"):
        simulate_uniform(s.with_actions(acts), 1, 2, 1)


def _stream(steps, action):
    return [(op, c) for op, c in steps if c.action == action]


def test_overlap_order_hides_every_all_to_all():
    pair = parse_action("(3F5;12B1)OVERLAP_F_B")
    f, b = pair.sub_actions
    steps = overlap_order(pair, 3, 3)
    comms = [c for op, c in steps if op == "start"]
    assert len(comms) == 12 and hidden_comm_chunks(steps) == comms
    # each half's chunks run in their own order, each exactly once
    for half, chunks in ((f, forward_chunks(f, 3)), (b, backward_chunks(b, 3))):
        mine = [c for op, c in steps if c.action == str(half) and op in ("start", "compute")]
        assert mine == chunks
    # issue 8's criterion: every forward compute chunk runs while a backward all-to-all is open
    open_comm = None
    for op, c in steps:
        if op == "start" and c.action == str(b):
            open_comm = c
        elif op == "wait" and c == open_comm:
            open_comm = None
        elif op == "compute" and c.action == str(f):
            assert open_comm is not None, c
    # a half never computes while its own all-to-all is in flight
    for half in (f, b):
        in_flight = False
        for op, _c in _stream(steps, str(half)):
            assert not (in_flight and op == "compute")
            in_flight = {"start": True, "wait": False}.get(op, in_flight)


def test_overlap_order_splits_weight_grads_and_skips_dense_comm():
    full = overlap_order(parse_action("(0F0;5B0)OVERLAP_F_B"), ["dense", "moe"], ["moe"])
    split = overlap_order(parse_action("(0F0;5I0)OVERLAP_F_B"), ["dense", "moe"], ["moe"])
    assert any(c.grad == "weight" for _, c in full)
    assert not any(c.grad == "weight" for _, c in split)  # left for the later W action
    dense = forward_chunks(Action("F", 0, 0), ["dense"])
    assert [c.part for c in dense] == ["attention", "mlp"]
    with pytest.raises(ValueError):
        overlap_order(Action("F", 0, 0), 1, 1)
    with pytest.raises(ValueError):
        overlap_order(parse_action("(0F0;5B0)OVERLAP_F_B"), ["moe", "ssm"], 1)


def test_chrome_trace_mirrors_the_timeline():
    result = simulate_uniform(build_schedule("dualpipe", 4, 8), 1, 2, 1, Fraction(5, 2))
    trace = json.loads(json.dumps(chrome_trace(result)))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    computes = [t for row in result.timeline for t in row]
    assert len(spans) == len(computes)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert names == {f"device {d} (stages {d},{7 - d})" for d in range(4)}
    last = max(spans, key=lambda e: e["ts"] + e["dur"])
    assert last["ts"] + last["dur"] == float(result.makespan)
    assert {e["cat"] for e in spans} >= {"forward", "overlap_f_b", "backward_weight"}


def test_draw_timeline_writes_a_png(tmp_path):
    result = simulate_uniform(build_schedule("dualpipe", 4, 8), 1, 2, 1)
    path = tmp_path / "dp.png"
    draw_timeline(result, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_every_micro_batch_with_room_is_labelled():
    """Blocks narrower than a two-digit label but taller than wide (DeepSeek-V3 under 1F1B:
    120 micro-batches on one row) get it along the block instead of losing it."""
    from dsvc.compiler.schedules.draw import MIN_LABEL_POINTS, label_size

    size, rotation = label_size(6.0, 25.0, 3)  # "117" in a sliver 6 pt wide, 25 pt tall
    assert size >= MIN_LABEL_POINTS and rotation == 90
    size, rotation = label_size(40.0, 25.0, 2)  # a wide block: across it, as before
    assert size >= MIN_LABEL_POINTS and rotation == 0
    assert label_size(1.0, 2.0, 3)[0] < MIN_LABEL_POINTS  # no room: no label


def test_a_crowded_picture_keeps_its_labels(monkeypatch):
    """DeepSeek-V3's 1F1B picture (16 ranks x 120 micro-batches: 3,840 blocks) labels every
    block: the numbers are glyph outlines in one collection, not a Text each."""
    import io

    from dsvc.compiler.schedules import draw

    seen = []
    real = draw._label_collection
    monkeypatch.setattr(draw, "_label_collection",
                        lambda labels, ax, fig: seen.append(labels) or real(labels, ax, fig))
    result = simulate_uniform(build_schedule("1f1b", 16, 120), 1, 2, 1)
    draw_timeline(result, io.BytesIO())
    assert len(seen[0]) == 2 * 16 * 120  # a forward and a backward per micro-batch and rank
    assert {text for _, _, text, *_ in seen[0]} == {str(m) for m in range(120)}


def test_exposed_communication_is_drawn(tmp_path):
    """The all-to-all the compute stream waited for is red over the end of its block (the
    tiny example's lone forwards and backwards wait for every all-to-all)."""
    import matplotlib.image

    from dsvc import dsl
    from dsvc.compiler.driver import simulate_step
    from tests.conftest import EXAMPLES

    result = simulate_step(dsl.load(EXAMPLES / "tiny.dsv"))
    assert sum(result.exposed_comm_s) > 0
    path = tmp_path / "tiny.png"
    draw_timeline(result.sim, path)
    pixels = matplotlib.image.imread(path)
    red = (pixels[..., 0] > 0.85) & (pixels[..., 1] < 0.55) & (pixels[..., 2] < 0.5)
    assert red.sum() > 200
    plain = simulate_uniform(build_schedule("1f1b", 2, 4), 1, 2, 1)  # nothing exposed
    draw_timeline(plain, tmp_path / "plain.png")
    pixels = matplotlib.image.imread(tmp_path / "plain.png")
    red = (pixels[..., 0] > 0.85) & (pixels[..., 1] < 0.55) & (pixels[..., 2] < 0.5)
    assert red.sum() == 0
