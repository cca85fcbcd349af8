"""The decode cache: what each token leaves behind, per attention layer, for the tokens after it.

MLA (DeepSeek-V2/V3) caches only the normalised kv latent c (kv_lora_rank
elements) and the decoupled RoPE key k_pe (qk_rope_dim, rotated) per token per
layer; keys and values of every head are re-derived from them (or, absorbed,
never formed: see attention.py). GQA/MHA caches K (rotated) and V of each kv
head. Either way the cache's dtype is the precision's `attention_core` dtype,
so the allocated bytes per token equal the report's
`model.kv_cache_bytes_per_token` (main layers) and
`model.kv_cache_bytes_per_token_mtp` (the MTP modules' blocks, cached beside
them for speculative decoding).

Rows keep their own lengths: a chunk of S tokens of row b is written at the
positions `pos_BS[b]`, and a query at position p sees the keys 0..p of its own
row (`DecodeStep.mask_BST`). Entries past a row's current length are left over
from a longer prompt in the same batch or from rejected drafts; they are never
visible, because a query only sees positions at or before its own, and every
position up to it has been (re)written first.

Shape legend: B batch rows, S new tokens, T cached positions, C kv latent,
R rope dim, G kv heads, d head dim.
"""

from __future__ import annotations

import dataclasses

import torch

from .layers import dtype_of
from .plan import Attention, Plan


def cache_entries(att: Attention) -> dict[str, tuple[int, ...]]:
    """Per-token tensors one layer with attention `att` caches, with their shapes."""
    if att.kind == "mla":
        return {"latent": (att.kv_lora_rank,), "k_pe": (att.qk_rope_dim,)}
    return {"k": (att.kv_heads, att.head_dim), "v": (att.kv_heads, att.head_dim)}


def cache_layout(plan: Plan, mtp: bool = True) -> dict[str, dict[str, tuple[int, ...]]]:
    """Cache entries per attention layer: main layers as `layers.<i>`, MTP blocks as
    `mtp.<k>` (when `mtp`), named as the model's modules are."""
    m = plan.model
    out = {f"layers.{i}": cache_entries(m.attention[spec.attention])
           for i, spec in enumerate(m.layers)}
    if mtp:
        block = m.attention[m.mtp_block().attention]
        out.update({f"mtp.{k}": cache_entries(block) for k in range(m.mtp.depth)})
    return out


@dataclasses.dataclass
class DecodeStep:
    """One forward over the cache: where each new token sits, what it may see."""

    pos_BS: torch.Tensor  # int64 positions of the new tokens
    mask_BST: torch.Tensor  # bool: key t visible to query (b, s) iff t <= pos[b, s]
    absorb: bool = True  # MLA: attention over the latent with absorbed up-projections

    @classmethod
    def at(cls, pos_BS: torch.Tensor, absorb: bool = True) -> DecodeStep:
        keys = int(pos_BS.max()) + 1  # the cache prefix any query of this chunk can see
        t = torch.arange(keys, device=pos_BS.device)
        return cls(pos_BS, t.view(1, 1, -1) <= pos_BS.unsqueeze(-1), absorb)

    @property
    def keys(self) -> int:
        return self.mask_BST.shape[-1]


class LayerCache:
    """One layer's cache: a (B, T, ...) buffer per entry, written at positions."""

    def __init__(self, buffers: dict[str, torch.Tensor]):
        self.buffers = buffers

    @classmethod
    def allocate(cls, entries, batch: int, max_len: int, dtype, device=None) -> LayerCache:
        return cls({name: torch.zeros(batch, max_len, *shape, dtype=dtype, device=device)
                    for name, shape in entries.items()})

    def write(self, pos_BS: torch.Tensor, **values: torch.Tensor) -> None:
        """values[name] (B, S, ...) into row b at positions pos_BS[b]."""
        rows_BS = torch.arange(pos_BS.shape[0], device=pos_BS.device).unsqueeze(1)
        rows_BS = rows_BS.expand_as(pos_BS)
        for name, v in values.items():
            buf = self.buffers[name]
            buf[rows_BS, pos_BS] = v.to(buf.dtype)

    def read(self, name: str, keys: int) -> torch.Tensor:
        """Positions 0..keys-1 of every row (B, keys, ...)."""
        return self.buffers[name][:, :keys]

    def rows(self, sl: slice) -> LayerCache:
        """A view of some rows (a micro-batch); writes go to the same storage."""
        return LayerCache({name: buf[sl] for name, buf in self.buffers.items()})

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class KVCache:
    """Every attention layer's cache for `batch` rows of up to `max_len` positions."""

    def __init__(self, layers: dict[str, LayerCache], batch: int, max_len: int):
        self.layers, self.batch, self.max_len = layers, batch, max_len

    @classmethod
    def allocate(cls, plan: Plan, batch: int, max_len: int, *, mtp: bool = True, dtype=None,
                 device=None) -> KVCache:
        """Zeroed buffers in `dtype` (default: the plan's attention_core dtype)."""
        dtype = dtype if dtype is not None else dtype_of(plan.precision.kept["attention_core"])
        layers = {name: LayerCache.allocate(entries, batch, max_len, dtype, device)
                  for name, entries in cache_layout(plan, mtp).items()}
        return cls(layers, batch, max_len)

    def __getitem__(self, name: str) -> LayerCache:
        return self.layers[name]

    def rows(self, sl: slice) -> KVCache:
        n = len(range(*sl.indices(self.batch)))
        return KVCache({k: v.rows(sl) for k, v in self.layers.items()}, n, self.max_len)

    def bytes_per_token(self, part: str = "main") -> int:
        """Allocated bytes per cached token of the main layers (`part="main"`) or of the
        MTP blocks (`"mtp"`): the buffers' bytes over batch x max_len."""
        prefix = "layers." if part == "main" else "mtp."
        total = sum(c.nbytes for name, c in self.layers.items() if name.startswith(prefix))
        slots = self.batch * self.max_len
        assert total % slots == 0, "every buffer holds batch x max_len tokens"
        return total // slots
