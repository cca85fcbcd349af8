"""The plan.json emitter: its output loads in the runtime and says what the passes decided."""

from __future__ import annotations

import json

import pytest

from dsvc import dsl
from dsvc.compiler.driver import build_plan, run_until
from dsvc.runtime.plan import dump_plan, parse_plan
from tests.compiler.test_passes_props import load, spec_text
from tests.conftest import EXAMPLES


def _roundtrip(plan: dict):
    return parse_plan(json.loads(json.dumps(plan)), source="emitted")


@pytest.mark.parametrize("name", ["tiny", "deepseek_v3", "deepseek_v2_lite"])
def test_examples_emit_loadable_plans(name):
    spec = dsl.load(EXAMPLES / f"{name}.dsv")
    graph = run_until(spec, "emit_plan")
    plan = _roundtrip(dump_plan(graph.plan))
    assert plan == graph.plan  # what the compiler built is what the runtime reads
    assert [(s.index, s.rank, s.copy, s.layers) for s in plan.stages] == [
        (s.index, s.device, s.copy, s.layers) for s in sorted(graph.partition.stages, key=lambda s: s.index)]
    assert plan.schedule.num_microbatches == spec.micro_batches


def test_v3_plan_mesh_stages_and_experts():
    plan = _roundtrip(build_plan(dsl.load(EXAMPLES / "deepseek_v3.dsv")))
    assert (plan.mesh.pipeline, plan.mesh.data, plan.mesh.expert) == (16, 128, 64)
    assert (plan.mesh.nodes, plan.mesh.gpus_per_node) == (256, 8)
    assert len(plan.stages) == 32 and [s.index for s in plan.stages_of_rank(0)] == [0, 31]
    moe = plan.experts["moe"]
    assert len(moe.per_rank) == 64 and {len(r) for r in moe.per_rank} == {4}
    assert moe.two_hop and moe.group_of_expert[255] == 7
    assert plan.precision.linear.format == "fp8_e4m3" and plan.precision.kept["head"] == "bf16"
    assert plan.schedule.kind == "dualpipe" and plan.schedule.overlap


def test_kept_mtp_projection_becomes_a_linear_override():
    keep = "bf16 = [embedding, head, router, attention_core, mtp_projection], fp32 = [norm]"
    plan = _roundtrip(build_plan(load(spec_text(keep=keep))))
    assert plan.precision.linear_for("eh_proj").format == "bf16"
    assert plan.precision.linear_for("q_a_proj").format == "fp8_e4m3"


def test_emission_is_deterministic():
    spec = dsl.load(EXAMPLES / "tiny.dsv")
    a = json.dumps(build_plan(spec), sort_keys=True)
    b = json.dumps(build_plan(dsl.load(EXAMPLES / "tiny.dsv")), sort_keys=True)
    assert a == b


def test_unsupported_precision_is_a_spec_error():
    with pytest.raises(dsl.SpecError, match="the runtime runs fp32 or bf16"):
        build_plan(load(spec_text(default="fp16", linear="bf16")))


def test_v2_lite_routing_is_a_plan_key_not_a_note():
    plan = build_plan(dsl.load(EXAMPLES / "deepseek_v2_lite.dsv"))
    assert plan["model"]["ffn"]["moe"]["renormalize"] is False
    assert not any("renormalize" in note for note in plan.get("comment", []))
