"""Runtime overhead on one CPU process: the runtime's model vs plain eager PyTorch.

    python bench/trainer_cpu.py [--steps 20] [--layers 4] [--batch 8] [--threads 1]

Both sides train the same tiny DeepSeek-V3-like model (MLA, 1 dense + MoE
layers with 8 routed experts in 4 groups, 1 shared expert, MTP depth 1) from the
same weights on the same batches, fp32:

- runtime: `runtime.trainer.Trainer.reference` (the model every partitioned
  run must reproduce: name-keyed stages, grouped experts behind ExpertComm,
  attached aux losses, ZeRO-1 AdamW with its flat shards, bias update);
- eager:  a straightforward implementation in the style of DeepSeek-V3's
  reference `model.py`: `nn.Linear`, complex-number RoPE,
  `F.scaled_dot_product_attention`, `torch.topk` routing, a Python loop over
  experts, `torch.optim.AdamW`.

It first checks that the two compute the same loss, then times whole training
steps (forward, backward, optimizer, router bias update) alternately and
prints the median step times and their ratio (target: runtime <= 1.10x eager).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import source_tree  # noqa: E402,F401  (dsvc from this tree, installed or not)
import torch
import torch.nn.functional as F
from torch import nn

from dsvc.runtime.plan import parse_plan
from dsvc.runtime.tiny import tiny_plan
from dsvc.runtime.trainer import Trainer


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def apply_rotary(x, freqs_cis):
    y = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs_cis.view(
        1, x.size(1), 1, -1
    )
    return torch.view_as_real(y).flatten(3).to(x.dtype)


class MLA(nn.Module):
    def __init__(self, a, dim, eps, softmax_scale):
        super().__init__()
        self.a, self.scale = a, softmax_scale
        qk = a.qk_nope_dim + a.qk_rope_dim
        self.q_a_proj = nn.Linear(dim, a.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(a.q_lora_rank, eps)
        self.q_b_proj = nn.Linear(a.q_lora_rank, a.heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, a.kv_lora_rank + a.qk_rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank, eps)
        self.kv_b_proj = nn.Linear(a.kv_lora_rank, a.heads * (a.qk_nope_dim + a.v_dim), bias=False)
        self.o_proj = nn.Linear(a.heads * a.v_dim, dim, bias=False)

    def forward(self, x, freqs_cis):
        a = self.a
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, s, a.heads, -1)
        q_nope, q_pe = q.split([a.qk_nope_dim, a.qk_rope_dim], -1)
        q = torch.cat([q_nope, apply_rotary(q_pe, freqs_cis)], -1)
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_dim], -1)
        k_pe = apply_rotary(k_pe.unsqueeze(2), freqs_cis)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv)).view(b, s, a.heads, -1)
        k_nope, v = kv.split([a.qk_nope_dim, a.v_dim], -1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, a.heads, -1)], -1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=self.scale,
        )
        return self.o_proj(o.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, dim, inter):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, f, dim):
        super().__init__()
        self.f = f
        self.weight = nn.Parameter(torch.empty(f.routed, dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(f.routed))

    def forward(self, x):
        f = self.f
        scores = F.linear(x, self.weight).sigmoid()
        original = scores
        scores = scores.detach() + self.e_score_correction_bias
        g = scores.view(x.size(0), f.groups, -1)
        group_idx = g.topk(2, dim=-1)[0].sum(-1).topk(f.top_groups, dim=-1)[1]
        mask = torch.ones(x.size(0), f.groups, dtype=torch.bool).scatter_(1, group_idx, False)
        scores = g.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        indices = torch.topk(scores, f.top_k, dim=-1)[1]
        weights = original.gather(1, indices)
        return weights / weights.sum(-1, keepdim=True) * f.route_scale, indices, original


class MoE(nn.Module):
    def __init__(self, f, dim):
        super().__init__()
        self.f = f
        self.gate = Gate(f, dim)
        self.experts = nn.ModuleList(MLP(dim, f.intermediate) for _ in range(f.routed))
        self.shared_experts = MLP(dim, f.shared * f.shared_intermediate)
        self.load = torch.zeros(f.routed, dtype=torch.long)

    def forward(self, x):
        b, s, d = x.shape
        x = x.view(-1, d)
        weights, indices, scores = self.gate(x)
        counts = torch.bincount(indices.flatten(), minlength=self.f.routed)
        self.load += counts
        y = torch.zeros_like(x)
        for i, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            idx, top = torch.where(indices == i)
            y = y.index_add(0, idx, self.experts[i](x[idx]) * weights[idx, top, None])
        out = (y + self.shared_experts(x)).view(b, s, d)
        # sequence-wise balance loss, added to the total by the model
        p = (scores / scores.sum(-1, keepdim=True)).view(b, s, -1).mean(1)
        hits = torch.zeros(b, self.f.routed).scatter_add_(
            1, indices.view(b, -1), torch.ones(b, s * self.f.top_k)
        )
        aux = self.f.seq_aux_loss * (hits * (self.f.routed / (self.f.top_k * s)) * p).sum(-1).mean()
        return out, aux


class Block(nn.Module):
    def __init__(self, m, attn, ffn, scale):
        super().__init__()
        self.input_layernorm = RMSNorm(m.hidden, m.norm_eps)
        self.self_attn = MLA(attn, m.hidden, m.norm_eps, scale)
        self.post_attention_layernorm = RMSNorm(m.hidden, m.norm_eps)
        self.mlp = MoE(ffn, m.hidden) if ffn.kind == "moe" else MLP(m.hidden, ffn.intermediate)

    def forward(self, x, freqs_cis):
        x = x + self.self_attn(self.input_layernorm(x), freqs_cis)
        out = self.mlp(self.post_attention_layernorm(x))
        out, aux = out if isinstance(out, tuple) else (out, 0.0)
        return x + out, aux


class EagerModel(nn.Module):
    def __init__(self, plan, freqs_cis, scale):
        super().__init__()
        m = plan.model
        self.m = m
        self.embed_tokens = nn.Embedding(m.vocab, m.hidden)
        self.layers = nn.ModuleList(
            Block(m, *plan.layer_spec(i), scale) for i in range(len(m.layers))
        )
        self.norm = RMSNorm(m.hidden, m.norm_eps)
        self.lm_head = nn.Linear(m.hidden, m.vocab, bias=False)
        mb = m.mtp_block()
        self.enorm, self.hnorm = RMSNorm(m.hidden, m.norm_eps), RMSNorm(m.hidden, m.norm_eps)
        self.eh_proj = nn.Linear(2 * m.hidden, m.hidden, bias=False)
        self.mtp_block = Block(m, m.attention[mb.attention], m.ffn[mb.ffn], scale)
        self.mtp_norm = RMSNorm(m.hidden, m.norm_eps)
        self.register_buffer("freqs_cis", freqs_cis)

    def forward(self, tokens, labels):
        s = tokens.size(1)
        fc = self.freqs_cis[:s]
        h = self.embed_tokens(tokens)
        aux = 0.0
        for layer in self.layers:
            h, a = layer(h, fc)
            aux = aux + a
        loss = F.cross_entropy(self.lm_head(self.norm(h)).flatten(0, 1), labels.flatten())
        emb = self.embed_tokens(labels)  # token i+1 for position i
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], -1))
        x, a = self.mtp_block(x, fc)
        mtp = F.cross_entropy(
            self.lm_head(self.mtp_norm(x))[:, : s - 1].flatten(0, 1), labels[:, 1:].flatten()
        )
        return loss + self.m.mtp.loss_weight * mtp + aux + a


def copy_weights(runtime_model, eager: EagerModel) -> None:
    """Runtime names -> eager names (routed experts unstacked, MTP flattened)."""
    src = dict(runtime_model.named_parameters())
    with torch.no_grad():
        for name, p in eager.named_parameters():
            key = name.replace("mtp_block.", "mtp.0.block.").replace(
                "mtp_norm.", "mtp.0.shared_head.norm."
            )
            for part in ("enorm", "hnorm", "eh_proj"):
                key = key.replace(f"{part}.", f"mtp.0.{part}.", 1) if key.startswith(part) else key
            if ".experts." in key:
                prefix, rest = key.split(".experts.")
                e, proj, _ = rest.split(".")
                p.copy_(src[f"{prefix}.experts.{proj}"][int(e)])
            else:
                p.copy_(src[key])


def eager_step(model, opt, tokens, labels, rate):
    opt.zero_grad(set_to_none=True)
    loss = model(tokens, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, MoE):
                load = mod.load.float()
                mod.gate.e_score_correction_bias += torch.sign(load.mean() - load) * rate
                mod.load.zero_()
    return float(loss.detach())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    raw = tiny_plan(
        pp=1, dp=1, ep=1, num_microbatches=1, micro_batch=args.batch, num_layers=args.layers
    )
    raw["train"]["lr_schedule"] = {"kind": "constant"}
    plan = parse_plan(raw)
    trainer = Trainer.reference(plan)
    runtime_model = trainer.modules[0]
    mla = next(m for m in runtime_model.modules() if m.__class__.__name__ == "MLA")
    angles = torch.atan2(mla.rotary.sin_SR2, mla.rotary.cos_SR2)
    eager = EagerModel(plan, torch.polar(torch.ones_like(angles), angles), mla.softmax_scale)
    copy_weights(runtime_model, eager)
    o = plan.train.optimizer
    decay = [p for p in eager.parameters() if p.dim() > 1]
    no_decay = [p for p in eager.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)  # fmt: skip
    rate = plan.model.ffn["moe"].bias_update_rate

    times = {"runtime": [], "eager": []}
    first = None
    for step in range(args.steps + 3):
        rows = trainer.sharder.step_batch(trainer.data, trainer.step_index)
        tokens, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        t0 = time.perf_counter()
        loss_rt = trainer.step()["loss"]
        t1 = time.perf_counter()
        loss_eager = eager_step(eager, opt, tokens, labels, rate)
        t2 = time.perf_counter()
        if first is None:
            first = (loss_rt, loss_eager)
            if not math.isclose(loss_rt, loss_eager, rel_tol=1e-4):
                print(
                    f"the two models disagree: runtime loss {loss_rt:.6f}, eager {loss_eager:.6f}"
                )
                return 1
        if step >= 3:  # warm-up
            times["runtime"].append(t1 - t0)
            times["eager"].append(t2 - t1)
    rt, eg = statistics.median(times["runtime"]), statistics.median(times["eager"])
    params = sum(p.numel() for p in eager.parameters())
    print(f"model: {args.layers} layers, {params / 1e6:.2f}M parameters, "
          f"{args.batch} x {plan.train.seq_len} tokens/step, "
          f"{args.threads} thread(s)")  # fmt: skip
    print(f"step-0 loss: runtime {first[0]:.6f}  eager {first[1]:.6f}")
    print(f"last loss:   runtime {loss_rt:.6f}  eager {loss_eager:.6f}")
    print(
        f"median step: runtime {rt * 1e3:.1f} ms  eager {eg * 1e3:.1f} ms  ratio {rt / eg:.3f}x (target <= 1.10x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
