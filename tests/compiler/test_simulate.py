"""The simulate pass's pieces: the roofline per op, link classes, chunks played against
shared links, P2P and collective times, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from dsvc.compiler.driver import run_until
from dsvc.compiler.ir import Op, tensor
from dsvc.compiler.passes.schedule import schedule
from dsvc.compiler.passes.simulate import _ring_time
from dsvc.compiler.passes.simulate_costs import (
    IB,
    NVLINK,
    Rates,
    Topology,
    op_times,
    stage_profiles,
)
from dsvc.compiler.passes.simulate_play import ActionCosts, Played, TopologyCosts, play
from dsvc.compiler.schedules import parse_action
from tests.compiler.test_simulate_specs import make_spec
from tests.tolerances import tol

RTOL, ATOL = tol("simulate_float_sum")


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)


BW = {IB: 40e9, NVLINK: 160e9}


# ----------------------------------------------------------------------------- play


def test_a_lone_transfer_takes_bytes_over_bandwidth_plus_latency():
    p = play([("start", "a", {IB: 4e9}, 1e-3), ("wait", "a")], BW)
    assert close(p.duration, 0.1 + 1e-3) and p.compute == 0 and close(p.exposed, 0.101)
    assert close(p.busy(IB), 0.1)


def test_two_hop_transfer_moves_at_its_slower_link():
    p = play([("start", "a", {IB: 4e9, NVLINK: 8e9}, 0.0), ("wait", "a")], BW)
    assert close(p.duration, max(4e9 / 40e9, 8e9 / 160e9))


def test_transfers_sharing_a_link_split_it():
    both = play([("start", "a", {IB: 4e9}, 0.0), ("start", "b", {IB: 4e9}, 0.0),
                 ("wait", "a"), ("wait", "b")], BW)
    assert close(both.duration, 0.2)  # each at half rate: both end at 2 x 0.1
    # a short flow beside a long one: 0.05 s of work at half rate ends at 0.1; the long
    # one then runs alone: 0.1 - 0.05 of its work left after 0.1 s -> ends at 0.15
    mixed = play([("start", "a", {IB: 4e9}, 0.0), ("start", "b", {IB: 2e9}, 0.0),
                  ("wait", "b")], BW)
    assert close(mixed.duration, 0.1)
    mixed = play([("start", "a", {IB: 4e9}, 0.0), ("start", "b", {IB: 2e9}, 0.0),
                  ("wait", "a")], BW)
    assert close(mixed.duration, 0.15)
    # different links do not share
    apart = play([("start", "a", {IB: 4e9}, 0.0), ("start", "b", {NVLINK: 16e9}, 0.0),
                  ("wait", "a"), ("wait", "b")], BW)
    assert close(apart.duration, 0.1)


def test_compute_hides_a_transfer_in_flight():
    hidden = play([("start", "a", {IB: 4e9}, 0.0), ("compute", 0.3), ("wait", "a")], BW)
    assert close(hidden.duration, 0.3) and close(hidden.exposed, 0.0)
    partly = play([("start", "a", {IB: 4e9}, 0.0), ("compute", 0.04), ("wait", "a"),
                   ("compute", 0.01)], BW)
    assert close(partly.duration, 0.11) and close(partly.exposed, 0.06)


def test_a_transfer_started_after_compute_begins_then():
    p = play([("compute", 0.5), ("start", "a", {IB: 4e9}, 0.0), ("wait", "a")], BW)
    assert close(p.duration, 0.6)


# ----------------------------------------------------------------------------- op roofline


def _linear(flops: int, dtype: str, m=4096, k=7168, n=2048, params=0) -> Op:
    return Op(name="x", kind="linear", block="layer", layer=0,
              inputs=(tensor(dtype, m, k),), outputs=(tensor("bf16", m, n),), dtype=dtype,
              flops_fwd=flops, flops_dgrad=flops, flops_wgrad=flops, param_bytes=params)


def test_gemm_time_is_flops_over_peak_times_efficiency():
    rates = Rates(fp8=1979e12 * 0.5, bf16=989e12 * 0.7, hbm=3.35e12 * 0.9)
    flops = 2 * 4096 * 7168 * 2048
    f, d, w = op_times(_linear(flops, "fp8_e4m3"), 4096, rates)
    assert close(f, flops / (1979e12 * 0.5)) and f == d == w
    f16, _, _ = op_times(_linear(flops, "bf16"), 4096, rates)
    assert close(f16, flops / (989e12 * 0.7))
    f32, _, _ = op_times(_linear(flops, "fp32"), 4096, rates)
    assert close(f32, 2 * f16)  # TF32: half the BF16 rate


def test_a_gemm_that_reads_more_than_it_computes_is_memory_bound():
    rates = Rates(fp8=1e15, bf16=5e14, hbm=1e12)
    op = _linear(10, "bf16", m=4, k=8, n=8, params=10**9)
    f, _, _ = op_times(op, 4, rates)
    assert close(f, (10**9 + 4 * 8 * 2 + 4 * 8 * 2) / 1e12)


def test_elementwise_ops_cost_their_traffic_and_twice_that_backward():
    rates = Rates(fp8=1e15, bf16=5e14, hbm=2e12)
    norm = Op(name="n", kind="norm", block="layer", layer=0, inputs=(tensor("bf16", 4096, 7168),),
              outputs=(tensor("bf16", 4096, 7168),), dtype="fp32")
    f, d, w = op_times(norm, 4096, rates)
    traffic = 2 * 4096 * 7168 * 2
    assert close(f, traffic / 2e12) and close(d, 2 * f) and w == 0


def test_rates_come_from_the_spec_efficiency_factors():
    gpu = make_spec("1f1b", 2).cluster.gpu
    assert Rates.of(gpu) == Rates(gpu.fp8_flops * gpu.gemm_efficiency_fp8,
                                  gpu.bf16_flops * gpu.gemm_efficiency_bf16,
                                  gpu.hbm * gpu.memory_efficiency)


# ----------------------------------------------------------------------------- topology


def test_link_classes_follow_the_nvlink_domain():
    spec = make_spec("1f1b", 2, data=4, ep=4, gpus_per_node=4)
    topo = Topology(spec)
    assert topo.link(topo.group("data", 0, 4)) == NVLINK  # ranks 0..3: one node
    assert topo.link([topo.rank(0), topo.rank(1)]) == IB  # pipeline neighbours: nodes apart
    assert topo.bandwidth == {NVLINK: 160e9, IB: 40e9}
    assert topo.group("expert_data", 1, 2) == [4, 8]  # stride EP=4 inside pp rank 1's replicas


def test_ring_collectives():
    spec = make_spec("1f1b", 2, data=4, ep=2, gpus_per_node=2)
    topo = Topology(spec)
    members = topo.group("data", 0, 4)  # ranks 0..3 over two nodes: the network
    lat = topo.latency(members)
    assert close(_ring_time("reduce_scatter", 8e9, members, topo), 3 / 4 * 8e9 / 40e9 + 3 * lat)
    assert close(_ring_time("all_reduce", 8e9, members, topo),
                 2 * (3 / 4 * 8e9 / 40e9 + 3 * lat))
    assert _ring_time("all_gather", 8e9, [0], topo) == 0


# ----------------------------------------------------------------------------- actions


@pytest.fixture(scope="module")
def dualpipe_costs():
    spec = make_spec("dualpipe", 2, microbatches=8, layers=8, gpus_per_node=1)  # EP over IB
    g = schedule(run_until(spec, "insert_comm"))
    topo, rates = Topology(spec), Rates.of(spec.cluster.gpu)
    profiles = stage_profiles(g, topo, rates)
    stage_part = {s.index: s.part for s in g.partition.stages}
    return g, topo, profiles, ActionCosts(profiles, stage_part, topo.bandwidth)


def test_stage_profiles_conserve_the_graph_costs(dualpipe_costs):
    g, topo, profiles, _ = dualpipe_costs
    rates = Rates.of(g.spec.cluster.gpu)
    from dsvc.compiler.passes.simulate_costs import roofline_times
    from dsvc.compiler.passes.simulate_program import ProgramBlocks

    # the roofline of every op as the code that runs it moves its bytes: a program block's
    # memory-bound ops through their fusion groups, fewer bytes than one by one
    blocks = ProgramBlocks(g)
    ops = [op for op in g.ops() if op.stage is not None and op.kind not in (
        "dispatch", "combine", "send", "recv", "collective")]
    total = sum(sum(roofline_times(op, blocks, g.tokens, rates, topo.ep)) for op in ops)
    prof = sum(p.forward_s + p.backward_input_s + p.backward_weight_s for p in profiles.values())
    assert close(prof, total)
    assert any(blocks.runs(op) for op in ops)
    assert total < sum(sum(op_times(op, g.tokens, rates, topo.ep)) for op in ops)
    ib = sum(g.num(op.attr("ib_bytes")) for op in g.ops() if op.kind in ("dispatch", "combine"))
    assert close(sum(p.comm_bytes.get(IB, 0) for p in profiles.values()), 2 * ib)  # fwd + bwd


def test_an_overlapped_pair_hides_communication_the_halves_expose(dualpipe_costs):
    _, _, _, costs = dualpipe_costs
    f, b = parse_action("0F3"), parse_action("3B1")
    alone_f, alone_b = costs.single(f), costs.single(b)
    pair = costs.pair(f, b)
    assert close(pair.compute, alone_f.compute + alone_b.compute)
    assert alone_f.exposed > 0 and alone_b.exposed > 0  # a lone chunk waits for each all-to-all
    assert pair.exposed < alone_f.exposed + alone_b.exposed
    assert pair.duration < alone_f.duration + alone_b.duration
    # never faster than the link allows or the GPU computes
    assert pair.duration >= max(pair.compute, pair.busy(IB)) - ATOL


def test_weight_pass_is_compute_only_and_i_plus_w_is_b(dualpipe_costs):
    _, _, _, costs = dualpipe_costs
    b, i, w = (costs.single(parse_action(x)) for x in ("1B0", "1I0", "1W0"))
    assert w.exposed == 0 and w.busy(IB) == 0
    assert close(i.compute + w.compute, b.compute)
    assert close(i.exposed, b.exposed)  # the backward's all-to-alls belong to the input part


def test_p2p_time_is_latency_plus_bytes_over_shared_bandwidth(dualpipe_costs):
    g, topo, profiles, actions = dualpipe_costs
    sched = g.schedule
    boundary = {(0, 1): 1e6}
    p2p = {(0, 1): (IB, 3e-6), (1, 0): (IB, 3e-6)}
    costs = TopologyCosts(actions, sched, profiles, p2p, boundary, topo.bandwidth)
    u = costs.utilisation[0][IB]
    assert 0 < u <= 1
    t = costs.p2p_time(parse_action("0SEND_F2"), 0, 1)
    assert close(t, 3e-6 + 1e6 / (40e9 * (1 - u / 2)))
    assert close(costs.p2p_time(parse_action("1SEND_B2"), 1, 0), t)  # same boundary backwards


def test_played_exposed_is_never_negative():
    assert Played(1.0, 2.0).exposed == 0.0
