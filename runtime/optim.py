"""ZeRO-1 AdamW: fp32 master weights and AdamW moments sharded over data parallelism.

Each rank's parameters fall in two shard groups: the replicated ("dense")
ones, sharded over the data-parallel group, and the routed experts, sharded
over the expert-data-parallel group (the ranks holding the same experts). Per
group the parameters live in one flat buffer in name order and their gradients
in another (each parameter and its `.grad` a view; `_Shard`), so the parameters,
kept in fp32, are their own master weights: the gradients are reduce-scattered
(averaged) from where backward accumulated them,
the global norm is summed over the whole world (each element counted once),
clipped, the AdamW step runs on this rank's shard only, and the updated
shard is all-gathered back into the parameters. Moments are kept in the
plan's `optimizer_states` dtype (bf16 for DeepSeek-V3) and the arithmetic is
fp32; weight decay skips 1-D tensors (norm weights). torch's AdamW keeps its
moments in the parameter dtype, hence this class instead of wrapping it.

Parameters held by several pipeline ranks (the embedding shared with the MTP
modules, a tied head) are summed across their holders first; only the first
holder counts them in the gradient norm.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from .plan import OPTIMIZER_UPDATE_PIECE, LrSchedule, Optimizer


def lr_at(step: int, base_lr: float, sched: LrSchedule) -> float:
    """Learning rate for 0-based `step`: linear warm-up to base, then cosine to final_lr."""
    if sched.kind == "constant":
        return base_lr
    if step < sched.warmup_steps:
        return base_lr * (step + 1) / sched.warmup_steps
    span = max(sched.total_steps - sched.warmup_steps, 1)
    progress = min(max((step - sched.warmup_steps) / span, 0.0), 1.0)
    return sched.final_lr + 0.5 * (base_lr - sched.final_lr) * (1 + math.cos(math.pi * progress))


def _reduce_scatter(flat: torch.Tensor, shard: int, group, rank: int) -> torch.Tensor:
    out = torch.empty(shard, device=flat.device, dtype=flat.dtype)
    try:
        with warnings.catch_warnings():  # renamed in torch 2.13; 2.11 has only this name
            warnings.simplefilter("ignore", FutureWarning)
            dist.reduce_scatter_tensor(out, flat, op=dist.ReduceOp.SUM, group=group)
        return out
    except (RuntimeError, NotImplementedError):  # a backend without it (older gloo)
        flat = flat.clone()
        dist.all_reduce(flat, group=group)
        return flat[rank * shard : (rank + 1) * shard]


def _all_gather_into(full: torch.Tensor, shard: torch.Tensor, group, size: int) -> None:
    """Every rank's `shard` into `full` (which `shard` must not alias), in place."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dist.all_gather_into_tensor(full, shard.contiguous(), group=group)
    except (RuntimeError, NotImplementedError):
        dist.all_gather(list(full.chunk(size)), shard.contiguous(), group=group)


class _Shard:
    """One flat, padded buffer holding a list of parameters, and another their gradients,
    sharded over `group`.

    Every parameter is a view of `params` and its gradient a view of `grads` (autograd
    accumulates into a gradient that exists in place), so the reduce-scatter reads the
    gradients where backward left them (no flat copy), and, the parameters being kept
    in the master dtype (fp32), this rank's master shard is `params[lo:hi]` itself: the
    step updates the parameters in place and the all-gather writes into them. Nothing
    here copies a whole parameter set."""

    def __init__(
        self,
        named,
        group,
        size: int,
        rank: int,
        state_dtype,
        skip_norm: set[str],
        scale: float,
        device,
    ):
        self.named = sorted(named, key=lambda kv: kv[0])
        self.group, self.size, self.rank = group, size, rank
        self.scale, self.device = scale, device
        self.numel = sum(p.numel() for _, p in self.named)
        padded = -(-self.numel // size) * size if self.numel else 0
        self.shard = padded // size if size else 0
        self.lo = rank * self.shard
        self.hi = self.lo + self.shard
        self.padded = padded
        for name, p in self.named:
            if p.dtype != torch.float32:
                raise TypeError(f"{name}: parameters are kept in fp32 (the master dtype)")
        self.params = torch.zeros(padded, dtype=torch.float32, device=device)
        self.grads = torch.zeros(padded, dtype=torch.float32, device=device)
        self._grad_views = []
        off = 0
        with torch.no_grad():
            for _, p in self.named:
                view = self.params[off : off + p.numel()].view_as(p)
                view.copy_(p.detach())
                p.data = view  # the module keeps its Parameter; its storage is the buffer's
                grad = self.grads[off : off + p.numel()].view_as(p)
                p.grad = grad
                self._grad_views.append(grad)
                off += p.numel()
        self.master = self.params[self.lo : self.hi]
        # which elements of [lo, hi) weight decay updates (matrices, not 1-D norm weights)
        # and which the gradient norm counts (not a parameter another pipeline rank
        # counts), as ranges of the shard read from the layout: no per-element masks (8
        # bytes a parameter), no device read-back (works on meta)
        self.decay_spans = self._spans(lambda n, p: p.dim() > 1)
        self.counted_spans = self._spans(lambda n, p: n not in skip_norm)
        self.exp_avg = torch.zeros(self.shard, dtype=state_dtype, device=device)
        self.exp_avg_sq = torch.zeros(self.shard, dtype=state_dtype, device=device)
        self.grad: torch.Tensor | None = None

    def _spans(self, chosen) -> list[tuple[int, int]]:
        """Merged [a, b) ranges, relative to the shard, of the parameters `chosen(name, p)`
        picks, clipped to this rank's [lo, hi)."""
        spans, off = [], 0
        for n, p in self.named:
            a, b = max(off, self.lo), min(off + p.numel(), self.hi)
            if a < b and chosen(n, p):
                if spans and spans[-1][1] == a - self.lo:
                    spans[-1] = (spans[-1][0], b - self.lo)
                else:
                    spans.append((a - self.lo, b - self.lo))
            off += p.numel()
        return spans

    @staticmethod
    def _flatten(parts, padded: int) -> torch.Tensor:
        device = parts[0].device if parts else None
        flat = torch.zeros(padded, device=device)
        if parts:
            cat = torch.cat([t.reshape(-1) for t in parts])
            flat[: cat.numel()] = cat
        return flat

    def state_bytes(self) -> int:
        """Bytes of optimizer state this shard allocates: the two moments (the master
        shard is a view of the parameters)."""
        return sum(t.numel() * t.element_size() for t in (self.exp_avg, self.exp_avg_sq))

    @torch.no_grad()
    def zero_grad(self) -> None:
        self.grads.zero_()
        for (_, p), view in zip(self.named, self._grad_views):
            p.grad = view

    @torch.no_grad()
    def _adopt_grads(self) -> None:
        """Point every gradient back at the buffer: one something replaced (a test, a
        caller assigning `.grad`) is copied in, a missing one is zero."""
        for (_, p), view in zip(self.named, self._grad_views):
            g = p.grad
            if g is view:
                continue
            if g is None:
                view.zero_()
            else:
                view.copy_(g)
            p.grad = view

    def reduce_grads(self) -> None:
        """Average the gradient buffer over the group; this rank's shard of it in `grad`
        (the step has pointed every `.grad` back at the buffer first)."""
        if self.size > 1:
            self.grad = _reduce_scatter(self.grads, self.shard, self.group, self.rank)
            self.grad.mul_(self.scale)
        else:
            if self.scale != 1.0:
                self.grads.mul_(self.scale)
            self.grad = self.grads[self.lo : self.hi]

    @torch.no_grad()
    def keep_full_grads(self) -> None:
        """Leave the averaged full gradients in every `.grad` (at one rank they are)."""
        if self.size > 1:
            _all_gather_into(self.grads, self.grad, self.group, self.size)

    @torch.no_grad()
    def gather_params(self) -> None:
        """Every rank's updated shard into every rank's parameters, in place; the version
        counters move as an in-place update of each parameter would move them (the
        program's FP8 weight copies are checked against them)."""
        if self.size > 1:  # the collective's input may not alias its output: one shard copy
            _all_gather_into(self.params, self.master.clone(), self.group, self.size)
        for _, p in self.named:
            torch.autograd.graph.increment_version(p)


class ZeroAdamW:
    """AdamW with ZeRO-1 sharding; see the module docstring.

    `dense` and `expert` are (name, parameter) lists; `shared` maps the name of a
    parameter held by several pipeline ranks to the group of its holders, and
    `skip_norm` names the copies that must not count in the gradient norm.
    """

    def __init__(
        self, dense, expert, cfg: Optimizer, state_dtype: torch.dtype, mesh,
        shared: dict | None = None, skip_norm: set[str] | None = None,
    ):  # fmt: skip
        skip = set(skip_norm or ())
        self.cfg, self.mesh = cfg, mesh
        self.shared = shared or {}
        # Each rank's loss is its data shard's mean, so the global mean's gradient is the
        # sum over data-parallel ranks / dp -- for experts too: an expert's gradient already
        # sums its EP group's tokens, and its expert-DP replicas are summed here.
        scale = 1.0 / mesh.dp
        dev = mesh.device
        self.dense = _Shard(
            dense, mesh.dp_group, mesh.dp, mesh.dp_rank, state_dtype, skip, scale, dev
        )
        self.expert = _Shard(
            expert, mesh.edp_group, mesh.edp, mesh.edp_rank, state_dtype, skip, scale, dev
        )
        self.steps = 0
        self.ep = mesh.ep

    @property
    def shards(self) -> tuple[_Shard, _Shard]:
        return self.dense, self.expert

    def state_bytes(self) -> int:
        """Optimizer-state bytes this rank allocates (both moments; the master shard is the
        parameters' own)."""
        return sum(s.state_bytes() for s in self.shards)

    def unsharded_state_bytes(self) -> int:
        """What one rank would hold for this stage without ZeRO (all experts of the layer)."""
        per = 2 * self.dense.exp_avg.element_size()
        return (self.dense.numel + self.expert.numel * self.ep) * per

    def zero_grad(self) -> None:
        for s in self.shards:
            s.zero_grad()

    @torch.no_grad()
    def step(self, lr: float, keep_grads: bool = False) -> float:
        """Reduce, clip and apply one AdamW step; returns the global gradient norm
        (before clipping). `keep_grads` leaves the averaged full gradients in `.grad`."""
        for s in self.shards:
            s._adopt_grads()
        self._sum_shared()
        for s in self.shards:
            s.reduce_grads()
        sumsq = torch.zeros(1, dtype=torch.float64, device=self.mesh.device)
        for s in self.shards:  # the other holder of a shared parameter counts it
            for a, b in s.counted_spans:
                g = s.grad[a:b]
                sumsq += torch.dot(g, g).double()
        if self.mesh.distributed:
            dist.all_reduce(sumsq)
        norm = float(sumsq.sqrt())
        clip = self.cfg.grad_clip
        coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        self.steps += 1
        b1, b2 = self.cfg.betas
        bc1, bc2 = 1 - b1**self.steps, 1 - b2**self.steps
        for s in self.shards:
            if keep_grads:
                s.keep_full_grads()
            if s.shard == 0:
                continue
            if self.cfg.weight_decay:
                for a, b in s.decay_spans:
                    seg = s.master[a:b]
                    seg.add_(seg, alpha=-lr * self.cfg.weight_decay)
            # in pieces: lower-precision moments round-trip through fp32 a piece at a time
            # (three fp32 temporaries of that many elements, not of the shard)
            piece = OPTIMIZER_UPDATE_PIECE
            for a in range(0, s.shard, piece):
                b = min(a + piece, s.shard)
                self._update(s, a, b, coef, lr / bc1, math.sqrt(bc2))
        for s in self.shards:
            if s.shard:
                s.gather_params()
            s.grad = None
        return norm

    def _update(self, s: _Shard, a: int, b: int, coef: float, step: float, bc2_root: float):
        """AdamW's moments and update on [a, b) of shard `s`, the gradient clipped by
        `coef` (folded into the moments' weights: the gradient itself stays unscaled)."""
        b1, b2 = self.cfg.betas
        g = s.grad[a:b]
        m_st, v_st = s.exp_avg[a:b], s.exp_avg_sq[a:b]
        m = m_st if m_st.dtype == torch.float32 else m_st.float()
        v = v_st if v_st.dtype == torch.float32 else v_st.float()
        m.mul_(b1).add_(g, alpha=(1 - b1) * coef)
        v.mul_(b2).addcmul_(g, g, value=(1 - b2) * coef * coef)
        if m is not m_st:
            m_st.copy_(m)
            v_st.copy_(v)
        denom = v.sqrt_() if v is not v_st else v.sqrt()  # a temporary, or the state itself
        denom.div_(bc2_root).add_(self.cfg.eps)
        s.master[a:b].addcdiv_(m, denom, value=-step)

    def _sum_shared(self) -> None:
        for s in self.shards:
            for name, p in s.named:
                group = self.shared.get(name)
                if group is not None:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, group=group)
