"""plan.json: loading, validation with every problem named, the documented keys."""

from __future__ import annotations

import copy
import json
import pathlib
import re

import pytest

from dsvc.runtime.plan import PLAN_VERSION, PlanError, load_plan, parse_plan
from dsvc.runtime.tiny import one_f_one_b_actions, tiny_plan

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_tiny_plans_are_valid(schedule, precision):
    plan = parse_plan(tiny_plan(schedule=schedule, precision=precision))
    assert plan.version == PLAN_VERSION
    assert plan.num_stages == (4 if schedule == "dualpipev" else 2)
    assert [s.index for s in plan.stages_of_rank(0)] == ([0, 3] if schedule == "dualpipev" else [0])
    assert plan.model.mtp_block().ffn == "moe"


def test_load_plan_from_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(tiny_plan()))
    assert load_plan(path).mesh.world_size == 4


def test_bad_json_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"version": 1,,}')
    with pytest.raises(PlanError, match=r"cannot read the plan: .*plan.json: not valid "
                                        r"JSON at line 1, column \d+"):
        load_plan(bad)
    with pytest.raises(PlanError, match="cannot read the plan"):
        load_plan(tmp_path / "missing.json")


def test_every_problem_is_reported_with_its_key():
    raw = tiny_plan()
    raw["model"]["ffn"]["moe"]["top_kk"] = 3
    raw["mesh"]["world_size"] = 5
    raw["train"]["global_batch"] = 7
    raw["experts"]["moe"]["per_rank"] = [[0, 1, 2], [4, 5, 6, 7]]
    raw["schedule"]["actions"][0][0] = "0X1"
    with pytest.raises(PlanError) as info:
        parse_plan(raw)
    text = str(info.value)
    assert "model.ffn.moe.top_kk: unknown key (did you mean 'top_k'?)" in text
    assert "mesh.world_size: pipeline 2 x data 2 = 4, not 5" in text
    assert "train.global_batch: global_batch 7 is not divisible by data 2 x micro_batch 1" in text
    assert "experts.moe.per_rank: must place experts 0..7 exactly once" in text
    assert "schedule.actions[0][0]: not an action string: '0X1'" in text
    assert len(info.value.problems) >= 5


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.update(version=2), "this runtime reads plan version 1, got 2"),
        (lambda p: p["stages"][1]["layers"].append(0), "must hold layers 0..3 in order"),
        (lambda p: p["stages"][0].update(head=True), "the head belongs to its last stage only"),
        (lambda p: p["model"]["ffn"]["moe"].update(top_groups=5), "top_groups 5 exceeds groups 4"),
        (lambda p: p["model"]["layers"][1].update(ffn="moe2"), "no ffn named 'moe2'"),
        (lambda p: p["schedule"].update(num_microbatches=3), "= 4, not 3"),
        (lambda p: p["train"].update(seq_len=4096), "seq_len 4096 exceeds the model's maximum sequence 64"),
        (lambda p: p["precision"].update(linear="fp16"), "expected one of fp8_e4m3, bf16, fp32"),
        (lambda p: p["mesh"].update(expert=3), "expert parallelism 3 is not inside data parallelism 2"),
        (lambda p: p["model"]["attention"]["mla"].pop("v_dim"), "model.attention.mla.v_dim: missing"),
        (lambda p: p["model"]["attention"]["mla"].update(head_dim=8), "head_dim: unknown key for kind 'mla'"),
        (lambda p: p["train"]["optimizer"].update(lr="1e-3"), "train.optimizer.lr: expected a number, got '1e-3'"),
        (lambda p: p["stages"][0].update(layers=[0, "1"]), "stages[0].layers[1]: expected an integer"),
        (lambda p: p["precision"].update(kept={"norm": "fp8"}), "precision.kept.norm: expected one of fp32, bf16"),
    ],
)
def test_single_mistakes(edit, message):
    raw = copy.deepcopy(tiny_plan())
    edit(raw)
    with pytest.raises(PlanError, match=re.escape(message)):
        parse_plan(raw)


def test_one_f_one_b_orders_are_complete():
    acts = one_f_one_b_actions(4, 6)
    for rank, order in enumerate(acts):
        assert sorted(order) == sorted(
            [f"{rank}F{m}" for m in range(6)] + [f"{rank}B{m}" for m in range(6)]
        )
        assert order.index(f"{rank}B0") == 4 - int(
            rank
        )  # warm-up forwards, then the first backward
