"""Dual micro-batch overlap (runtime/overlap.py): the F&B pair really interleaves, bit-exactly.

Two gloo processes (EP 2) run one overlapped pair directly: the forward of
micro-batch X through a stage of two MoE layers and the backward of micro-batch
Y through a stage of three, once in the plain order (F, then B) and once
overlapped (the halves alternating at their asynchronous all-to-alls). The event
logs must show every forward compute chunk issued while one of the backward's
all-to-alls is in flight (and none in the plain order), in the chunk order the
compiler's `overlap_order` gives; the numbers must not change at all. The same
holds with the two-hop dispatch (four processes, EP 4 on two nodes of 2).
"""

from __future__ import annotations

import pytest
import torch

from dsvc.runtime.launch import spawn
from dsvc.runtime.overlap import forward_chunks_under_comm
from dsvc.runtime.tiny import tiny_plan
from tests.runtime._workers import overlapped_pair

F_LAYERS, B_LAYERS = [1, 2], [3, 4, 5]  # layer 0 of the tiny model is the dense one


@pytest.fixture(scope="module")
def pair():
    raw = tiny_plan(pp=1, dp=2, ep=2, num_layers=6)
    return spawn(overlapped_pair, 2, (raw, F_LAYERS, B_LAYERS), timeout_s=180)


def _forward_computes(log):
    return [label for op, action, label in log if op == "compute" and action == "1F1"]


@pytest.mark.slow
def test_overlap_changes_no_bit(pair):
    for res in pair:
        plain, over = res["plain"], res["overlap"]
        assert torch.equal(plain["y_f"], over["y_f"])
        assert torch.equal(plain["dx_b"], over["dx_b"])
        assert plain["grads"].keys() == over["grads"].keys() and plain["grads"]
        for name, g in plain["grads"].items():
            assert torch.equal(g, over["grads"][name]), name


@pytest.mark.slow
def test_every_forward_chunk_runs_under_a_backward_all_to_all(pair):
    for res in pair:
        log = res["overlap"]["log"]
        chunks = _forward_computes(log)
        # L1 attention, L1 experts, L2 attention, L2 experts, then the residual tail
        assert chunks == ["L1.attention", "L1.mlp", "L2.attention", "L2.mlp", "tail"]
        hidden = forward_chunks_under_comm(log, "1F1")
        assert [label for label, _ in hidden] == chunks
        kinds = {comm.rsplit(".", 1)[1] for _, comm in hidden}
        assert kinds == {"dispatch", "combine"}  # both kinds of the backward's exchanges
        # and the backward computes under the forward's exchanges too
        b_hidden = forward_chunks_under_comm(log, "2B0")
        assert [label for label, _ in b_hidden] == [
            "L5.mlp",
            "L5.attention",
            "L4.mlp",
            "L4.attention",
        ]


@pytest.mark.slow
def test_plain_order_does_not_interleave(pair):
    for res in pair:
        log = res["plain"]["log"]
        assert forward_chunks_under_comm(log, "1F1") == []
        actions = [action for _, action, _ in log]
        first_b = actions.index("2B0")
        assert set(actions[:first_b]) == {"1F1"} and set(actions[first_b:]) == {"2B0"}
        starts = [i for i, (op, _, _) in enumerate(log) if op == "start"]
        assert starts and all(log[i + 1][0] == "wait" for i in starts)  # waited at once


@pytest.mark.slow
def test_order_is_the_compilers_overlap_order(pair):
    schedules = pytest.importorskip("dsvc.compiler.schedules")
    pair_action = schedules.parse_action("(1F1;2B0)OVERLAP_F_B")
    expected = []
    for op, chunk in schedules.overlap_order(pair_action, len(F_LAYERS), len(B_LAYERS)):
        label = f"L{chunk.layer}.{chunk.part}"
        if (op, chunk.action, label) != (expected[-1] if expected else None):  # .input/.weight
            expected.append((op, chunk.action, label))
    local = {
        "1F1": {g: i for i, g in enumerate(F_LAYERS)},
        "2B0": {g: i for i, g in enumerate(B_LAYERS)},
    }
    for res in pair:
        got = []
        for op, action, label in res["overlap"]["log"]:
            if label == "tail":  # the residual after the last combine / the head gradient
                continue
            unit, part = label.split(".", 1)
            got.append((op, action, f"L{local[action][int(unit[1:])]}.{part}"))
        assert got == expected


@pytest.mark.slow
def test_two_hop_dispatch_overlaps_too():
    """EP 4 on two nodes of 2: each dispatch is three node-crossing exchanges and one
    inside the node (each a hand-over point), each combine two."""
    raw = tiny_plan(pp=1, dp=4, ep=4, num_layers=4, two_hop=True, gpus_per_node=2)
    results = spawn(overlapped_pair, 4, (raw, [1], [2, 3]), timeout_s=180)
    for res in results:
        plain, over = res["plain"], res["overlap"]
        assert torch.equal(plain["y_f"], over["y_f"]) and torch.equal(plain["dx_b"], over["dx_b"])
        for name, g in plain["grads"].items():
            assert torch.equal(g, over["grads"][name]), name
        log = over["log"]
        starts = [label for op, action, label in log if op == "start" and action == "1F1"]
        assert starts == ["L1.dispatch"] * 4 + ["L1.combine"] * 2
        chunks = _forward_computes(log)
        assert [c for c, _ in forward_chunks_under_comm(log, "1F1")] == chunks
        assert forward_chunks_under_comm(plain["log"], "1F1") == []
