"""The graph passes: precision, partition, expert placement, communication, purity."""

from __future__ import annotations

import json

import pytest

from dsvc import dsl
from dsvc.compiler.driver import GRAPH_PASSES, PASSES, run_until
from dsvc.compiler.ir import T
from dsvc.compiler.passes.partition_stages import balance
from dsvc.compiler.passes.place_experts import place_layer, rank_loads
from dsvc.compiler.printer import format_text, imbalance
from tests.compiler.test_passes_props import load, spec_text
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def v3():
    return run_until(dsl.load(EXAMPLES / "deepseek_v3.dsv"))


@pytest.fixture(scope="module")
def tiny_spec():
    return dsl.load(EXAMPLES / "tiny.dsv")


# ----------------------------------------------------------------------------- DeepSeek-V3 plan


def test_v3_dualpipe_stages_both_views(v3):
    pipe = v3.partition
    assert (pipe.ranks, pipe.parts, pipe.copies, len(pipe.stages)) == (16, 16, 2, 32)
    for copy in "AB":
        chain = sorted((s for s in pipe.stages if s.copy == copy), key=lambda s: s.index)
        assert [s.part for s in chain] == list(range(16))
        assert [i for s in chain for i in s.layers] == list(range(61))
        assert chain[0].embedding and chain[-1].head and chain[-1].mtp
    by_device = {d: sorted((s.copy, s.part) for s in pipe.stages if s.device == d) for d in range(16)}
    assert by_device[0] == [("A", 0), ("B", 15)]  # stage 0 and stage 15 of a copy: one device
    assert all(by_device[d] == [("A", d), ("B", 15 - d)] for d in range(16))
    assert {s.index for s in pipe.stages if s.device == 3} == {3, 2 * 16 - 1 - 3}


def test_v3_every_device_within_10_percent_of_mean(v3):
    imb = imbalance(v3)
    assert imb["device"] <= 1.10 and imb["device_min"] >= 0.90
    # Per stage it cannot be: the head + MTP alone are worth ~4.9 layers of ~4.1 per stage.
    costs = v3.partition.part_cost
    layer = costs[1] / len(v3.partition.stages[1].layers)
    assert 4.5 < costs[15] / layer - len(v3.partition.stages[15].layers) < 5.5


def test_v3_four_experts_per_ep_rank_and_groups_on_nodes(v3):
    places = v3.placements()
    assert sorted(places) == list(range(3, 62))
    place = places[10]
    assert len(place.per_rank) == 64 and all(len(ids) == 4 for ids in place.per_rank)
    assert sorted(e for ids in place.per_rank for e in ids) == list(range(256))
    nodes_of_group = {}
    for e, g in enumerate(place.group_of_expert):
        nodes_of_group.setdefault(g, set()).add(place.node_of_rank[place.home_rank[e]])
    assert nodes_of_group == {g: {g} for g in range(8)}  # group g lives on node g only


def test_v3_dispatch_and_combine_bytes(v3):
    d = v3.op("L10.moe.experts.dispatch")
    row = 7168 * 1 + 7168 // 128 * 4  # e4m3 payload + fp32 scales per 1x128 tile
    assert d.attr("row_bytes") == row
    assert d.attr("nodes_per_token") == 4  # node-limited: top_groups
    assert v3.num(d.attr("ib_bytes")) == pytest.approx(4096 * 4 * 7 / 8 * row)
    assert v3.num(d.attr("nvlink_bytes")) == pytest.approx(4096 * 8 * 7 / 8 * row)
    assert d.outputs[0].shape == (8 * T, 7168) and d.outputs[0].dtype == "fp8_e4m3"
    c = v3.op("L10.moe.experts.combine")
    assert c.attr("row_bytes") == 7168 * 2 and c.outputs[0].dtype == "bf16"
    assert v3.producer("L10.ffn_add", 1) == ("L10.moe.experts.combine", 0)


def test_v3_pipeline_and_data_parallel_comm(v3):
    sends = [op for op in v3.ops() if op.kind == "send"]
    assert len(sends) == 15  # one hidden state per stage boundary
    assert all(v3.num(op.attr("bytes")) == 4096 * 7168 * 2 for op in sends)
    s0 = {op.name: op for op in v3.ops() if op.kind == "collective" and op.stage == 0}
    assert s0["s0.dense.reduce_scatter"].attr("group_size") == 128
    assert s0["s0.experts.reduce_scatter"].attr("group_size") == 2  # expert-data-parallel
    assert s0["s0.copies.all_reduce"].attr("group_size") == 2  # DualPipe's two copies


# ----------------------------------------------------------------------------- precision


def test_fp8_linears_get_quantize_ops_and_tiles(v3):
    q_down = v3.op("L5.attn.q_down")
    assert q_down.dtype == "fp8_e4m3"
    src, _ = v3.producer("L5.attn.q_down", 0)
    assert v3.op(src).kind == "quantize" and v3.op(src).outputs[1].shape == (T, 7168 // 128)
    assert v3.producer("L5.attn.kv_down", 0)[0] == src  # one quantize shared by both
    gemms = {g[0]: g for g in q_down.attr("fp8")["gemms"]}
    assert gemms["fwd"][2] == (1, 128) and gemms["fwd"][4] == (128, 128)
    assert gemms["wgrad"][2] == (128, 1)  # activations re-tiled along tokens
    for kept in ("head", "L5.moe.router", "L5.attn.core"):
        op = v3.op(kept)
        assert op.dtype == "bf16" and v3.op(v3.producer(kept, 0)[0]).kind != "quantize"
    assert v3.op("L5.attn_norm").dtype == "fp32"
    assert v3.op("L5.moe.experts.quant").attr("purpose") == "dispatch"


def test_precision_conversions_follow_the_policy():
    g = run_until(load(spec_text(linear="bf16")), "assign_precision")
    assert not [op for op in g.ops() if op.kind == "quantize"]
    assert g.op("L1.attn.q_down").dtype == "bf16"
    g32 = run_until(load(spec_text(default="fp32", linear="fp32")), "assign_precision")
    # Kept-bf16 ops (head, router, attention core) in an fp32 model: casts in and out.
    into_head = g32.op(g32.producer("head", 0)[0])
    assert into_head.kind == "cast" and into_head.outputs[0].dtype == "bf16"
    assert g32.op(g32.producer("L1.attn.core", 1)[0]).kind == "cast"
    out_of_core = g32.op(g32.producer("L1.attn.o_proj", 0)[0])
    assert out_of_core.kind == "cast" and out_of_core.outputs[0].dtype == "fp32"
    assert g32.op("L1.attn.o_proj").dtype == "fp32"


def test_the_router_and_head_compute_outside_fp8_when_not_kept(tmp_path):
    """The runtime runs the router and the output head in their kept dtype, `default` when
    the policy does not keep them (runtime/plan.py KEPT_COMPONENTS), whatever the linear
    format: the IR says so too, and the generated program renders (an FP8 router made it
    fail with an internal error)."""
    from dsvc.compiler.codegen.stage_program import render_program

    text = (EXAMPLES / "tiny.dsv").read_text()
    kept = "keep { bf16 = [embedding, head, router, attention_core], fp32 = [norm] }"
    assert kept in text
    path = EXAMPLES / "tiny.dsv"
    spec = dsl.loads(text.replace(kept, "keep { bf16 = [embedding], fp32 = [norm] }"),
                     str(path))
    g = run_until(spec, "fuse")
    assert g.op("L1.moe.router").dtype == "bf16" and g.op("head").dtype == "bf16"
    assert g.op("L1.attn.q_down").dtype == "fp8_e4m3"
    src = render_program(g, spec_file="t.dsv", span=None, passes=g.passes)
    assert "p.router.to(torch.bfloat16)" in src


# ----------------------------------------------------------------------------- partition


def test_balance_is_optimal_on_simple_cases():
    assert balance([1.0] * 8, 0.0, 0.0, 4, paired=False) == [2, 2, 2, 2]
    counts = balance([1.0] * 8, 0.0, 2.0, 4, paired=False)  # a tail worth two layers
    assert counts[3] == 1 and sorted(counts[:3]) == [2, 2, 3]
    # Paired: part 0 shares a device with part 3, so the heavy tail pairs with the head.
    counts = balance([1.0] * 10, 0.0, 3.0, 4, paired=True)
    loads = [counts[0] + counts[3] + 3.0, counts[1] + counts[2]]
    assert sum(counts) == 10 and max(loads) == 7.0 and counts[3] <= 1


def test_layers_per_stage_overrides_the_balancer():
    g = run_until(load(spec_text(extra_parallel=", layers_per_stage = [1, 3]")), "partition_stages")
    assert g.partition.balanced_by == "layers_per_stage"
    assert [s.layers for s in g.partition.stages] == [(0,), (1, 2, 3)]
    assert g.op("L1.attn.q_down").stage == 1 and g.op("mtp0.head").stage == 1


def test_dualpipev_places_stages_i_and_2r_minus_1_minus_i():
    g = run_until(load(spec_text(schedule="dualpipev")), "partition_stages")
    pipe = g.partition
    assert (pipe.ranks, pipe.parts, pipe.copies) == (2, 4, 1)
    assert {s.index: s.device for s in pipe.stages} == {0: 0, 1: 1, 2: 1, 3: 0}
    assert g.op("embed").stage == 0 and g.op("head").stage == 3


# ----------------------------------------------------------------------------- expert placement


def test_replicas_follow_the_load_histogram(tmp_path):
    load = [1.0] * 64
    load[5], load[40] = 40.0, 20.0  # two hot experts, on nodes 0 and 5
    place = place_layer(64, 8, 16, 2, redundant=16, load=tuple(load))
    assert all(len(ids) == 5 for ids in place.per_rank)
    hot = place.ranks_of(5)
    # Copies spread over nodes first (8 nodes here), then fill ranks of covered nodes.
    assert len(hot) > 1 and len({place.node_of_rank[r] for r in hot}) == min(len(hot), 8)
    assert len(place.ranks_of(5)) > len(place.ranks_of(40)) > 1
    base = place_layer(64, 8, 16, 2)
    before = [sum(load[e] for e in ids) for ids in base.per_rank]
    after = rank_loads(place)
    assert max(after) / (sum(after) / 16) < max(before) / (sum(before) / 16) / 2


def test_expert_load_file_end_to_end(tmp_path, tiny_spec):
    path = tmp_path / "load.json"
    path.write_text(json.dumps({"format": "dsvc-expert-load", "version": 1,
                                "layers": {"1": [9, 1, 1, 1, 1, 1, 1, 1]},
                                "default": [1] * 8}))
    g = run_until(tiny_spec, "place_experts", expert_load=str(path))
    place = g.placements()[1]
    assert all(len(ids) == 5 for ids in place.per_rank)  # one redundant slot per EP rank
    assert 0 in place.per_rank[1]  # the hot expert 0 also on the other node
    assert any("redundant_experts unset" in n for n in g.notes)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "dsvc-expert-load", "version": 2}', "version 2, which this dsvc does not read"),
    ('{"format": "dsvc-expert-load", "version": 1, "layers": {"1": [1, 2]}}', "2 entries; it must list 8"),
    ('[[1, 1, 1, 1, 1, 1, 1, 1]]', "lists 1 histograms; the model has 4 MoE layers"),
    ('{"hello": 1}', "is not an expert load histogram"),
    # layer 0 is tiny's dense layer: a file from another model
    ('{"layers.0.mlp": [1, 1, 1, 1, 1, 1, 1, 1]}', "layer 0, which is not a MoE layer"),
])
def test_bad_expert_load_files_are_spec_errors(tmp_path, tiny_spec, content, message):
    path = tmp_path / "load.json"
    path.write_text(content)
    with pytest.raises(dsl.SpecError, match=message) as info:
        run_until(tiny_spec, "place_experts", expert_load=str(path))
    if "not a MoE layer" in message:
        assert "its MoE layers, MTP modules last: 1-4" in info.value.diagnostics[0].message


# ----------------------------------------------------------------------------- purity


def test_passes_do_not_mutate_their_input(tiny_spec):
    graph, opts = None, {"expert_load": None}
    for name, runner, _ in PASSES:
        if name not in GRAPH_PASSES:
            break
        before = format_text(graph) if graph is not None else None
        edges = sorted(graph.edges()) if graph is not None else None
        out = runner(tiny_spec, graph, opts)
        if graph is not None:
            assert format_text(graph) == before and sorted(graph.edges()) == edges, name
            assert out.g is not graph.g
        graph = out


def test_run_until_rejects_unknown_pass(tiny_spec):
    with pytest.raises(ValueError, match="unknown pass 'shard'"):
        run_until(tiny_spec, "shard")
