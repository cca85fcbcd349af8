"""MoE routing on one process: group limits, gate weights, balancing, the aux loss."""

from __future__ import annotations

import dataclasses

import torch

from dsvc.runtime.ep import ExpertComm
from dsvc.runtime.moe import MoE, Router, sequence_aux_loss
from dsvc.runtime.plan import ExpertPlacement, Ffn, parse_plan
from dsvc.runtime.tiny import tiny_plan
from tests.tolerances import tol

MOE = Ffn(kind="moe", intermediate=16, routed=16, shared=1, top_k=4, shared_intermediate=16,
          score="sigmoid", groups=4, top_groups=2, route_scale=2.5, bias_update_rate=0.01)  # fmt: skip


def _router(ffn=MOE, dim=32, seed=0):
    torch.manual_seed(seed)
    r = Router(dim, ffn, torch.float32)
    torch.nn.init.normal_(r.weight, std=0.3)
    return r


def test_no_token_reaches_more_than_top_groups_groups():
    r = _router()
    r.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, 16))  # a skew the groups must contain
    _, idx, _ = r(torch.randn(500, 32))
    groups_hit = (idx // (16 // 4)).sort(-1).values
    per_token = [(g.unique().numel()) for g in groups_hit]
    assert max(per_token) <= 2
    assert min(per_token) >= 1 and (torch.tensor(per_token) == 2).any()


def test_groups_ranked_by_sum_of_top2_biased_scores():
    r = _router()
    r.e_score_correction_bias.copy_(torch.randn(16) * 0.1)
    x = torch.randn(64, 32)
    _, idx, scores = r(x)
    biased = (scores + r.e_score_correction_bias).view(64, 4, 4)
    best_groups = biased.topk(2, -1).values.sum(-1).topk(2, -1).indices.sort(-1).values
    for t in range(64):
        assert set((idx[t] // 4).tolist()) <= set(best_groups[t].tolist())


def test_gate_weights_are_unbiased_scores_renormalised_and_scaled():
    r = _router()
    x = torch.randn(50, 32)
    _, _, scores = r(x)
    r.e_score_correction_bias.copy_(torch.randn(16))  # changes the choice, not the weights' formula
    w, idx, _ = r(x)
    chosen = scores.gather(1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True) * 2.5)
    torch.testing.assert_close(w.sum(-1), torch.full((50,), 2.5))
    soft = _router(dataclasses.replace(MOE, score="softmax", groups=1, top_groups=1))
    w, idx, scores = soft(x)
    torch.testing.assert_close(scores.sum(-1), torch.ones(50))
    torch.testing.assert_close(w, scores.gather(1, idx) * 2.5)  # softmax: no renormalisation


def _imbalance(load: torch.Tensor) -> float:
    return float(load.max()) / float(load.float().mean())


def test_bias_update_moves_a_skewed_router_toward_balance():
    plan = parse_plan(tiny_plan())
    ffn = dataclasses.replace(MOE, groups=1, top_groups=1)
    comm = ExpertComm(ExpertPlacement(per_rank=(tuple(range(16)),), group_of_expert=()))
    moe = MoE(plan.model, ffn, plan.precision, comm)
    torch.manual_seed(0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        moe.gate.weight[:4] += 0.02  # four experts favoured by every (positive) token below
    x = torch.randn(1, 512, 64).abs()
    history = []
    with torch.no_grad():
        for _ in range(60):
            moe(x)
            load = moe.take_load()
            history.append(_imbalance(load))
            moe.update_bias(load)
    assert history[0] > 2.0, "the synthetic router starts skewed"
    assert history[-1] < 0.5 * history[0]
    assert sum(history[-10:]) / 10 < 1.5


def test_sequence_aux_loss_formula_and_gradient():
    torch.manual_seed(0)
    b, s, e, k = 2, 6, 8, 2
    ffn = Ffn(kind="moe", intermediate=4, routed=e, top_k=k, score="sigmoid", seq_aux_loss=0.1)
    scores = torch.rand(b, s, e, requires_grad=True)
    idx = torch.rand(b, s, e).topk(k, -1).indices
    got = sequence_aux_loss(scores, idx, ffn)
    want = 0.0
    for i in range(b):
        hits = torch.zeros(e)
        for t in range(s):
            hits[idx[i, t]] += 1
        f = hits * e / (k * s)
        p = (scores[i] / scores[i].sum(-1, keepdim=True)).mean(0)
        want = want + 0.1 * (f * p).sum() / b
    rtol, atol = tol("runtime_layer")
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_aux_loss_trains_the_router_through_the_block_output():
    plan = parse_plan(tiny_plan())
    ffn = dataclasses.replace(plan.model.ffn["moe"], seq_aux_loss=1.0)
    comm = ExpertComm(ExpertPlacement(per_rank=(tuple(range(8)),), group_of_expert=()))
    moe = MoE(plan.model, ffn, plan.precision, comm)
    torch.manual_seed(0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 8, 64)
    moe(x).sum().mul(0).backward()  # the main loss contributes nothing ...
    assert moe.gate.weight.grad.abs().sum() > 0  # ... the aux loss still reaches the router
    assert len(moe.aux_values) == 1 and float(moe.aux_values[0]) > 0


def test_moe_equals_the_per_expert_loop_of_the_reference_model():
    plan = parse_plan(tiny_plan())
    ffn = plan.model.ffn["moe"]
    comm = ExpertComm(ExpertPlacement(per_rank=(tuple(range(8)),), group_of_expert=()))
    moe = MoE(plan.model, ffn, plan.precision, comm)
    torch.manual_seed(0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y = moe(x).view(-1, 64)
        xt = x.view(-1, 64)
        w, idx, _ = moe.gate(xt)
        want = moe.shared_experts(xt)
        ex = moe.experts
        for e in range(8):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            h = torch.nn.functional.silu(xt[rows] @ ex.gate_proj[e].t()) * (
                xt[rows] @ ex.up_proj[e].t()
            )
            want[rows] += (h @ ex.down_proj[e].t()) * w[rows, slot, None]
    rtol, atol = tol("runtime_layer")
    torch.testing.assert_close(y, want, rtol=rtol, atol=atol)
    assert int(moe.take_load().sum()) == 15 * ffn.top_k
