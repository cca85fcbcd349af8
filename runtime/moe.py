"""Mixture of experts: the router, routed and shared experts, load balancing.

Routing follows DeepSeek-V3 (and its public reference `Gate`): softmax or
sigmoid scores; the per-expert bias `e_score_correction_bias` is added for the
choice only; with expert groups each token first keeps its `top_groups` groups
ranked by the sum of their two best biased scores (node-limited routing when a
group lives on one node); the gate weights are the *unbiased* scores of the
chosen `top_k`, renormalised over them when the plan's `renormalize` says so
(default: sigmoid yes, softmax no; DeepSeek-V2-Lite's softmax gates stay raw
top-k probabilities) and times `route_scale`.

Balancing is auxiliary-loss-free: each MoE layer counts the tokens its experts
receive during a step; after the step the trainer sums the counts over the
data-parallel group and moves each bias by `bias_update_rate` toward balance
(`update_bias`). The optional sequence-wise auxiliary loss is attached to the
layer's output so its gradient flows in whatever backward runs the layer
(a pipeline stage or the whole model), scaled like the main loss.

Shape legend: B batch, S sequence, T tokens (B*S), D hidden, E experts
(El local), K top_k, G groups, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ep import ExpertComm, count_ids
from .layers import SwiGLU, dtype_of, pad_swiglu_k
from .plan import Ffn, Model, Precision


class Router(nn.Module):
    def __init__(self, dim: int, ffn: Ffn, compute_dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ffn.routed, dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(ffn.routed))
        self.ffn, self.compute_dtype = ffn, compute_dtype

    def forward(self, x_TD: torch.Tensor):
        """-> gate weights (T, K) fp32, expert ids (T, K), unbiased scores (T, E) fp32."""
        f = self.ffn
        logits_TE = F.linear(
            x_TD.to(self.compute_dtype), self.weight.to(self.compute_dtype)
        ).float()
        scores_TE = logits_TE.softmax(-1) if f.score == "softmax" else logits_TE.sigmoid()
        biased_TE = scores_TE.detach() + self.e_score_correction_bias
        if f.groups > 1:
            t = biased_TE.shape[0]
            biased_TGe = biased_TE.view(t, f.groups, -1)
            group_score_TG = biased_TGe.topk(2, dim=-1).values.sum(-1)
            keep_TG = group_score_TG.topk(f.top_groups, dim=-1).indices
            drop_TG = torch.ones_like(group_score_TG, dtype=torch.bool).scatter_(1, keep_TG, False)
            biased_TE = biased_TGe.masked_fill(drop_TG.unsqueeze(-1), float("-inf")).view(t, -1)
        idx_TK = biased_TE.topk(f.top_k, dim=-1).indices
        w_TK = scores_TE.gather(1, idx_TK)
        if f.effective_renormalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return w_TK * f.route_scale, idx_TK, scores_TE


class RoutedExperts(nn.Module):
    """This rank's routed experts, stacked for the grouped GEMM.

    `gate_proj`/`up_proj` (El, I, D) and `down_proj` (El, D, I) hold the experts
    `expert_ids` (global ids); checkpoint names map slice j to
    `experts.{expert_ids[j]}.{gate_proj,up_proj,down_proj}.weight`.
    """

    def __init__(self, dim: int, ffn: Ffn, expert_ids: list[int], prec: Precision):
        super().__init__()
        n = len(expert_ids)
        self.expert_ids = list(expert_ids)
        self.gate_proj = nn.Parameter(torch.empty(n, ffn.intermediate, dim))
        self.up_proj = nn.Parameter(torch.empty(n, ffn.intermediate, dim))
        self.down_proj = nn.Parameter(torch.empty(n, dim, ffn.intermediate))
        self.fmt = prec.linear_for("experts")
        self.backend = prec.fp8_backend
        self.act_dtype = dtype_of(prec.default)

    def forward(self, x_MD: torch.Tensor, counts_El: torch.Tensor) -> torch.Tensor:
        """Rows sorted by local expert, `counts_El[j]` rows for expert j -> (M, D)."""
        if self.fmt.format == "fp8_e4m3":
            from .fp8 import fp8_grouped_swiglu_ffn

            offsets = torch.cumsum(counts_El, 0)
            x, w1, w3, w2 = x_MD, self.gate_proj, self.up_proj, self.down_proj
            if self.fmt.pad:  # ragged hidden or intermediate: whole tiles for the kernels
                x, w1, w3, w2 = pad_swiglu_k(x, w1, w3, w2, self.fmt.act_tile)
            y = fp8_grouped_swiglu_ffn(
                x, w1, w3, w2, offsets, tile=self.fmt.act_tile, ue8m0=self.fmt.ue8m0,
                backend=self.backend
            )
            return y.to(self.act_dtype)
        dt = dtype_of(self.fmt.format)
        x_MD = x_MD.to(dt)
        w1, w3, w2 = (w.to(dt) for w in (self.gate_proj, self.up_proj, self.down_proj))
        if _grouped_mm_usable(x_MD, w1, w3, w2):
            offs = torch.cumsum(counts_El, 0, dtype=torch.int32)
            gate_MI = torch._grouped_mm(x_MD, w1.transpose(1, 2), offs=offs)
            up_MI = torch._grouped_mm(x_MD, w3.transpose(1, 2), offs=offs)
            y = torch._grouped_mm(F.silu(gate_MI) * up_MI, w2.transpose(1, 2), offs=offs)
            return _DenseGrad.apply(y).to(self.act_dtype)
        outs = []  # one GEMM per expert (their row counts are read back to the host)
        for j, x_jD in enumerate(torch.split(x_MD, counts_El.tolist())):
            if x_jD.shape[0] == 0:
                outs.append(x_jD)
                continue
            h = F.silu(x_jD @ w1[j].t()) * (x_jD @ w3[j].t())
            outs.append(h @ w2[j].t())
        return torch.cat(outs).to(self.act_dtype) if outs else x_MD.to(self.act_dtype)


_GROUPED_MM = hasattr(torch, "_grouped_mm") and tuple(
    int(v) for v in torch.__version__.split("+")[0].split(".")[:2]
) >= (2, 9)
_GROUPED_DTYPES = (torch.bfloat16, torch.float32)


def _grouped_mm_usable(x_MD: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: torch 2.9 or newer (a CPU kernel;
    on Hopper a bf16 CUTLASS kernel that reads the offsets on the device, with no host
    synchronisation), rows and bases 16-byte aligned, at least one row."""
    if not _GROUPED_MM or x_MD.shape[0] == 0 or x_MD.dtype not in _GROUPED_DTYPES:
        return False
    size = x_MD.element_size()
    dims = (x_MD.shape[1], weights[0].shape[1])  # hidden and intermediate: row lengths
    return all(d * size % 16 == 0 for d in dims) and all(
        t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (x_MD, *weights)
    )


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward hands on a dense gradient: _grouped_mm's backward refuses
    a broadcast one (`y.sum().backward()` gives strides (0, 0))."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the activations whose backward also seeds d(aux)/d(loss) = scale,
    so an auxiliary loss trains without being threaded through the stage outputs."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g, torch.full((), ctx.scale, dtype=torch.float32, device=g.device), None


def sequence_aux_loss(scores_BSE: torch.Tensor, idx_BSK: torch.Tensor, ffn: Ffn) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i, averaged over sequences."""
    b, s, e = scores_BSE.shape
    probs_BSE = (
        scores_BSE / scores_BSE.sum(-1, keepdim=True) if ffn.score == "sigmoid" else scores_BSE
    )
    hits_BE = torch.zeros(b, e, device=scores_BSE.device).scatter_add_(
        1, idx_BSK.reshape(b, -1), torch.ones(b, s * ffn.top_k, device=scores_BSE.device)
    )
    f_BE = hits_BE * (e / (ffn.top_k * s))
    p_BE = probs_BSE.mean(1)
    return ffn.seq_aux_loss * (f_BE * p_BE).sum(-1).mean()


class MoE(nn.Module):
    """Routed experts (possibly on other EP ranks through `comm`) plus shared experts."""

    def __init__(self, model: Model, ffn: Ffn, prec: Precision, comm: ExpertComm,
                 recompute: bool = False):
        super().__init__()
        d = model.hidden
        self.ffn, self.comm = ffn, comm
        self.act_dtype = dtype_of(prec.default)
        self.gate = Router(d, ffn, dtype_of(prec.kept["router"]))
        self.experts = RoutedExperts(d, ffn, comm.local_experts, prec)
        if ffn.shared:
            fmt = prec.linear_for("shared_experts")
            self.shared_experts = SwiGLU(
                d,
                ffn.shared * ffn.shared_intermediate,
                (fmt, fmt, fmt),
                self.act_dtype,
                prec.fp8_backend,
                recompute,
            )
        self.register_buffer("load_E", torch.zeros(ffn.routed, dtype=torch.long), persistent=False)
        self.aux_scale = 1.0  # set by the executor: this micro-batch's share of the loss
        self.tag = "moe"  # the layer's name in overlap event logs (StageModule sets L<i>, mtp<k>)
        self.aux_values: list[torch.Tensor] = []
        self.replaying = False  # the block is being recomputed in its backward (Block)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, d = x_BSD.shape
        x_TD = x_BSD.reshape(-1, d)
        w_TK, idx_TK, scores_TE = self.gate(x_TD)
        if self.ffn.shared:
            # the shared experts run beside the routed ones, inside the MLP chunk (overlap)
            y_TD, shared_TD = self.comm.run(
                x_TD, idx_TK, w_TK, self.experts, self.tag, lambda: self.shared_experts(x_TD)
            )
            y_TD = y_TD + shared_TD
        else:
            y_TD = self.comm.run(x_TD, idx_TK, w_TK, self.experts, self.tag)
        out = y_TD.to(self.act_dtype).view(b, s, d)
        return self.record(out, count_ids(idx_TK, self.ffn.routed), scores_TE, idx_TK, b, s)

    def record(self, out, counts_E, scores_TE, idx_TK, b: int, s: int):
        """What a MoE layer records beside its output (here and in a generated program's
        blocks): tokens per expert, and the sequence-wise balance loss attached to `out`."""
        if not self.replaying:  # a full recompute's replay counts nothing twice
            with torch.no_grad():
                self.load_E += counts_E.to(self.load_E.dtype)
        if self.ffn.seq_aux_loss > 0 and torch.is_grad_enabled():
            aux = sequence_aux_loss(scores_TE.view(b, s, -1), idx_TK.view(b, s, -1), self.ffn)
            if not self.replaying:
                self.aux_values.append(aux.detach())
            out = _AttachAuxLoss.apply(out, aux, self.aux_scale)
        return out

    def take_load(self) -> torch.Tensor:
        """Tokens per expert since the last call (this rank's share of the step)."""
        load = self.load_E.clone()
        self.load_E.zero_()
        return load

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: raise under-loaded experts' bias, lower over-loaded."""
        if self.ffn.bias_update_rate <= 0:
            return
        load = load_E.to(torch.float32)
        step = torch.sign(load.mean() - load) * self.ffn.bias_update_rate
        self.gate.e_score_correction_bias += step.to(self.gate.e_score_correction_bias.device)
