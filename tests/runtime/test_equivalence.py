"""The partitioned runtime computes the same training as one process.

World size 4 on CPU with gloo: pipeline 2 x data 2, experts parallel over the 2
data ranks (and one run of data 4 with EP 2, so expert-data-parallel 2). One spawned job
runs every scenario (1F1B from the plan's action lists, DualPipeV through torch's own
schedule class and from the schedule generator's action lists, ZB1P's split backward from the generator's lists,
FP8 emulation); each test compares one scenario with
`Trainer.reference` (the unpartitioned model, whole global batch, same seed).
"""

from __future__ import annotations

import pytest
import torch

from dsvc.runtime.launch import spawn
from dsvc.runtime.tiny import tiny_plan
from tests.runtime._workers import reference_steps, train_scenarios
from tests.tolerances import tol

STEPS = 3


def _compiler_actions(kind: str, num_stages: int, num_microbatches: int):
    schedules = pytest.importorskip("dsvc.compiler.schedules")
    sch = schedules.build_schedule(kind, num_stages, num_microbatches)
    return [[str(a) for a in acts] for acts in sch.actions]


def _recomputing(raw: dict, mode: str) -> dict:
    return {**raw, "train": {**raw["train"], "recompute": mode}}


def _scenarios() -> dict[str, dict]:
    out = {
        "1f1b": tiny_plan(schedule="1f1b"),
        "dualpipev_torch": tiny_plan(schedule="dualpipev", with_actions=False),
        "fp8_1f1b": tiny_plan(schedule="1f1b", precision="fp8"),
        # no pipeline, data 4 with EP 2: expert-data-parallel 2 (expert shards over 2 ranks)
        "dp4_ep2": tiny_plan(pp=1, dp=4, ep=2),
        # full recomputation replays each layer, its expert all-to-alls included, in the
        # pipeline's backward (torch's schedule runtime)
        "1f1b_recompute_full": _recomputing(tiny_plan(schedule="1f1b"), "full"),
    }
    try:  # the schedule generator's lists (with sends, receives and OVERLAP_F_B pairs)
        out["dualpipev_plan"] = tiny_plan(
            schedule="dualpipev", actions=_compiler_actions("dualpipev", 4, 4)
        )
        out["zb1p_plan"] = tiny_plan(schedule="zb1p", actions=_compiler_actions("zb1p", 2, 4))
        # the input and weight halves of a split backward each reach replayed activations
        out["zb1p_recompute_selective"] = _recomputing(out["zb1p_plan"], "selective")
    except pytest.skip.Exception:
        pass
    return out


@pytest.fixture(scope="module")
def runs():
    plans = _scenarios()
    results = spawn(train_scenarios, 4, ([(n, p, STEPS) for n, p in plans.items()],), timeout_s=400)
    return plans, results


def _reference(raw: dict, num_microbatches: int = 1):
    return reference_steps(raw, STEPS, num_microbatches)


def _ref_slice(name: str, grad: torch.Tensor, expert_ids: dict) -> torch.Tensor:
    """The reference holds every routed expert; a rank holds the slices `expert_ids`."""
    owner = name.rsplit(".", 1)[0]
    if owner in expert_ids:
        return grad[expert_ids[owner]]
    return grad


def _grad_errors(rank_result: dict, ref_records, step: int) -> dict[str, float]:
    errors = {}
    for name, g in rank_result["records"][step][1].items():
        ref = _ref_slice(name, ref_records[step][1][name], rank_result["expert_ids"])
        errors[name] = float((g - ref).norm() / ref.norm().clamp_min(1e-30))
    return errors


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario", ["1f1b", "dualpipev_torch", "dualpipev_plan", "zb1p_plan", "dp4_ep2",
                 "1f1b_recompute_full", "zb1p_recompute_selective"]
)
def test_fp32_losses_and_gradients_match_one_process(runs, scenario):
    plans, results = runs
    if scenario not in plans:
        pytest.skip("compiler.schedules is not available")
    rtol, _ = tol("fp32_equivalence")
    ref = _reference(plans[scenario])
    for rank, res in enumerate(results):
        mine = res[scenario]
        for step in range(STEPS):
            got, want = mine["records"][step][0], ref[step][0]
            for key in ("loss", "lm_loss", "aux_loss"):
                assert got[key] == pytest.approx(want[key], rel=rtol), (rank, step, key)
            assert got["mtp_loss"] == pytest.approx(want["mtp_loss"], rel=rtol)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=rtol)
            worst = max(_grad_errors(mine, ref, step).items(), key=lambda kv: kv[1])
            assert worst[1] <= rtol, f"rank {rank} step {step}: {worst[0]} off by {worst[1]:.2e}"
    # every parameter of the model is checked on some rank
    names = {n for res in results for n in res[scenario]["records"][0][1]}
    assert names == set(ref[0][1])


@pytest.mark.slow
def test_losses_fall_and_loads_are_reported(runs):
    plans, results = runs
    records = results[0]["1f1b"]["records"]
    assert records[-1][0]["loss"] < records[0][0]["loss"]
    for res in results:
        for metrics, _ in res["1f1b"]["records"]:
            loads = metrics["expert_load"]
            assert loads, "every stage of the tiny model has MoE layers"
            tokens = plans["1f1b"]["train"]["global_batch"] * plans["1f1b"]["train"]["seq_len"]
            for layer, load in loads.items():
                assert sum(load) == tokens * 2, layer  # top_k = 2: every token counted twice
            assert metrics["max_expert_load_ratio"] >= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["1f1b", "dualpipev_torch", "dp4_ep2"])
def test_zero1_shards_optimizer_state(runs, scenario):
    plans, results = runs
    dp = plans[scenario]["mesh"]["data"]
    for res in results:
        r = res[scenario]
        share = r["state_bytes"] / r["unsharded_state_bytes"]
        assert share == pytest.approx(1 / dp, rel=0.05), r["coords"]


@pytest.mark.slow
def test_fp8_emulation_matches_micro_batched_reference(runs):
    """FP8 mode against the one-process model split into the same micro-batches.

    Why that reference: FP8 wgrad tiles run along the token axis, so which tokens
    share a GEMM changes the scales; the whole-batch reference therefore differs
    from *any* micro-batched run by FP8 noise (measured ~4% per tensor), the
    partitioned one included. With the same micro-batches everything but the
    routed experts is identical to fp32 round-off; the routed experts' grouped
    GEMMs see tokens of both data-parallel ranks at once (the dispatch merges them),
    so their token tiles differ: bounded by one e4m3 step (2^-4 relative). Later
    steps: Adam's early updates are sign-like, so that noise moves weights by O(lr)
    and the losses by a few 1e-5 (measured 3.7e-5 at step 2)."""
    plans, results = runs
    raw = plans["fp8_1f1b"]
    n_mb = raw["mesh"]["data"] * raw["schedule"]["num_microbatches"]
    ref = _reference(raw, n_mb)
    loss_rtol, _ = tol("fp8_emulation_loss")
    expert_rtol, _ = tol("fp8_emulation_expert_grad")
    dense_rtol, _ = tol("fp32_equivalence")
    for res in results:
        mine = res["fp8_1f1b"]
        for step in range(STEPS):
            assert mine["records"][step][0]["loss"] == pytest.approx(
                ref[step][0]["loss"], rel=loss_rtol
            )
        for name, err in _grad_errors(mine, ref, 0).items():
            routed = name.rsplit(".", 1)[0] in mine["expert_ids"]
            assert err <= (expert_rtol if routed else dense_rtol), (name, err)
