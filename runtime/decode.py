"""The model one chunk of tokens at a time over a KV cache: prefill, decode steps, MTP drafts.

A `Decoder` wraps a `StageModule` that holds the whole model (the embedding, every
layer, the head and, for drafting, the MTP modules; its routed experts may live on
other EP ranks) and a `kv_cache.KVCache`. `main(tokens, pos)` runs new tokens of
each row at their positions through the main layers, writing their cache entries,
and returns the final-normed hidden states and the logits; `mtp(k, h, tokens, pos)`
runs MTP module k the same way over its own cache (its block has attention too),
from the previous depth's hidden states and the embeddings of the tokens k ahead,
exactly as `StageModule._loss` chains them in training.

Dual micro-batch overlap at inference (`overlap=True`, with experts on other EP
ranks): each forward splits its rows into two micro-batches run by an
`overlap.OverlapSession.forwards` session, so that one micro-batch's attention and
expert compute is issued while the other's dispatch or combine is in flight
(DeepSeek-V3's decoding scheme). The session's event log of the last forward is
kept as `overlap_log`; numerics are those of each micro-batch run alone.

Shape legend: B rows, S new tokens per row, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch

from .kv_cache import DecodeStep, KVCache
from .model import StageModule
from .overlap import OverlapSession


class Decoder:
    """Runs a whole-model `StageModule` over a cache; see the module docstring."""

    def __init__(self, model: StageModule, cache: KVCache, *, absorb: bool = True,
                 overlap: bool = False):
        st = model.stage
        if not (st.embedding and st.head):
            raise ValueError("decoding needs a module holding the embedding and the head "
                             "(build_full_model, or one built per EP rank)")
        self.model, self.cache, self.absorb, self.overlap = model, cache, absorb, overlap
        self.mtp_depth = len(model.mtp) if hasattr(model, "mtp") else 0
        comms = {id(moe.comm): moe.comm for moe in model.moe_layers().values()}
        self._comms = list(comms.values())
        self.overlap_log: list = []

    @classmethod
    def allocate(cls, model: StageModule, batch: int, max_len: int, *, mtp: bool = True,
                 cache_dtype=None, **kw) -> Decoder:
        """A decoder with a fresh cache for `batch` rows of `max_len` positions (in the
        plan's attention_core dtype unless `cache_dtype`), MTP blocks cached when `mtp`."""
        device = model.embed_tokens.weight.device
        with_mtp = mtp and hasattr(model, "mtp")
        cache = KVCache.allocate(model.plan, batch, max_len, mtp=with_mtp, dtype=cache_dtype,
                                 device=device)
        return cls(model, cache, **kw)

    @torch.no_grad()
    def main(self, tokens_BS: torch.Tensor, pos_BS: torch.Tensor):
        """(final-normed hidden (B, S, D), logits (B, S, V) fp32) of the main model."""
        return self._rows(self._main, tokens_BS, pos_BS)

    @torch.no_grad()
    def mtp(self, depth: int, h_BSD: torch.Tensor, tokens_BS: torch.Tensor,
            pos_BS: torch.Tensor):
        """MTP module `depth` (1-based) at positions pos: h is depth-1's output there (the
        main model's for depth 1), tokens the ones `depth` ahead. Returns its
        shared_head-normed output (the next depth's input) and its logits, which predict
        the token depth + 1 ahead."""
        return self._rows(lambda c, t, p, h: self._mtp(c, depth, h, t, p),
                          tokens_BS, pos_BS, h_BSD)

    # -- pieces ----------------------------------------------------------------------
    def _main(self, cache: KVCache, tokens_BS, pos_BS):
        m = self.model
        step = DecodeStep.at(pos_BS, self.absorb)
        h = m.embed(tokens_BS)
        for i, layer in m.layers.items():
            h = layer.forward_cached(h, cache[f"layers.{i}"], step)
        hn = m.norm(h)
        return hn, m.logits(hn)

    def _mtp(self, cache: KVCache, depth: int, h_BSD, tokens_BS, pos_BS):
        m = self.model
        module = m.mtp[depth - 1]
        step = DecodeStep.at(pos_BS, self.absorb)
        emb = m.embed(tokens_BS)
        x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h_BSD)], dim=-1))
        x = module.block.forward_cached(x, cache[f"mtp.{depth - 1}"], step)
        hn = module.shared_head.norm(x)
        return hn, m.logits(hn)

    def _rows(self, fn, *tensors):
        """fn(cache, *tensors) over every row, or as two overlapped micro-batches."""
        if not self.overlap:
            return fn(self.cache, *tensors)
        b = tensors[0].shape[0]
        if b < 2:
            raise ValueError("dual micro-batch overlap splits the rows in two: it needs at "
                             f"least 2 rows on every rank, this one has {b}")
        half = (b + 1) // 2
        first, second = slice(0, half), slice(half, b)
        session = OverlapSession.forwards("mb0", "mb1")
        for comm in self._comms:
            comm.session = session
        try:
            out0, out1 = session.run_forwards(
                lambda: fn(self.cache.rows(first), *(t[first] for t in tensors)),
                lambda: fn(self.cache.rows(second), *(t[second] for t in tensors)),
            )
        finally:
            for comm in self._comms:
                comm.session = None
        self.overlap_log = session.log
        return tuple(torch.cat([a, b_], dim=0) for a, b_ in zip(out0, out1))
