"""The head's loss a piece of tokens at a time (runtime/loss.py) against the whole-batch
cross-entropy: loss, hidden-state and weight gradients, for every head form (a bf16 or
fp32 linear, a tied embedding), the backward scaled by the incoming gradient, and no
tensor of the logits' size kept for the backward."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

import dsvc.runtime.loss as loss_mod
from dsvc.runtime.init import init_parameters
from dsvc.runtime.loss import chunked_cross_entropy
from dsvc.runtime.model import build_full_model
from dsvc.runtime.plan import LOSS_CHUNK_LOGITS, loss_chunk_rows, parse_plan
from dsvc.runtime.tiny import tiny_plan
from tests.tolerances import tol


def _case(n=37, d=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(vocab, d, generator=gen) * 0.3)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    return h, w, labels


def test_rows_per_piece_hold_the_logits_near_the_budget():
    assert loss_chunk_rows(32768) == 1024 and 1024 * 32768 == LOSS_CHUNK_LOGITS  # runtime.md
    assert loss_chunk_rows(129280) == 259  # DeepSeek-V3's vocabulary (docs/runtime.md)
    assert loss_chunk_rows(LOSS_CHUNK_LOGITS * 4) == 1  # a vocabulary above the budget


@pytest.mark.parametrize("rows", [1, 5, 37, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_equal_the_whole_batch(monkeypatch, rows, dtype):
    monkeypatch.setattr(loss_mod, "loss_chunk_rows", lambda vocab: rows)
    h, w, labels = _case()

    def logits(x, weight):
        return F.linear(x.to(dtype), weight).float()

    ours = chunked_cross_entropy(logits, h, labels, [w.to(dtype)], w.shape[0]) * 0.7
    gh, gw = torch.autograd.grad(ours, [h, w])
    ref = F.cross_entropy(logits(h, w.to(dtype)), labels) * 0.7
    rh, rw = torch.autograd.grad(ref, [h, w])
    rtol, atol = tol("fp32_equivalence") if dtype == torch.float32 else (2e-2, 1e-3)
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(gh, rh, rtol=rtol, atol=atol)
    torch.testing.assert_close(gw, rw, rtol=rtol, atol=atol)


def test_a_hidden_state_without_gradient(monkeypatch):
    monkeypatch.setattr(loss_mod, "loss_chunk_rows", lambda vocab: 8)
    h, w, labels = _case()
    h = h.detach()
    ours = chunked_cross_entropy(lambda x, p: F.linear(x, p), h, labels, [w], 50)
    (gw,) = torch.autograd.grad(ours, [w])
    (rw,) = torch.autograd.grad(F.cross_entropy(F.linear(h, w), labels), [w])
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def _tiny(tie: bool):
    raw = tiny_plan(pp=1, dp=1, ep=1, precision="bf16", num_layers=2, mtp_depth=1)
    raw["model"]["tie_embeddings"] = tie
    raw["model"]["vocab"] = 300  # no other dimension of the tiny model's
    model = build_full_model(parse_plan(raw))
    init_parameters(model, 0, 0.02)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_the_model_loss_keeps_no_logits_and_matches_one_piece(monkeypatch, tie):
    """The tiny model's loss (main head and MTP) in pieces of 8 tokens against one piece:
    the same loss and parameter gradients; the forward keeps no logits for the backward."""
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, dims=1)
    runs = []
    for rows in (10**9, 8):
        monkeypatch.setattr(loss_mod, "loss_chunk_rows", lambda vocab, r=rows: r)
        model = _tiny(tie)
        vocab = model.plan.model.vocab
        saved = []

        def pack(t, saved=saved):
            saved.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens, labels)
        shapes = [tuple(t.shape) for t in (ref() for ref in saved) if t is not None]
        loss.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((loss.detach(), grads, shapes, vocab))
    (l1, g1, _, vocab), (l8, g8, kept, _) = runs
    rtol, atol = tol("fp32_equivalence")
    torch.testing.assert_close(l8, l1, rtol=rtol, atol=atol)
    assert set(g8) == set(g1)
    for name in g1:  # bf16 GEMMs: the head's weight gradient is rounded to bf16 once
        atol = 2.0**-8 * float(g1[name].abs().max())
        torch.testing.assert_close(g8[name], g1[name], rtol=2.0**-7, atol=atol, msg=name)
    # kept for the backward (alive after the forward): the head's weight gradient, no logits
    assert (vocab, 64) in kept and not [s for s in kept if s and s[-1] == vocab], kept
