"""Pass `lower`: Spec -> op graph of one training micro-batch.

Embedding, every decoder layer (MLA or MHA/GQA attention; dense SwiGLU FFN or
MoE with router, routed experts as one grouped op, shared experts), the final
norm, head and loss, and the MTP modules (DeepSeek-V3: enorm, hnorm,
eh_proj over the concatenation, one block, the shared head). Everything is in
the policy's default dtype here; `assign_precision` decides formats.

Shapes, parameter counts and FLOPs come from the report's per-op formulas
(`compiler.costs.model`: `mla_linears`, `swiglu_linears`, `attention_core_flops`,
...), so the graph and `dsvc report` agree: a GEMM of K -> N costs 2 T K N
forward, the same again for dgrad and for wgrad; the attention core costs
T x 2 heads (d_qk + d_v) x S/2 forward (causal) and twice that backward;
element-wise ops count no FLOPs (their cost is memory traffic, which the
partitioner's time model adds from their tensor sizes). Each GEMM-like op
lists its weight matrices in `attrs["weights"]` as (in, out, copies).
Expressions come from cached helpers, so every layer of a kind shares them.
`saved_bytes` is what the runtime's autograd keeps of the op for its backward per
micro-batch, under the spec's `train.recompute`, as the code that runs the op keeps it:
the generated program for the decoder blocks it covers, the eager modules elsewhere
(`compiler.costs.activations`). The program's FP8 weight copies are made once per step,
not per micro-batch, and are not on the ops (the report charges them once per device).
"""

from __future__ import annotations

import functools

import sympy

from dsvc.compiler.costs import model_costs as formulas
from dsvc.compiler.costs.activations import GPU, Kept
from dsvc.compiler.ir import DTYPE_BYTES, Graph, Op, T, tensor


def tokens_per_microbatch(spec) -> tuple[int, int]:
    """(tokens in one micro-batch, sequence length): micro_batch x seq_len.

    A spec without a `train` block is lowered for one sequence of `max_seq`.
    """
    if spec.train is not None:
        return spec.train.micro_batch * spec.train.seq_len, spec.train.seq_len
    return spec.model.max_seq, spec.model.max_seq


@functools.cache
def gemm_flops(k: int, n: int) -> sympy.Expr:
    """Forward FLOPs of a K -> N linear over T tokens (also its dgrad and its wgrad)."""
    return 2 * T * k * n


@functools.cache
def attention_core_flops(heads: int, d_qk: int, d_v: int, seq: int) -> sympy.Expr:
    """Forward FLOPs of QK^T and PV over T tokens, causal (average context seq / 2)."""
    context = formulas.attention_context(sympy.Integer(seq), causal=True)
    return T * formulas.attention_core_flops(heads, d_qk, d_v, context)


def lower(spec, device: str = GPU, program: str = "generated") -> Graph:
    """The op graph of one micro-batch of `spec` (pure: the spec is not touched). `device`:
    whose kernels' saved tensors the ops carry (a CPU's, for tests that count them);
    `program`: what runs the decoder blocks (`Graph.program`: the generated program where
    it covers them, or "eager"), whose saved tensors they carry and whose kernels the
    simulator charges."""
    tokens, seq = tokens_per_microbatch(spec)
    b = _Builder(spec, Graph(spec, tokens), seq, device, program)
    b.graph.program = program
    b.build()
    b.graph.passes = ("lower",)
    return b.graph


class _Builder:
    def __init__(self, spec, graph: Graph, seq: int, device: str, program: str = "generated"):
        self.spec, self.graph, self.seq = spec, graph, seq
        self.m = spec.model
        self.dt = spec.precision.default
        self.wbytes = DTYPE_BYTES[spec.precision.default]
        self.count = 0
        recompute = spec.train.recompute if spec.train is not None else "none"
        self.kept = Kept(spec.precision, recompute, device, program)
        self.ep = spec.parallel.expert if spec.parallel is not None else 1
        self.saved: dict = {}  # op name suffix -> saved bytes, for the block being built

    # -- one op
    def op(self, name, kind, block, layer, feeds, outputs, *, span, fwd=0, dgrad=0, wgrad=0,
           params=0, names=(), dtype=None, **attrs) -> str:
        inputs = tuple(self.graph.op(src).outputs[port] for src, port in feeds)
        self.count += 1
        saved = self.saved.get(name.rsplit(".", 1)[-1], 0)
        op = Op(name=name, kind=kind, block=block, layer=layer, inputs=inputs,
                outputs=tuple(outputs), dtype=dtype or self.dt, flops_fwd=fwd, flops_dgrad=dgrad,
                flops_wgrad=wgrad, param_count=params, param_bytes=int(params * self.wbytes),
                params=tuple(names), span=span, seq=float(self.count), attrs=attrs,
                saved_bytes=sympy.sympify(saved))
        self.graph.add(op, feeds)
        return name

    def linear(self, name, block, layer, src, shape, *, role, span, component="linear",
               pname="", bias=False, tied=None):
        """A K -> N linear (`shape` = (K, N)); `tied` names the op whose weight it shares."""
        k, n = shape
        f = gemm_flops(k, n)
        params = 0 if tied else k * n + (n if bias else 0)
        names = () if tied else ((pname + ".weight",) + ((pname + ".bias",) if bias else ()))
        extra = {"tied_to": tied} if tied else {"weights": ((k, n, 1),)}
        if bias and not tied:
            extra["bias"] = n
        return self.op(name, "linear", block, layer, [src], [tensor(self.dt, T, n)], span=span,
                       fwd=f, dgrad=f, wgrad=f, params=params, names=names,
                       role=role, component=component,
                       in_features=k, out_features=n, **extra)

    def norm(self, name, block, layer, src, dim, *, pname, span, **attrs):
        return self.op(name, "norm", block, layer, [src], [tensor(self.dt, T, dim)], span=span,
                       params=dim, names=(pname + ".weight",), component="norm",
                       eps=self.m.norm.eps, dim=dim, **attrs)

    # -- the model
    def build(self) -> None:
        m, sp = self.m, self.spec
        vspan = sp.span("model.vocab")
        self.op("tokens", "input", "embed", None, [], [tensor("int32", T)], span=sp.span("train"),
                dtype="int32", what="token ids of one micro-batch")
        self.saved = self.kept.embedding(T)
        x = self.op("embed", "embedding", "embed", None, [("tokens", 0)],
                    [tensor(self.dt, T, m.hidden)], span=vspan,
                    params=formulas.embedding_params(m.vocab, m.hidden),
                    names=("model.embed_tokens.weight",), component="embedding",
                    vocab=m.vocab)
        for i in range(m.num_layers):
            x = self.block(f"L{i}", "layer", i, (x, 0), m.attention_of(i), m.ffn_of(i),
                           f"model.layers.{i}")
        hidden = x
        self.op("labels", "input", "head", None, [], [tensor("int32", T)], span=sp.span("train"),
                dtype="int32", what="next-token ids of one micro-batch")
        losses = [self.head_and_loss("", (hidden, 0), "model.norm", "lm_head", vspan)]
        last = m.layers[-1] if m.layers else None
        for k in range(m.mtp.depth if last else 0):
            hidden = self.mtp_module(k, (hidden, 0), m.attentions[last.attention],
                                     m.ffns[last.ffn])
            prefix = f"model.layers.{m.num_layers + k}.shared_head"
            losses.append(self.head_and_loss(f"mtp{k}.", (hidden, 0), prefix + ".norm",
                                             prefix + ".head", sp.span("model.mtp"), mtp=k))
        if len(losses) > 1:
            self.op("loss_total", "add", "head", None, [(n, 0) for n in losses],
                    [tensor("fp32", )], span=sp.span("model.mtp.loss_weight"), dtype="fp32",
                    weights=(1.0,) + (m.mtp.loss_weight / m.mtp.depth,) * m.mtp.depth)

    def head_and_loss(self, prefix, src, norm_name, head_name, span, mtp=None):
        m = self.m
        self.saved = self.kept.head(T, m.hidden, m.vocab)
        block, layer = ("head", None) if mtp is None else ("mtp", m.num_layers + mtp)
        n = self.norm(prefix + "final_norm", block, layer, src, m.hidden, pname=norm_name,
                      span=self.spec.span("model.norm"))
        tied = "embed" if m.tie_embeddings else None
        if mtp is not None:
            tied = "head" if not m.tie_embeddings else "embed"  # DeepSeek-V3 shares the head
        h = self.linear(prefix + "head", block, layer, (n, 0), (m.hidden, m.vocab), role="head",
                        component="head", pname=head_name, span=span, tied=tied)
        return self.op(prefix + "loss", "loss", block, layer, [(h, 0), ("labels", 0)],
                       [tensor("fp32", )], span=span, dtype="fp32",
                       label_shift=0 if mtp is None else mtp + 1)

    def mtp_module(self, k, src, att, ffn) -> str:
        m, sp = self.m, self.spec
        layer, p, span = m.num_layers + k, f"mtp{k}.", sp.span("model.mtp")
        pname = f"model.layers.{layer}"
        self.saved = self.kept.mtp(T, m.hidden)
        e = self.op(p + "embed", "embedding", "mtp", layer, [("labels", 0)],
                    [tensor(self.dt, T, m.hidden)], span=span,
                    component="embedding", vocab=m.vocab, tied_to="embed", label_shift=k)
        en = self.norm(p + "enorm", "mtp", layer, (e, 0), m.hidden, pname=pname + ".enorm",
                       span=span)
        hn = self.norm(p + "hnorm", "mtp", layer, src, m.hidden, pname=pname + ".hnorm",
                       span=span)
        cat = self.op(p + "concat", "concat", "mtp", layer, [(en, 0), (hn, 0)],
                      [tensor(self.dt, T, 2 * m.hidden)], span=span)
        x = self.linear(p + "eh_proj", "mtp", layer, (cat, 0), (2 * m.hidden, m.hidden),
                        role="eh_proj", component="mtp_projection", pname=pname + ".eh_proj",
                        span=span)
        return self.block(p.rstrip("."), "mtp", layer, (x, 0), att, ffn, pname)

    # -- one decoder layer
    def block(self, p, block, layer, src, att, ffn, pname) -> str:
        sp, hd = self.spec, self.m.hidden
        self.saved = self.block_saved(att, ffn)
        an = self.norm(f"{p}.attn_norm", block, layer, src, hd, pname=pname + ".input_layernorm",
                       span=sp.span("model.norm"))
        aspan = sp.span(f"model.attention.{att.name}")
        if att.kind == "mla":
            o = self.mla(f"{p}.attn", block, layer, (an, 0), att, pname + ".self_attn", aspan)
        else:
            o = self.gqa(f"{p}.attn", block, layer, (an, 0), att, pname + ".self_attn", aspan)
        x = self.op(f"{p}.attn_add", "add", block, layer, [src, (o, 0)], [tensor(self.dt, T, hd)],
                    span=aspan)
        fn = self.norm(f"{p}.ffn_norm", block, layer, (x, 0), hd,
                       pname=pname + ".post_attention_layernorm", span=sp.span("model.norm"))
        fspan = sp.span(f"model.ffn.{ffn.name}")
        if ffn.kind == "dense":
            outs = [self.dense(f"{p}.ffn", block, layer, (fn, 0), ffn, pname + ".mlp", fspan)]
        else:
            outs = self.moe(f"{p}.moe", block, layer, (fn, 0), ffn, pname + ".mlp", fspan)
        return self.op(f"{p}.ffn_add", "add", block, layer, [(x, 0)] + [(o, 0) for o in outs],
                       [tensor(self.dt, T, hd)], span=fspan)

    def block_saved(self, att, ffn) -> dict:
        """Saved bytes of a decoder block's ops by name suffix (`compiler.costs.activations`),
        as the generated program keeps them where it runs the block, else the eager
        modules; under full recomputation only the block's input, kept by its first op."""
        k, g = self.kept, _dims(self.m.hidden, att, ffn)
        program = k.runs_program(ffn)
        out = k.attention(att.kind, T, self.seq, g, program)
        local = ffn.routed // self.ep if ffn.kind == "moe" else 1
        parts, rows = k.ffn(ffn.kind, T, g, local, program)
        out.update(parts)
        if rows:
            out["experts"] = out["experts"] + rows
        return out

    def mla(self, p, block, layer, src, a, pname, span) -> str:
        hd, H = self.m.hidden, a.heads
        dqk = a.qk_nope_dim + a.qk_rope_dim
        w = formulas.mla_linears(hd, H, a.q_lora_rank, a.kv_lora_rank, a.qk_nope_dim,
                                 a.qk_rope_dim, a.v_dim)
        if a.q_lora_rank:
            q = self.linear(f"{p}.q_down", block, layer, src, w["wq_a"], role="q_a_proj",
                            pname=pname + ".q_a_proj", span=span)
            q = self.norm(f"{p}.q_norm", block, layer, (q, 0), a.q_lora_rank,
                          pname=pname + ".q_a_layernorm", span=span)
            q = self.linear(f"{p}.q_up", block, layer, (q, 0), w["wq_b"], role="q_b_proj",
                            pname=pname + ".q_b_proj", span=span)
        else:
            q = self.linear(f"{p}.q_proj", block, layer, src, w["wq"], role="q_proj",
                            pname=pname + ".q_proj", span=span)
        kvd = self.linear(f"{p}.kv_down", block, layer, src, w["wkv_a"],
                          role="kv_a_proj_with_mqa", pname=pname + ".kv_a_proj_with_mqa", span=span)
        # kv_norm reads the latent slice of kv_down's output; the rope key goes to `rope`.
        kvn = self.norm(f"{p}.kv_norm", block, layer, (kvd, 0), a.kv_lora_rank,
                        pname=pname + ".kv_a_layernorm", span=span, reads="[:, :kv_lora_rank]")
        kv = self.linear(f"{p}.kv_up", block, layer, (kvn, 0), w["wkv_b"], role="kv_b_proj",
                         pname=pname + ".kv_b_proj", span=span)
        r = self.op(f"{p}.rope", "rope", block, layer, [(q, 0), (kvd, 0)],
                    [tensor(self.dt, T, H * dqk), tensor(self.dt, T, a.qk_rope_dim)], span=span,
                    rope=self.m.rope.kind, rotary_dim=a.qk_rope_dim)
        c = self.core(f"{p}.core", block, layer, [(r, 0), (kv, 0), (r, 1)], H, dqk, a.v_dim, span)
        return self.linear(f"{p}.o_proj", block, layer, (c, 0), w["wo"], role="o_proj",
                           pname=pname + ".o_proj", span=span)

    def gqa(self, p, block, layer, src, a, pname, span) -> str:
        d, bias = a.head_dim, a.qkv_bias
        w = formulas.gqa_linears(self.m.hidden, a.heads, a.kv_heads, d)
        q, k, v = (self.linear(f"{p}.{n}_proj", block, layer, src, w[f"w{n}"], role=f"{n}_proj",
                               pname=f"{pname}.{n}_proj", span=span, bias=bias) for n in "qkv")
        r = self.op(f"{p}.rope", "rope", block, layer, [(q, 0), (k, 0)],
                    [tensor(self.dt, T, a.heads * d), tensor(self.dt, T, a.kv_heads * d)],
                    span=span, rope=self.m.rope.kind, rotary_dim=d)
        c = self.core(f"{p}.core", block, layer, [(r, 0), (r, 1), (v, 0)], a.heads, d, d, span,
                      kv_heads=a.kv_heads)
        return self.linear(f"{p}.o_proj", block, layer, (c, 0), w["wo"], role="o_proj",
                           pname=pname + ".o_proj", span=span)

    def core(self, name, block, layer, feeds, heads, dqk, dv, span, **attrs):
        f = attention_core_flops(heads, dqk, dv, self.seq)
        return self.op(name, "attention_core", block, layer, feeds,
                       [tensor(self.dt, T, heads * dv)], span=span, fwd=f, dgrad=2 * f,
                       component="attention_core",
                       heads=heads, causal=True, seq_len=self.seq, **attrs)

    def dense(self, p, block, layer, src, f, pname, span) -> str:
        w = formulas.swiglu_linears(self.m.hidden, f.intermediate)
        g = self.linear(f"{p}.gate", block, layer, src, w["w1"], role="gate_proj",
                        pname=pname + ".gate_proj", span=span)
        u = self.linear(f"{p}.up", block, layer, src, w["w3"], role="up_proj",
                        pname=pname + ".up_proj", span=span)
        i = f.intermediate
        a = self.op(f"{p}.act", "act", block, layer, [(g, 0), (u, 0)], [tensor(self.dt, T, i)],
                    span=span, act=f.act)
        return self.linear(f"{p}.down", block, layer, (a, 0), w["w2"], role="down_proj",
                           pname=pname + ".down_proj", span=span)

    def moe(self, p, block, layer, src, f, pname, span) -> list[str]:
        hd, k = self.m.hidden, f.top_k
        rk, rn = formulas.router_linear(hd, f.routed)
        rf = gemm_flops(rk, rn)
        r = self.op(f"{p}.router", "router", block, layer, [src],
                    [tensor("int32", T, k), tensor("fp32", T, k)], span=span, fwd=rf, dgrad=rf,
                    wgrad=rf, params=rk * rn, names=(pname + ".gate.weight",),
                    component="router", routed=f.routed,
                    weights=((rk, rn, 1),), score=f.score, top_k=k, groups=f.groups,
                    top_groups=f.top_groups, route_scale=f.route_scale, renormalize=f.renormalize,
                    balance=f.balance,
                    buffers=(pname + ".gate.e_score_correction_bias",) if f.balance == "bias" else ())
        ew = _swiglu_weights(hd, f.intermediate, f.routed)
        e = k * _swiglu_flops(hd, f.intermediate)  # top_k experts per token
        out = [self.op(f"{p}.experts", "experts", block, layer, [src, (r, 0), (r, 1)],
                       [tensor(self.dt, T, hd)], span=span, fwd=e, dgrad=e, wgrad=e,
                       params=sum(i * o * c for i, o, c in ew),
                       names=tuple(f"{pname}.experts.*.{w}_proj.weight" for w in ("gate", "up", "down")),
                       role="experts",
                       component="linear", weights=ew, routed=f.routed, top_k=k,
                       intermediate=f.intermediate, ffn=f.name, placement=None)]
        if f.shared:
            sw = _swiglu_weights(hd, f.shared_intermediate, f.shared)
            s = f.shared * _swiglu_flops(hd, f.shared_intermediate)
            si = f.shared * f.shared_intermediate
            out.append(self.op(f"{p}.shared", "swiglu_ffn", block, layer, [src],
                               [tensor(self.dt, T, hd)], span=span, fwd=s, dgrad=s, wgrad=s,
                               params=sum(i * o * c for i, o, c in sw),
                               names=tuple(f"{pname}.shared_experts.{w}_proj.weight"
                                           for w in ("gate", "up", "down")),
                               role="shared_experts",
                               component="linear", weights=sw, intermediate=si, shared=f.shared))
        return out


def _swiglu_weights(hidden: int, inter: int, copies: int) -> tuple:
    w = formulas.swiglu_linears(hidden, inter)
    return tuple((*w[n], copies) for n in ("w1", "w3", "w2"))


@functools.cache
def _swiglu_flops(hidden: int, inter: int) -> sympy.Expr:
    """Forward FLOPs of one SwiGLU expert over T tokens (three GEMMs)."""
    w = formulas.swiglu_linears(hidden, inter)
    return sum((gemm_flops(*w[n]) for n in ("w1", "w3", "w2")), sympy.Integer(0))


# ----------------------------------------------------------------------------- saved activations


def _dims(d: int, att, ffn) -> dict:
    """The sizes `compiler.costs.activations.Kept` reads, from the spec's definitions."""
    if att.kind == "mla":
        g = {"d": d, "n_h": att.heads, "d_cq": att.q_lora_rank, "d_c": att.kv_lora_rank,
             "d_nope": att.qk_nope_dim, "d_r": att.qk_rope_dim, "d_v": att.v_dim}
    else:
        g = {"d": d, "n_h": att.heads, "n_kv": att.kv_heads, "d_h": att.head_dim}
    if ffn.kind == "dense":
        g["d_ff"] = ffn.intermediate
    else:
        g.update(E=ffn.routed, k=ffn.top_k, d_e=ffn.intermediate,
                 E_s=ffn.shared, d_s=ffn.shared_intermediate)
    return g
