"""DualPipe (two model copies, fed from both ends) computes the same training as one process.

World size 4 on CPU with gloo, FP32 mode: pipeline 2 x data 2, EP 2. Rank i holds
copy A's stage i and copy B's stage 2+(1-i); the schedule generator's action lists
(`compiler.schedules`, sends, receives, I/W splits and OVERLAP_F_B pairs) run through
`runtime.dualpipe.ActionExecutor`. One spawned job runs every scenario for 3 steps:
DualPipe with the overlap on and off, DualPipe with a head+MTP-only stage (no
layers, as DeepSeek-V3's last stage), and DualPipeV with the overlap (its V turn
handed over locally). Each is compared with `Trainer.reference`; the two copies
must stay bitwise identical after every step.
"""

from __future__ import annotations

import pytest
import torch

from dsvc.runtime.launch import spawn
from dsvc.runtime.overlap import forward_chunks_under_comm
from dsvc.runtime.plan import parse_plan, split_layers
from dsvc.runtime.tiny import tiny_plan
from tests.runtime._workers import reference_steps, train_scenarios
from tests.tolerances import tol

schedules = pytest.importorskip("dsvc.compiler.schedules")

STEPS = 3
PP, DP, N = 2, 2, 4
DUALPIPE = ("dualpipe", "dualpipe_plain", "dualpipe_head_only")


def _actions(kind: str, pp: int, n: int) -> list[list[str]]:
    sch = schedules.build_schedule(kind, pp, n)
    return [[str(a) for a in acts] for acts in sch.actions]


def dualpipe_plan(overlap: bool = True, chunks: list[list[int]] | None = None) -> dict:
    """tiny_plan's model on DualPipe: copy A's stage k on rank k, copy B's on rank PP-1-k."""
    raw = tiny_plan(pp=PP, dp=DP, ep=2, num_microbatches=N, with_actions=False)
    chunks = chunks or [list(c) for c in split_layers(len(raw["model"]["layers"]), PP)]
    stages = []
    for copy, base in (("A", 0), ("B", PP)):
        for k in range(PP):
            stages.append({
                "index": base + k, "rank": k if copy == "A" else PP - 1 - k, "copy": copy,
                "layers": chunks[k], "embedding": k == 0, "head": k == PP - 1, "mtp": k == PP - 1,
            })  # fmt: skip
    raw["stages"] = stages
    raw["schedule"] = {"kind": "dualpipe", "num_microbatches": N, "overlap": overlap,
                       "actions": _actions("dualpipe", PP, N)}  # fmt: skip
    return raw


def _scenarios() -> dict[str, dict]:
    dualpipev = tiny_plan(schedule="dualpipev", actions=_actions("dualpipev", 2 * PP, N))
    dualpipev["schedule"]["overlap"] = True
    return {
        "dualpipe": dualpipe_plan(overlap=True),
        "dualpipe_plain": dualpipe_plan(overlap=False),
        "dualpipe_head_only": dualpipe_plan(chunks=[[0, 1, 2, 3], []]),
        "dualpipev_overlap": dualpipev,
    }


@pytest.fixture(scope="module")
def runs():
    plans = _scenarios()
    jobs = [(n, p, STEPS) for n, p in plans.items()]
    return plans, spawn(train_scenarios, 4, (jobs, True), timeout_s=400)


def _reference(raw: dict):
    return reference_steps(raw, STEPS)


def _rank(pp_rank: int, dp_rank: int) -> int:
    return pp_rank * DP + dp_rank


@pytest.mark.slow
@pytest.mark.parametrize("scenario", [*DUALPIPE, "dualpipev_overlap"])
def test_fp32_losses_and_gradients_match_one_process(runs, scenario):
    plans, results = runs
    rtol, _ = tol("fp32_equivalence")
    ref = _reference(plans[scenario])
    for rank, res in enumerate(results):
        mine = res[scenario]
        for step in range(STEPS):
            got, want = mine["records"][step][0], ref[step][0]
            for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=rtol), (rank, step, key)
            assert got["mtp_loss"] == pytest.approx(want["mtp_loss"], rel=rtol)
            for name, g in mine["records"][step][1].items():
                r = ref[step][1][name]
                owner = name.rsplit(".", 1)[0]
                if owner in mine["expert_ids"]:
                    r = r[mine["expert_ids"][owner]]
                err = float((g - r).norm() / r.norm().clamp_min(1e-30))
                assert err <= rtol, f"rank {rank} step {step}: {name} off by {err:.2e}"
    names = {n for res in results for n in res[scenario]["records"][0][1]}
    assert names == set(ref[0][1])  # every parameter checked on some rank


@pytest.mark.slow
@pytest.mark.parametrize("scenario", DUALPIPE)
def test_the_two_copies_stay_bitwise_identical(runs, scenario):
    _, results = runs
    for dp in range(DP):
        for i in range(PP // 2):
            a, b = results[_rank(i, dp)][scenario], results[_rank(PP - 1 - i, dp)][scenario]
            for step in range(STEPS):
                wa, wb = a["weights"][step], b["weights"][step]
                assert wa.keys() == wb.keys()
                assert any(n.endswith("e_score_correction_bias") for n in wa)
                for name in wa:
                    assert torch.equal(wa[name], wb[name]), (dp, i, step, name)
            # and training moved them (so equality is not of untouched initial weights)
            first, last = a["weights"][0], a["weights"][-1]
            assert not all(torch.equal(first[n], last[n]) for n in first)


@pytest.mark.slow
def test_overlap_changes_no_bit_of_training(runs):
    _, results = runs
    for res in results:
        on, off = res["dualpipe"], res["dualpipe_plain"]
        for step in range(STEPS):
            assert on["records"][step][0]["loss"] == off["records"][step][0]["loss"]
            for name, w in on["weights"][step].items():
                assert torch.equal(w, off["weights"][step][name]), (step, name)


@pytest.mark.slow
def test_pairs_overlap_only_when_asked(runs):
    _, results = runs
    for rank, res in enumerate(results):
        pairs_on = res["dualpipe"]["overlap_logs"][-1]
        pairs_off = res["dualpipe_plain"]["overlap_logs"][-1]
        assert len(pairs_on) == len(pairs_off) == 1  # one F&B pair per device at PP 2, N 4
        (pair, log), (_, log_off) = pairs_on[0], pairs_off[0]
        f_action = pair[1 : pair.index(";")]
        # F runs layers 2, 3, head and MTP; B (the other copy's first stage) has one MoE
        # layer: F's first two chunks run under B's combine and dispatch, the rest after
        hidden = forward_chunks_under_comm(log, f_action)
        assert [(c, comm.split(".")[1]) for c, comm in hidden] == [
            ("L2.attention", "combine"),
            ("L2.mlp", "dispatch"),
        ], rank
        assert forward_chunks_under_comm(log_off, f_action) == []


@pytest.mark.slow
def test_expert_loads_count_both_copies(runs):
    plans, results = runs
    raw = plans["dualpipe"]
    tokens = raw["train"]["global_batch"] * raw["train"]["seq_len"]
    for res in results:
        for metrics, _ in res["dualpipe"]["records"]:
            assert metrics["expert_load"]
            for layer, load in metrics["expert_load"].items():
                assert sum(load) == tokens * 2, layer  # top_k = 2, both copies' halves summed


def test_a_dualpipe_plan_the_executor_cannot_keep_equal_is_refused():
    from dsvc.runtime.dualpipe import check_dualpipe_layout

    raw = dualpipe_plan(chunks=[[0, 1], [2, 3]])
    raw["stages"][2]["layers"], raw["stages"][3]["layers"] = [0, 1, 2], [3]
    with pytest.raises(ValueError, match="copy B's stage 2 must hold what copy A's stage 0"):
        check_dualpipe_layout(parse_plan(raw))
