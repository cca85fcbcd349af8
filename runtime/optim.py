"""ZeRO-1 AdamW: fp32 master weights and AdamW moments sharded over data parallelism.

Each rank's parameters fall in two shard groups: the replicated ("dense")
ones, sharded over the data-parallel group, and the routed experts, sharded
over the expert-data-parallel group (the ranks holding the same experts). Per
group the gradients are flattened in name order, reduce-scattered (averaged),
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

from .plan import LrSchedule, Optimizer


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


def _all_gather(shard: torch.Tensor, padded: int, group, size: int) -> torch.Tensor:
    full = torch.empty(padded, device=shard.device, dtype=shard.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dist.all_gather_into_tensor(full, shard.contiguous(), group=group)
    except (RuntimeError, NotImplementedError):
        dist.all_gather(list(full.chunk(size)), shard.contiguous(), group=group)
    return full


class _Shard:
    """One flat, padded view over a list of parameters, sharded over `group`."""

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
        flat = self._flatten([p.detach().float() for _, p in self.named], padded)
        self.master = flat.to(device)[self.lo : self.hi].clone()
        # which elements of [lo, hi) weight decay updates (matrices, not 1-D norm weights)
        # and which the gradient norm skips (a parameter another pipeline rank counts), as
        # ranges of the shard read from the layout: no per-element masks (8 bytes a
        # parameter), no device read-back (works on meta)
        self.decay_spans = self._spans(lambda n, p: p.dim() > 1)
        self.uncounted_spans = self._spans(lambda n, p: n in skip_norm)
        self.all_counted = not self.uncounted_spans
        self.exp_avg = torch.zeros(self.shard, dtype=state_dtype, device=device)
        self.exp_avg_sq = torch.zeros(self.shard, dtype=state_dtype, device=device)
        self.padded = padded
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
        return sum(
            t.numel() * t.element_size() for t in (self.master, self.exp_avg, self.exp_avg_sq)
        )

    def reduce_grads(self) -> None:
        grads = [
            p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            for _, p in self.named
        ]
        flat = self._flatten(grads, self.padded)
        if self.size > 1:
            self.grad = _reduce_scatter(flat, self.shard, self.group, self.rank) * self.scale
        else:
            self.grad = flat[self.lo : self.hi] * self.scale

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return shard
        return _all_gather(shard, self.padded, self.group, self.size)

    @torch.no_grad()
    def write_back(self, full: torch.Tensor, into_grad: bool = False) -> None:
        off = 0
        for _, p in self.named:
            chunk = full[off : off + p.numel()].view_as(p)
            if into_grad:
                p.grad = chunk.to(p.dtype).clone()
            else:
                p.copy_(chunk)
            off += p.numel()


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
        """Optimizer-state bytes this rank holds (master shard and both moments)."""
        return sum(s.state_bytes() for s in self.shards)

    def unsharded_state_bytes(self) -> int:
        """What one rank would hold for this stage without ZeRO (all experts of the layer)."""
        per = self.dense.master.element_size() + 2 * self.dense.exp_avg.element_size()
        return (self.dense.numel + self.expert.numel * self.ep) * per

    def zero_grad(self) -> None:
        for s in self.shards:
            for _, p in s.named:
                p.grad = None

    @torch.no_grad()
    def step(self, lr: float, keep_grads: bool = False) -> float:
        """Reduce, clip and apply one AdamW step; returns the global gradient norm
        (before clipping). `keep_grads` leaves the averaged full gradients in `.grad`."""
        self._sum_shared()
        for s in self.shards:
            s.reduce_grads()
        sumsq = torch.zeros(1, dtype=torch.float64, device=self.mesh.device)
        for s in self.shards:
            g = s.grad
            if not s.all_counted:  # the other holder of a shared parameter counts it
                g = g.clone()
                for a, b in s.uncounted_spans:
                    g[a:b] = 0.0
            sumsq += torch.dot(g, s.grad).double()
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
                s.write_back(s.gather(s.grad), into_grad=True)
            if s.shard == 0:
                continue
            g = s.grad.mul_(coef) if coef != 1.0 else s.grad
            # fp32 moments update in place; lower-precision ones round-trip through fp32
            m = s.exp_avg if s.exp_avg.dtype == torch.float32 else s.exp_avg.float()
            v = s.exp_avg_sq if s.exp_avg_sq.dtype == torch.float32 else s.exp_avg_sq.float()
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if m is not s.exp_avg:
                s.exp_avg.copy_(m)
                s.exp_avg_sq.copy_(v)
            if self.cfg.weight_decay:
                for a, b in s.decay_spans:
                    seg = s.master[a:b]
                    seg.add_(seg, alpha=-lr * self.cfg.weight_decay)
            denom = v.sqrt().div_(math.sqrt(bc2)).add_(self.cfg.eps)
            s.master.addcdiv_(m, denom, value=-lr / bc1)
        for s in self.shards:
            if s.shard:
                s.write_back(s.gather(s.master))
            s.grad = None
        return norm

    def _sum_shared(self) -> None:
        for s in self.shards:
            for name, p in s.named:
                group = self.shared.get(name)
                if group is not None:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, group=group)
