"""The head's cross-entropy a piece of tokens at a time, its gradients taken as it goes.

The output head of a large vocabulary turns every token into `vocab` logits: for the
1.1B bench spec's micro-batch of 16,384 tokens and 32,768 entries that is 2.1 GB in
bf16, 4.3 GB in fp32, and the loss's softmax and its gradient as much again, the
largest temporary of a step. `chunked_cross_entropy` runs the head and the loss on
`loss_chunk_rows(vocab)` tokens at a time (runtime/plan.py: about 32M logits), and,
while a piece's logits exist, its backward too: the gradient of the summed loss with
respect to the piece's hidden rows and to the head's parameters, accumulated over the
pieces (in fp32, kept in the parameter's dtype). Its own backward then only scales them
by the incoming gradient: no logits are kept and none are recomputed (the head's three
GEMMs per piece all run in the forward). What the head does inside is the caller's
(`logits`: a bf16 or fp32 linear, a tied embedding): this module sees a function of the
hidden rows and the parameters it reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import loss_chunk_rows


class _PiecewiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, h_ND, labels_N, *params):
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        grad_h = torch.empty_like(h_ND) if h_ND.requires_grad else None
        grad_p = [None] * len(params)
        wants = [p.requires_grad for p in params]
        for a in range(0, h_ND.shape[0], rows):
            with torch.enable_grad():
                piece = h_ND[a : a + rows].detach().requires_grad_(h_ND.requires_grad)
                loss = F.cross_entropy(
                    logits(piece, *params).float(), labels_N[a : a + rows], reduction="sum"
                )
                inputs = [piece] if h_ND.requires_grad else []
                inputs += [p for p, w in zip(params, wants) if w]
                grads = list(torch.autograd.grad(loss, inputs)) if inputs else []
            total += loss.detach()
            if grad_h is not None:
                grad_h[a : a + rows] = grads.pop(0)
            for i, w in enumerate(wants):
                if w:
                    g = grads.pop(0)  # summed in fp32 whatever the parameter's dtype
                    grad_p[i] = g.float() if grad_p[i] is None else grad_p[i].add_(g)
        # kept in each parameter's dtype: what autograd would round the gradient to anyway
        kept = [None if g is None else g.to(p.dtype) for g, p in zip(grad_p, params)]
        ctx.save_for_backward(grad_h, *kept)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, *grad_p = ctx.saved_tensors
        scaled = [None if g is None else g * grad_total.to(g.dtype) for g in grad_p]
        gh = None if grad_h is None else grad_h * grad_total.to(grad_h.dtype)
        return None, None, gh, None, *scaled


def chunked_cross_entropy(logits, h_ND, labels_N, params, vocab: int) -> torch.Tensor:
    """Mean cross-entropy of `logits(h_ND, *params)` against `labels_N` (N,), computed
    `loss_chunk_rows(vocab)` rows at a time; `params` are the tensors `logits` reads
    that need gradients (the head's weight, or its cast to the head's dtype). Every
    label counts (no ignore index: the caller selects the rows that have a target)."""
    rows = loss_chunk_rows(vocab)
    total = _PiecewiseLoss.apply(logits, rows, h_ND, labels_N, *params)
    return total / h_ND.shape[0]
