"""ZeRO-1 AdamW on one process: the AdamW arithmetic, clipping, LR schedules."""

from __future__ import annotations

import math

import pytest
import torch

from dsvc.runtime.mesh import ProcessMesh
from dsvc.runtime.optim import ZeroAdamW, lr_at
from dsvc.runtime.plan import LrSchedule, Optimizer
from tests.tolerances import tol

CFG = Optimizer(kind="adamw", lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=0.0)


def _params(seed=0):
    torch.manual_seed(seed)
    return [("a.weight", torch.nn.Parameter(torch.randn(5, 7))), ("a.norm", torch.nn.Parameter(torch.randn(7))),
            ("b.weight", torch.nn.Parameter(torch.randn(3, 5)))]  # fmt: skip


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [
        torch.randn(5, 7, generator=gen),
        torch.randn(7, generator=gen),
        torch.randn(3, 5, generator=gen),
    ]


def test_matches_torch_adamw_with_decay_on_matrices_only():
    ours, theirs = _params(), _params()
    opt = ZeroAdamW(ours, [], CFG, torch.float32, ProcessMesh())
    ref = torch.optim.AdamW(
        [{"params": [theirs[0][1], theirs[2][1]]}, {"params": [theirs[1][1]], "weight_decay": 0.0}],
        lr=CFG.lr, betas=CFG.betas, eps=CFG.eps, weight_decay=CFG.weight_decay,
    )  # fmt: skip
    rtol, atol = tol("fp32_equivalence")
    for step in range(4):
        for (_, p), (_, q), g in zip(ours, theirs, _grads(step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step(CFG.lr)
        ref.step()
        for (_, p), (_, q) in zip(ours, theirs):
            torch.testing.assert_close(p.data, q.data, rtol=rtol, atol=atol)


def test_global_norm_and_clipping():
    clip = Optimizer(**{**CFG.__dict__, "grad_clip": 0.5, "weight_decay": 0.0})
    ours, theirs = _params(), _params()
    opt = ZeroAdamW(ours, [], clip, torch.float32, ProcessMesh())
    ref = torch.optim.AdamW(
        [q for _, q in theirs], lr=CFG.lr, betas=CFG.betas, eps=CFG.eps, weight_decay=0.0
    )
    rtol, atol = tol("fp32_equivalence")
    for step in range(3):  # clipping changes the gradients' relative weight across steps
        grads = _grads(step)
        for (_, p), (_, q), g in zip(ours, theirs, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        norm = opt.step(CFG.lr)
        want = torch.nn.utils.clip_grad_norm_([q for _, q in theirs], 0.5)
        ref.step()
        assert norm == pytest.approx(float(want), rel=1e-6) and norm > 0.5
        for (_, p), (_, q) in zip(ours, theirs):
            torch.testing.assert_close(p.data, q.data, rtol=rtol, atol=atol)


def test_a_copy_another_rank_counts_is_left_out_of_the_norm():
    """skip_norm (a shared parameter's second holder): its gradient still updates it, but
    not the global norm; the shard keeps that as ranges, and no per-element mask."""
    params = _params()
    opt = ZeroAdamW(params, [], CFG, torch.float32, ProcessMesh(), skip_norm={"a.norm"})
    grads = _grads(0)
    for (_, p), g in zip(params, grads):
        p.grad = g.clone()
    before = params[1][1].detach().clone()
    norm = opt.step(CFG.lr)
    want = math.sqrt(sum(float(g.double().pow(2).sum()) for g in (grads[0], grads[2])))
    assert norm == pytest.approx(want, rel=1e-6)  # an fp32 dot product
    assert not torch.equal(params[1][1].detach(), before)  # updated all the same
    # name order a.norm, a.weight, b.weight: decay on the matrices only, norm skips a.norm
    assert opt.dense.counted_spans == [(7, 57)] and opt.dense.decay_spans == [(7, 57)]
    assert not hasattr(opt.dense, "decay") and not hasattr(opt.dense, "counted")


def test_bf16_moments_and_state_bytes():
    params = _params()
    opt = ZeroAdamW(params[:2], params[2:], CFG, torch.bfloat16, ProcessMesh())
    numel = sum(p.numel() for _, p in params)
    assert opt.state_bytes() == numel * (2 + 2)  # the master shard is the parameters
    assert opt.unsharded_state_bytes() == opt.state_bytes()
    for (_, p), g in zip(params, _grads(0)):
        p.grad = g
    opt.step(1e-3)
    assert opt.dense.exp_avg.dtype == torch.bfloat16 and opt.dense.exp_avg.abs().sum() > 0


def test_parameters_and_gradients_live_in_one_buffer_each():
    """Each parameter and its gradient are views of the shard's two flat buffers, the
    master shard is the parameters' own storage, backward accumulates into the buffer
    and the step updates the parameters in place (no whole-set copy anywhere)."""
    params = _params()
    values = [p.detach().clone() for _, p in params]
    opt = ZeroAdamW(params, [], CFG, torch.float32, ProcessMesh())
    s = opt.dense
    base, end = s.params.data_ptr(), s.params.data_ptr() + s.params.nbytes
    for (_, p), v in zip(params, values):
        assert base <= p.data_ptr() < end and torch.equal(p.detach(), v)
        assert s.grads.data_ptr() <= p.grad.data_ptr() < s.grads.data_ptr() + s.grads.nbytes
    assert s.master.data_ptr() == base
    weight, norm = params[0][1], params[1][1]  # "a.weight" (5, 7), "a.norm" (7,)
    (weight @ norm).sum().backward()  # buffer order by name: a.norm [0, 7), a.weight [7, 42)
    assert torch.equal(s.grads[7:42].view(5, 7), norm.detach().expand(5, 7))
    version, before = norm._version, norm.detach().clone()
    opt.step(CFG.lr)
    assert norm.data_ptr() == base and not torch.equal(norm.detach(), before)
    assert norm._version > version  # the program's FP8 weight copies check this counter
    opt.zero_grad()
    assert s.grads.abs().sum() == 0 and all(p.grad is not None for _, p in params)


def test_pieces_of_the_update_give_the_same_bits(monkeypatch):
    """The update runs OPTIMIZER_UPDATE_PIECE elements at a time (bf16 moments round-trip
    through fp32 per piece); pieces of 4 elements give the one-piece result bit for bit."""
    import dsvc.runtime.optim as optim

    clip = Optimizer(**{**CFG.__dict__, "grad_clip": 0.5})
    results = []
    for piece in (1 << 24, 4):
        monkeypatch.setattr(optim, "OPTIMIZER_UPDATE_PIECE", piece)
        params = _params()
        opt = ZeroAdamW(params, [], clip, torch.bfloat16, ProcessMesh())
        for step in range(3):
            for (_, p), g in zip(params, _grads(step)):
                p.grad = g.clone()  # a caller's own gradient tensor is copied in
            opt.step(CFG.lr, keep_grads=True)
            assert torch.equal(params[1][1].grad, _grads(step)[1])  # a.norm, unclipped
        results.append(torch.cat([p.detach().reshape(-1) for _, p in params]))
    assert torch.equal(results[0], results[1])


def test_lr_schedules():
    warm = LrSchedule(kind="warmup_cosine", warmup_steps=4, final_lr=1e-4, total_steps=14)
    assert [lr_at(s, 1e-3, warm) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(9, 1e-3, warm) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, 1e-3, warm) == pytest.approx(1e-4)
    assert lr_at(1000, 1e-3, warm) == pytest.approx(1e-4)
    assert lr_at(7, 1e-3, LrSchedule(kind="constant")) == 1e-3
