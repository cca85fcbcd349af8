"""Choosing tokens from logits: greedy, or sampled with temperature and top-p, and the
accept/resample rule of speculative sampling.

Each row draws from its own generator, seeded by (seed, row index), so a row's sampled
continuation does not depend on which other rows share its batch or which process
decodes it. Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) accepts a
draft token x drawn from q with probability min(1, p(x) / q(x)) and otherwise draws from
normalise(max(p - q, 0)): the emitted tokens are distributed exactly as sampling from
the target p alone. Greedy decoding is temperature 0; its drafts are accepted when they
equal the target's argmax.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax); else softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches top_p."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generators(self, rows: list[int], device=None) -> list[torch.Generator]:
        """One generator per row, seeded by (seed, global row index)."""
        out = []
        for r in rows:
            g = torch.Generator(device=device or "cpu")
            g.manual_seed((self.seed * 1_000_003 + r) % (2**63))
            out.append(g)
        return out

    def probs(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """The sampling distribution (fp32) of each row."""
        p = torch.softmax(logits_BV.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = p.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)
            p = torch.zeros_like(p).scatter_(-1, order, sorted_p)
            p = p / p.sum(-1, keepdim=True)
        return p

    def choose(self, logits_BV: torch.Tensor, gens: list[torch.Generator]):
        """(token ids (B,), their distribution (B, V) or None when greedy)."""
        if self.greedy:
            return logits_BV.argmax(-1), None
        p = self.probs(logits_BV)
        return draw(p, gens), p


def draw(p_BV: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row from its distribution, with the row's own generator."""
    cpu = p_BV.detach().to("cpu", torch.float32)
    ids = [int(torch.multinomial(cpu[b], 1, generator=g)) for b, g in enumerate(gens)]
    return torch.tensor(ids, dtype=torch.long, device=p_BV.device)


def accept_draft(p_V: torch.Tensor, q_V: torch.Tensor, token: int, gen: torch.Generator):
    """Speculative sampling for one draft `token` ~ q: (True, token) if accepted, else
    (False, a token drawn from normalise(max(p - q, 0)))."""
    p, q = p_V.detach().to("cpu", torch.float32), q_V.detach().to("cpu", torch.float32)
    u = float(torch.rand((), generator=gen))
    if q[token] > 0 and u * float(q[token]) < float(p[token]):
        return True, token
    residual = (p - q).clamp_min(0)
    if float(residual.sum()) <= 0:  # p == q: nothing to correct (unreachable after a rejection)
        residual = p
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
