"""Deterministic initial weights: every parameter drawn from a generator seeded by
(seed, its global name), so any partitioning builds the same numbers.

A pipeline stage, an EP rank holding experts 4..7, and the single-process
reference all name a tensor the same way (`layers.3.mlp.experts.5.up_proj.weight`
for one routed expert), so each draws the identical values no matter which rank
builds it or in which order.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .layers import RMSNorm
from .moe import RoutedExperts


def name_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _normal(shape, std: float, seed: int, name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(name_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, std: float) -> None:
    """Norm weights 1; biases 0; every other weight N(0, std) from its name's generator."""
    for mod_name, mod in module.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
        elif isinstance(mod, RoutedExperts):
            base = prefix.removesuffix("experts.")
            for pname in ("gate_proj", "up_proj", "down_proj"):
                p = getattr(mod, pname)
                for j, e in enumerate(mod.expert_ids):
                    name = f"{base}experts.{e}.{pname}.weight"
                    p[j].copy_(_normal(p.shape[1:], std, seed, name))
        else:
            for pname, p in mod.named_parameters(recurse=False):
                if pname == "bias" and p.dim() == 1:
                    p.zero_()  # as Qwen2 / transformers' _init_weights: no random offsets
                    continue
                p.copy_(_normal(p.shape, std, seed, prefix + pname).to(p.device))
