"""Communication and step formulas: node-limited routing, EP/PP/DP bytes by hand, overlap,
the bubble, MFU, and the expert-load histogram."""

from __future__ import annotations

import functools
import json
import math

import pytest

from dsvc import dsl
from dsvc.compiler.costs.comm import routing_copies
from dsvc.compiler.driver import build_report
from dsvc.compiler.report import expert_load_imbalance
from dsvc.dsl.diagnostics import SpecError

# The cost formulas on the documented even split (no graph, no simulation).
build_report = functools.partial(build_report, even_split=True)
from tests.conftest import EXAMPLES, ROOT
from tests.tolerances import tol

SPECS = ROOT / "tests" / "compiler" / "specs"


def close(a, b, name="report_hand_float"):
    rtol, atol = tol(name)
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def v3_variant(old: str, new: str):
    text = (EXAMPLES / "deepseek_v3.dsv").read_text()
    assert old in text
    return build_report(dsl.loads(text.replace(old, new), str(EXAMPLES / "variant.dsv")))


@pytest.fixture(scope="module")
def v3():
    return build_report(dsl.load(EXAMPLES / "deepseek_v3.dsv"))


def test_routing_copies():
    # V3: 8 experts in 4 of 8 node groups: IB once per remote node, 3.5 of the 4 on average
    assert routing_copies(8, 8, 4, 64, 8, True) == (4, 3.5, 7.0, 7.0)
    # without two-hop forwarding each remote expert is its own IB transfer
    assert routing_copies(8, 8, 4, 64, 8, False)[1] == 7.0
    # without node-limited routing a token reaches 8 (1 - (7/8)^8) = 5.25 nodes on average
    reached, ib, _, _ = routing_copies(8, 1, 1, 64, 8, True)
    assert close(reached, 8 * (1 - (7 / 8) ** 8)) and close(ib, reached * 7 / 8)
    assert routing_copies(6, 1, 1, 8, 8, True) == (1, 0, 6 * 7 / 8, 0)  # one node: NVLink
    assert routing_copies(8, 8, 4, 1, 8, True) == (0, 0, 0, 0)  # no EP: nothing moves


def test_v3_ep_bytes_by_hand(v3):
    per_copy = 2 * 4096 * 7168  # forward + backward, tokens x hidden
    elem = (1 + 4 / 128) + 2  # FP8 dispatch + scales, BF16 combine
    assert close(v3.value("comm.routing.moe.layer_ib_bytes"), per_copy * 3.5 * elem)
    assert close(v3.value("comm.routing.moe.layer_time_s"), per_copy * 3.5 * elem / 40e9)
    assert v3.value("comm.routing.moe.ib_copies_per_token_per_expert") == 7.0


def test_node_limited_routing_halves_v3_network_bytes(v3):
    off = v3_variant("pipeline = 16", "pipeline = 16\n  two_hop = false")
    assert close(off.value("comm.ep_ib_bytes"), 2 * v3.value("comm.ep_ib_bytes"))


def test_pp_and_dp_bytes_by_hand():
    r = build_report(dsl.load(SPECS / "llama3_8b_gqa.dsv"))  # PP 2, DP 32, 8 micro-batches
    d, V = 4096, 128256
    layer = (4096 * 4096 * 2 + 2 * 4096 * 1024) + 3 * 4096 * 14336 + 2 * d
    assert r.value("comm.device") == 1  # the head's stage: more parameters to reduce
    p1 = 16 * layer + d * V + d
    assert close(r.value("comm.dp_bytes"), p1 * (4 + 2) * 31 / 32)  # RS fp32 + AG bf16
    assert r.value("comm.pp_bytes") == 8 * 8192 * d * 2  # gradients back, once per micro-batch
    assert r.value("comm.ep_ib_bytes") == 0 and r.value("comm.ep_time_s") == 0


def test_step_bubble_tokens_and_mfu():
    r = build_report(dsl.load(SPECS / "llama3_8b_gqa.dsv"))
    # 1F1B, no EP: bubble = (PP - 1) (F + B) = one chunk of the slowest stage = compute / M
    assert close(r.value("step.roofline_bubble_s"), r.value("step.compute_s") / 8)
    t = r.value("step.roofline_time_s")
    assert close(t, r.value("step.compute_s") + r.value("step.roofline_bubble_s") + r.value("step.dp_s"))
    tokens = 256 * 8192
    assert r.value("step.tokens_per_step") == tokens
    assert close(r.value("step.roofline_tokens_per_day"), tokens / t * 86400)
    flops = r.value("model.train_flops_per_token")
    assert close(r.value("step.roofline_mfu"), tokens * flops / (t * 64 * 989e12))
    assert r.value("step.roofline_mfu_noncausal") > r.value("step.roofline_mfu")


def test_overlap_off_exposes_the_all_to_all(v3):
    assert v3.value("step.ep_exposed_s") == 0  # hidden behind the other micro-batch
    off = v3_variant("overlap = dual_microbatch", "overlap = none")
    # the busiest device, 0, holds 1 + 3 MoE layers and the MTP module's, 60 micro-batches each
    assert off.value("step.device") == 0
    exposed = 5 * 60 * off.value("comm.routing.moe.layer_time_s")
    assert close(off.value("step.ep_exposed_s"), exposed)
    assert off.value("step.roofline_time_s") > v3.value("step.roofline_time_s") + 0.9 * exposed
    # the DualPipe bubble is (PP/2 - 1)(F&B + B - 3W) = 7 (3F + 2F - 3F) = 14 F
    assert 0 < v3.value("step.roofline_bubble_s") < v3.value("step.compute_s")


# ----------------------------------------------------------------------------- expert load


def test_expert_load_imbalance(tmp_path, v3):
    loads = [1.0] * 256
    loads[0] = 5.0  # rank 0 holds experts 0..3: 8 against 4 elsewhere
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"layers.3.moe": loads, "layers.4.moe": [1.0] * 256}))
    f = (8 / (260 / 64) + 58 * 1.0) / 59  # mean over the 59 MoE layers (MTP's included)
    spec = dsl.load(EXAMPLES / "deepseek_v3.dsv")
    assert close(expert_load_imbalance(spec, str(path), 64), f)
    r = build_report(spec, expert_load=str(path))
    assert close(r.value("comm.expert_load_imbalance"), f)
    assert close(r.value("comm.ep_ib_bytes"), f * v3.value("comm.ep_ib_bytes"))
    assert r.value("memory.max_gpu_bytes") > v3.value("memory.max_gpu_bytes")


@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "3 entries"), ("{nope", "not valid JSON"), ('{"a": [1]}', "not an expert load"),
    ("[[1], [2]]", "2 histograms"),
])
def test_bad_expert_load_files(tmp_path, content, message):
    spec = dsl.load(EXAMPLES / "deepseek_v3.dsv")
    path = tmp_path / "load.json"
    path.write_text(content)
    with pytest.raises(SpecError, match=message):
        expert_load_imbalance(spec, str(path), 64)
    with pytest.raises(SpecError, match="cannot read"):
        expert_load_imbalance(spec, str(tmp_path / "missing.json"), 64)
