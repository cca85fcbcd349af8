"""The `schedule` pass: action lists from a partitioned graph, overlap on and off, the
chunk order of a pair, and a property over real specs: every schedule passes the check."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsvc import dsl
from dsvc.compiler.driver import run_until
from dsvc.compiler.passes.schedule import pair_chunk_order, schedule, split_overlaps, stage_units
from dsvc.compiler.schedules import Schedule, check_schedule, schedule_problems
from dsvc.compiler.schedules.overlap_order import hidden_comm_chunks
from dsvc.runtime.actions import OVERLAP_F_B
from tests.compiler.test_simulate_specs import make_spec, min_microbatches
from tests.conftest import EXAMPLES


@functools.cache
def _graph(path: str):
    return run_until(dsl.load(EXAMPLES / path), "insert_comm")


def _compute_parts(sched: Schedule, device: int) -> list[str]:
    return sorted(str(p) for a in sched.compute_actions(device) for p in a.parts())


def test_tiny_gets_1f1b_over_its_partition():
    g = schedule(_graph("tiny.dsv"))
    s = g.schedule
    spec = g.spec
    assert g.passes[-1] == "schedule"
    assert (s.kind, s.num_devices, s.num_stages) == ("1f1b", 2, 2)
    assert s.num_microbatches == spec.micro_batches == 4
    assert s.stage_device == tuple(st.device for st in g.partition.stages)
    check_schedule(s)
    # sends and receives are in the lists (the plan form the runtime executes)
    assert "0SEND_F0" in [str(a) for a in s.actions[0]]
    assert "1RECV_F0" in [str(a) for a in s.actions[1]]
    assert Schedule.from_json(s.to_json()) == s


def test_schedule_pass_does_not_change_the_graph_it_is_given():
    g = _graph("tiny.dsv")
    before = (g.passes, len(g), getattr(g, "schedule", None))
    out = schedule(g)
    assert (g.passes, len(g), getattr(g, "schedule", None)) == before
    assert out is not g and out.schedule is not None and len(out) == len(g)


def test_deepseek_v3_dualpipe_with_overlapped_pairs():
    g = schedule(_graph("deepseek_v3.dsv"))
    s = g.schedule
    assert (s.kind, s.pp, s.num_devices, s.num_stages, s.num_microbatches) == (
        "dualpipe", 16, 16, 32, 120)
    assert [c.num_microbatches for c in s.chains] == [60, 60]
    pairs = [a for acts in s.actions for a in acts if a.kind == OVERLAP_F_B]
    assert len(pairs) > 16 * 40  # the steady state is overlapped F&B pairs on every device
    check_schedule(s)


def test_overlap_none_splits_every_pair_in_place():
    spec = dsl.load(EXAMPLES / "deepseek_v3.dsv")
    on = schedule(_graph("deepseek_v3.dsv")).schedule
    off_spec = dataclasses.replace(
        spec, parallel=dataclasses.replace(spec.parallel, overlap="none"))
    off = schedule(run_until(off_spec, "insert_comm")).schedule
    assert not any(a.kind == OVERLAP_F_B for acts in off.actions for a in acts)
    check_schedule(off)
    for d in range(on.num_devices):
        assert _compute_parts(on, d) == _compute_parts(off, d)
        # the same order, pairs flattened forward-first
        assert [str(p) for a in on.compute_actions(d) for p in a.parts()] == [
            str(a) for a in off.compute_actions(d)]
    assert split_overlaps(off) == off


def test_one_f_one_b_with_overlap_requested_leaves_a_note():
    g = schedule(run_until(make_spec("1f1b", 2, overlap="dual_microbatch"), "insert_comm"))
    assert any("no effect under 1f1b" in n for n in g.notes)
    g = schedule(run_until(make_spec("1f1b", 2, overlap="none"), "insert_comm"))
    assert not any("no effect" in n for n in g.notes)


def test_stage_units_name_layers_in_order_with_their_kind():
    units = stage_units(_graph("deepseek_v3.dsv"))
    assert units[0] == [("embed", "dense"), ("L0", "dense"), ("L1", "dense"), ("L2", "dense"),
                        ("L3", "moe")]
    assert units[15][0] == ("head", "dense")
    assert [k for _, k in units[15][1:]] == ["moe"]  # the MTP module's MoE block
    assert sum(len(u) for u in units.values()) == 1 + 61 + 1 + 1


def test_pair_chunk_order_hides_each_all_to_all_under_the_other_micro_batch():
    g = schedule(_graph("deepseek_v3.dsv"))
    pair = next(a for a in g.schedule.actions[5] if a.kind == OVERLAP_F_B)
    steps = pair_chunk_order(g, pair)
    starts = [c for op, c in steps if op == "start"]
    # dispatch + combine of every MoE layer on each side of the pair (forward and backward)
    moe_layers = sum(1 for p in pair.parts() for st_ in g.partition.stages
                     if st_.index == p.stage
                     for i in st_.layers if g.spec.model.layers[i].ffn == "moe")
    assert moe_layers > 0 and len(starts) == 2 * moe_layers
    hidden = hidden_comm_chunks(steps)
    assert len(hidden) >= len(starts) - 2  # all but the tail ends run under the other's compute


_KINDS = st.sampled_from(["1f1b", "zb1p", "dualpipe", "dualpipev"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=_KINDS, pp=st.sampled_from([1, 2, 4]), extra=st.integers(0, 5),
       overlap=st.sampled_from(["none", "dual_microbatch"]), mtp=st.integers(0, 1))
def test_schedules_from_real_specs_pass_the_check(kind, pp, extra, overlap, mtp):
    if kind in ("dualpipe", "dualpipev") and pp == 1:
        pp = 2
    mb = max(1, min_microbatches(kind, pp)) + (2 * extra if kind == "dualpipe" else extra)
    g = schedule(run_until(make_spec(kind, pp, microbatches=mb, overlap=overlap, mtp=mtp),
                           "insert_comm"))
    s = g.schedule
    assert schedule_problems(s) == []
    assert s.num_microbatches == mb
    # every (stage, micro-batch) of every chain has exactly one forward
    forwards = sorted((p.stage, p.microbatch) for acts in s.actions for a in acts
                      for p in a.parts() if p.kind == "F")
    expected = sorted((st_, m) for c in s.chains for st_ in c.stages
                      for m in range(c.num_microbatches))
    assert forwards == expected
    if overlap == "none":
        assert not any(a.kind == OVERLAP_F_B for acts in s.actions for a in acts)


def test_an_impossible_request_is_a_spec_error_not_a_crash():
    from dsvc.compiler.passes.schedule import build_pipeline_schedule
    from dsvc.dsl.diagnostics import SpecError

    g = _graph("deepseek_v3.dsv")
    spec = g.spec
    odd = dataclasses.replace(spec, train=dataclasses.replace(spec.train, global_batch=128))
    with pytest.raises(SpecError, match="micro-batches"):
        build_pipeline_schedule(odd, g.partition)
