"""The model, one pipeline stage at a time: blocks, MTP modules, embedding, head, loss.

A `StageModule` holds what one plan stage lists: optionally the embedding,
a run of decoder blocks (kept under their *global* layer index, so parameter
names are the same in every partitioning: `layers.3.mlp.gate.weight`),
optionally the final norm, the output head and the MTP modules. The whole
model is simply the stage that holds everything; the single-process reference
and the pipeline run the same code.

The last stage returns the micro-batch loss (main cross-entropy plus the MTP
losses weighted by loss_weight / depth) as a (1,)-shaped tensor, so that the
pipeline's loss function only scales it. Sequence-wise aux losses ride on the
MoE layers' outputs (see moe.py). Component losses are recorded detached in
`loss_log` for reporting.

MTP (DeepSeek-V3 section 2.2, names as Hugging Face / vLLM load them): module k
combines the previous depth's hidden state h with the embedding of the token k
positions ahead, eh_proj([enorm(emb); hnorm(h)]), runs one block, and predicts
the token k+1 ahead through `shared_head.norm` and the shared output head.
Positions without a target k+1 ahead are masked out of that loss.

Shape legend: B batch, S sequence, D hidden, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import build_attention
from .ep import ExpertComm
from .layers import Linear, RMSNorm, SwiGLU, dtype_of, replayed
from .loss import chunked_cross_entropy
from .moe import MoE
from .plan import LayerSpec, LinearFormat, Plan, Stage


class Block(nn.Module):
    """Pre-norm decoder block: attention then FFN (dense SwiGLU or MoE), residual each.

    The plan's `train.recompute`: `selective` is passed down (norms, MLA, SwiGLU keep less);
    `full` keeps only the block's input and replays the whole block in its backward, its
    MoE's bookkeeping (expert loads, the aux loss log) counted once."""

    def __init__(self, plan: Plan, spec: LayerSpec, comm: ExpertComm | None):
        super().__init__()
        m, prec = plan.model, plan.precision
        act, norm = dtype_of(prec.default), dtype_of(prec.kept["norm"])
        attn, ffn = m.attention[spec.attention], m.ffn[spec.ffn]
        self.recompute = plan.train.recompute
        sel = self.recompute == "selective"
        self.kind = (spec.attention, spec.ffn)  # the generated program's key for this block
        self.program = None  # (block function, ProgramRuntime) once a program is attached
        self.input_layernorm = RMSNorm(m.hidden, m.norm_eps, norm, act, sel)
        self.self_attn = build_attention(m, attn, prec, self.recompute)
        self.post_attention_layernorm = RMSNorm(m.hidden, m.norm_eps, norm, act, sel)
        if ffn.kind == "moe":
            assert comm is not None, "a MoE layer needs its ExpertComm"
            self.mlp = MoE(m, ffn, prec, comm, sel)
        else:
            fmts = tuple(prec.linear_for(r) for r in ("gate_proj", "up_proj", "down_proj"))
            self.mlp = SwiGLU(m.hidden, ffn.intermediate, fmts, act, prec.fp8_backend, sel)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.recompute != "full" or not torch.is_grad_enabled():
            return self._layer(x_BSD)
        runs = []

        def run(x: torch.Tensor) -> torch.Tensor:
            replay = bool(runs)  # the backward's second run: no bookkeeping twice
            runs.append(replay)
            if isinstance(self.mlp, MoE):
                self.mlp.replaying = replay
            try:
                return self._layer(x)
            finally:
                if isinstance(self.mlp, MoE):
                    self.mlp.replaying = False

        return replayed(run, x_BSD)

    def _layer(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.program is not None:  # the build's generated program (runtime/program.py)
            fn, rt = self.program
            return fn(rt, self, x_BSD)
        h = x_BSD + self.self_attn(self.input_layernorm(x_BSD))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_cached(self, x_BSD: torch.Tensor, cache, step) -> torch.Tensor:
        """Decoding (decode.py): attention over this layer's `kv_cache.LayerCache` at the
        positions `step` gives; the FFN as in training."""
        h = x_BSD + self.self_attn.forward_cached(self.input_layernorm(x_BSD), cache, step)
        return h + self.mlp(self.post_attention_layernorm(h))


class SharedHead(nn.Module):
    def __init__(self, dim: int, eps: float, norm_dtype, act_dtype, recompute: bool = False):
        super().__init__()
        self.norm = RMSNorm(dim, eps, norm_dtype, act_dtype, recompute)


class MTPModule(nn.Module):
    def __init__(self, plan: Plan, comm: ExpertComm | None):
        super().__init__()
        m, prec = plan.model, plan.precision
        act, norm = dtype_of(prec.default), dtype_of(prec.kept["norm"])
        sel = plan.train.recompute == "selective"
        self.enorm = RMSNorm(m.hidden, m.norm_eps, norm, act, sel)
        self.hnorm = RMSNorm(m.hidden, m.norm_eps, norm, act, sel)
        self.eh_proj = Linear(
            2 * m.hidden, m.hidden, prec.linear_for("eh_proj"), act, prec.fp8_backend
        )
        self.block = Block(plan, m.mtp_block(), comm)
        self.shared_head = SharedHead(m.hidden, m.norm_eps, norm, act, sel)

    def forward(self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))
        return self.block(x)


class StageModule(nn.Module):
    """One pipeline stage (or, holding everything, the whole model)."""

    def __init__(self, plan: Plan, stage: Stage, comms: dict[str, ExpertComm] | None = None):
        super().__init__()
        m, prec = plan.model, plan.precision
        self.plan, self.stage = plan, stage
        comms = comms or {}
        act, norm = dtype_of(prec.default), dtype_of(prec.kept["norm"])
        self.act_dtype = act
        self.embed_dtype = dtype_of(prec.kept["embedding"])
        self.head_dtype = dtype_of(prec.kept["head"])
        need_embedding = (
            stage.embedding or (stage.mtp and m.mtp.depth > 0) or (stage.head and m.tie_embeddings)
        )
        if need_embedding:
            self.embed_tokens = nn.Embedding(m.vocab, m.hidden)
        self.layers = nn.ModuleDict(
            {str(i): Block(plan, m.layers[i], comms.get(m.layers[i].ffn)) for i in stage.layers}
        )
        if stage.head:
            sel = plan.train.recompute == "selective"
            self.norm = RMSNorm(m.hidden, m.norm_eps, norm, act, sel)
            if not m.tie_embeddings:
                self.lm_head = Linear(
                    m.hidden, m.vocab, LinearFormat(prec.kept["head"]), torch.float32
                )
        if stage.mtp and m.mtp.depth:
            mtp_ffn = m.mtp_block().ffn
            self.mtp = nn.ModuleList(
                MTPModule(plan, comms.get(mtp_ffn)) for _ in range(m.mtp.depth)
            )
        self.loss_log: list[dict[str, torch.Tensor]] = []
        for name, moe in self.moe_layers().items():
            parts = name.split(".")  # "layers.3.mlp" -> L3, "mtp.0.block.mlp" -> mtp0
            moe.tag = f"L{parts[1]}" if parts[0] == "layers" else f"mtp{parts[1]}"

    # -- pieces ----------------------------------------------------------------------
    def embed(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight.to(self.embed_dtype)
        return F.embedding(tokens_BS, w).to(self.act_dtype)

    def _head(self):
        """The output head as (f, params), logits (fp32) = f(h, *params): its weight (the
        embedding's when tied) cast once to the head's kept dtype (bf16 or fp32: a plan
        keeps the head out of FP8), which is what f reads and differentiates."""
        head = self.embed_tokens if self.plan.model.tie_embeddings else self.lm_head
        dt = self.head_dtype
        return (lambda x, w: F.linear(x.to(dt), w).float()), [head.weight.to(dt)]

    def logits(self, h_BSD: torch.Tensor) -> torch.Tensor:
        f, params = self._head()
        return f(h_BSD, *params)

    def head_loss(self, h_ND: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head's logits of the normed rows `h_ND` against
        `labels_N`, a piece of rows at a time (runtime/loss.py)."""
        f, params = self._head()
        return chunked_cross_entropy(f, h_ND, labels_N, params, self.plan.model.vocab)

    def moe_layers(self) -> dict[str, MoE]:
        """Every MoE layer of this stage by parameter-name prefix (main layers and MTP)."""
        return {name: mod for name, mod in self.named_modules() if isinstance(mod, MoE)}

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids (B, S) on the embedding stage, else hidden states (B, S, D).
        Returns hidden states, or on the head stage the loss as a (1,) tensor."""
        h = self.embed(x) if self.stage.embedding else x
        for layer in self.layers.values():
            h = layer(h)
        if not self.stage.head:
            return h
        assert labels is not None, "the head stage needs the labels"
        return self._loss(h, labels)

    def mtp_states(self, hn_BSD: torch.Tensor, labels_BS: torch.Tensor):
        """(k, depth k's normed state (B, S, D), its targets (B, S)) for k = 1..depth: MTP
        chains from the final-normed state (as transformers, vLLM and Megatron-LM run
        DeepSeek's released MTP weights), each depth's shared_head.norm output feeding the
        next. Module k sees token i+k (labels[i+k-1]) and predicts token i+k+1
        (labels[i+k]); position i is valid for i < S - k."""
        prev = hn_BSD
        for k, module in enumerate(self.mtp, start=1):
            ahead = torch.roll(labels_BS, shifts=-(k - 1), dims=1)
            prev = module.shared_head.norm(module(prev, self.embed(ahead)))
            yield k, prev, torch.roll(labels_BS, shifts=-k, dims=1)

    def _loss(self, h_BSD: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        m = self.plan.model
        hn_BSD = self.norm(h_BSD)
        main = self.head_loss(hn_BSD.reshape(-1, m.hidden), labels_BS.reshape(-1))
        log = {"lm": main.detach()}
        total = main
        if self.stage.mtp and m.mtp.depth:
            s = labels_BS.shape[1]
            mtp_sum = main.new_zeros(())
            for k, prev, target in self.mtp_states(hn_BSD, labels_BS):
                valid = torch.arange(s, device=labels_BS.device) < s - k
                ce = self.head_loss(
                    prev[:, valid].reshape(-1, m.hidden), target[:, valid].reshape(-1)
                )
                log[f"mtp{k}"] = ce.detach()
                mtp_sum = mtp_sum + ce
            total = total + mtp_sum * (m.mtp.loss_weight / m.mtp.depth)
        self.loss_log.append(log)
        return total.reshape(1)


def build_full_model(plan: Plan) -> StageModule:
    """The unpartitioned model on one process (all experts local): the reference."""
    from .plan import ExpertPlacement
    from .plan import Stage as StageSpec

    m = plan.model
    comms = {}
    for name, ffn in m.ffn.items():
        if ffn.kind == "moe":
            place = ExpertPlacement(per_rank=(tuple(range(ffn.routed)),), group_of_expert=())
            comms[name] = ExpertComm(place, 0, None, "fp32", "fp32")
    whole = StageSpec(0, 0, "A", tuple(range(len(m.layers))), True, True, m.mtp.depth > 0)
    return StageModule(plan, whole, comms)
