"""Model formulas: parameters, active parameters, KV cache and training FLOPs per token.

Two layers of API:

* Per-op formulas (`mla_linears`, `gqa_linears`, `swiglu_linears`,
  `attention_core_flops`, ...) are plain arithmetic on their arguments: call them
  with ints for numbers or with sympy Symbols for formulas. The graph's lowering
  pass takes each op's shape, parameters and FLOPs from these, so the graph and
  the report agree.
* `build_model(spec, q)` turns a spec into `Piece`s (one per attention and FFN
  definition, the embedding, the head, one MTP module); `model_figures` records
  the model figures from them in `q` (a `Quantities`).

FLOPs convention (the one that reproduces the DeepSeek-V3 report's 250 GFLOPs per
token; docs/report.md): training FLOPs per token = 6 x matmul
parameters touched per token (output head included, embedding excluded) + 3 x
the attention core's forward FLOPs (QK^T and PV) at the causal average context
S/2. MTP is not part of the convention; it is reported separately.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .symbols import Quantities, ssum

# ----------------------------------------------------------------------------- per-op formulas


def mla_linears(d, n_h, d_cq, d_c, d_nope, d_r, d_v) -> dict[str, tuple[Any, Any]]:
    """MLA projections as {name: (in, out)}; `d_cq == 0` means a plain q projection."""
    q_out = n_h * (d_nope + d_r)
    shapes: dict[str, tuple[Any, Any]] = {}
    if d_cq == 0:
        shapes["wq"] = (d, q_out)
    else:
        shapes["wq_a"] = (d, d_cq)
        shapes["wq_b"] = (d_cq, q_out)
    shapes["wkv_a"] = (d, d_c + d_r)  # compressed kv latent + the shared RoPE key
    shapes["wkv_b"] = (d_c, n_h * (d_nope + d_v))
    shapes["wo"] = (n_h * d_v, d)
    return shapes


def mla_norm_params(d, d_cq, d_c):
    """RMSNorm weights of an MLA block: pre-attention norm, q latent norm, kv latent norm."""
    return d + d_cq + d_c


def gqa_linears(d, n_h, n_kv, d_h) -> dict[str, tuple[Any, Any]]:
    """Multi-head / grouped-query attention projections as {name: (in, out)}."""
    return {"wq": (d, n_h * d_h), "wk": (d, n_kv * d_h), "wv": (d, n_kv * d_h),
            "wo": (n_h * d_h, d)}


def gqa_other_params(d, n_h, n_kv, d_h, qkv_bias: bool):
    """Pre-attention norm, plus q/k/v biases when the model has them."""
    return d + ((n_h + 2 * n_kv) * d_h if qkv_bias else 0)


def swiglu_linears(d, d_ff) -> dict[str, tuple[Any, Any]]:
    """A SwiGLU FFN (one dense FFN or one expert): gate w1, up w3, down w2."""
    return {"w1": (d, d_ff), "w3": (d, d_ff), "w2": (d_ff, d)}


def router_linear(d, num_experts) -> tuple[Any, Any]:
    """The MoE gate: one score per routed expert."""
    return (d, num_experts)


def attention_core_flops(n_h, d_qk, d_v, context):
    """Forward FLOPs per token of QK^T and PV with `context` keys attended (S/2 when causal)."""
    return 2 * n_h * (d_qk + d_v) * context


def attention_context(seq_len, causal: bool = True):
    """Keys a query attends to on average: S/2 with causal masking (the convention), else S."""
    return seq_len / 2 if causal else seq_len


def mla_kv_elements(d_c, d_r):
    """KV-cache elements per token per MLA layer: the kv latent and the RoPE key."""
    return d_c + d_r


def gqa_kv_elements(n_kv, d_h):
    """KV-cache elements per token per MHA/GQA layer: K and V of every KV head."""
    return 2 * n_kv * d_h


def embedding_params(vocab, d):
    return vocab * d


def mtp_extra_params(d):
    """An MTP module besides its transformer block: two input norms, the 2d -> d projection
    and its final norm (embedding and output head are shared with the main model)."""
    return 2 * d + 2 * d * d + d


def train_flops(matmul_active, core_flops):
    """Training FLOPs per token: 6 x matmul params (fwd, dgrad, wgrad) + 3 x core forward."""
    return 6 * matmul_active + 3 * core_flops


# ----------------------------------------------------------------------------- pieces


@dataclasses.dataclass(frozen=True)
class Linear:
    """`count` copies of an (n_in -> n_out) weight, `active` of them used per token."""

    name: str
    n_in: Any
    n_out: Any
    count: Any = 1
    active: Any = 1
    component: str = "linear"  # linear | router | head | mtp_projection
    expert: bool = False  # a routed expert's weight: sharded over expert-parallel ranks

    @property
    def params(self):
        return self.count * self.n_in * self.n_out

    @property
    def active_params(self):
        return self.active * self.n_in * self.n_out


@dataclasses.dataclass(frozen=True)
class Piece:
    """What one piece of the model holds and computes, per token.

    A piece is an attention definition, an FFN definition, the embedding, the
    head (final norm + output projection) or one MTP module's own parts.
    `others` are non-matmul parameters: (name, params, component), component
    `norm`, `bias` or `embedding`.
    """

    name: str
    kind: str  # mla | gqa | dense | moe | embedding | head | mtp
    linears: tuple[Linear, ...] = ()
    others: tuple[tuple[str, Any, str], ...] = ()
    core_flops: Any = 0  # attention core forward FLOPs per token, causal
    core_flops_full: Any = 0  # the same without causal masking
    kv_elements: Any = 0  # KV-cache elements per token
    spec: Any = None  # the dsl.spec object it came from (MLA, GQA, DenseFFN, MoE)
    dims: dict = dataclasses.field(default_factory=dict)  # its sizes, as numbers or symbols

    @property
    def key(self) -> str:
        """Unique within a model: `attention.mla`, `ffn.moe`, `embedding`, `head`, `mtp`."""
        if self.kind in ("mla", "gqa"):
            return f"attention.{self.name}"
        if self.kind in ("dense", "moe"):
            return f"ffn.{self.name}"
        return self.kind

    @property
    def params(self):
        return ssum(lin.params for lin in self.linears) + ssum(o[1] for o in self.others)

    @property
    def active(self):
        return ssum(lin.active_params for lin in self.linears) + ssum(o[1] for o in self.others)

    @property
    def matmul_active(self):
        return ssum(lin.active_params for lin in self.linears)

    @property
    def expert_params(self):
        return ssum(lin.params for lin in self.linears if lin.expert)

    def train_flops(self, causal: bool = True):
        return train_flops(self.matmul_active, self.core_flops if causal else self.core_flops_full)


def _linears(shapes: dict, **kw) -> tuple[Linear, ...]:
    prefix = kw.pop("prefix", "")
    return tuple(Linear(prefix + n, i, o, **kw) for n, (i, o) in shapes.items())


def attention_piece(att, d, S, q: Quantities, sfx: str = "") -> Piece:
    """The Piece of one attention definition (MLA or GQA), symbols named with suffix `sfx`."""
    path = f"model.attention.{att.name}"
    n_h = q.sym("n_h" + sfx, att.heads, f"{path}.heads")
    if att.kind == "mla":
        d_cq = q.sym("d_cq" + sfx, att.q_lora_rank, f"{path}.q_lora_rank") if att.q_lora_rank else 0
        d_c = q.sym("d_c" + sfx, att.kv_lora_rank, f"{path}.kv_lora_rank")
        d_nope = q.sym("d_nope" + sfx, att.qk_nope_dim, f"{path}.qk_nope_dim")
        d_r = q.sym("d_r" + sfx, att.qk_rope_dim, f"{path}.qk_rope_dim")
        d_v = q.sym("d_v" + sfx, att.v_dim, f"{path}.v_dim")
        linears = _linears(mla_linears(d, n_h, d_cq, d_c, d_nope, d_r, d_v))
        others = (("norms", mla_norm_params(d, d_cq, d_c), "norm"),)
        d_qk, kv = d_nope + d_r, mla_kv_elements(d_c, d_r)
        dims = {"d": d, "n_h": n_h, "d_cq": d_cq, "d_c": d_c, "d_nope": d_nope, "d_r": d_r,
                "d_v": d_v}
    else:
        n_kv = q.sym("n_kv" + sfx, att.kv_heads, f"{path}.kv_heads")
        d_h = q.sym("d_h" + sfx, att.head_dim, f"{path}.head_dim")
        linears = _linears(gqa_linears(d, n_h, n_kv, d_h))
        others = (("norm", d, "norm"),)
        if att.qkv_bias:
            others += (("qkv_bias", gqa_other_params(d, n_h, n_kv, d_h, True) - d, "bias"),)
        d_qk, d_v, kv = d_h, d_h, gqa_kv_elements(n_kv, d_h)
        dims = {"d": d, "n_h": n_h, "n_kv": n_kv, "d_h": d_h}
    return Piece(att.name, att.kind, linears, others,
                 core_flops=attention_core_flops(n_h, d_qk, d_v, attention_context(S, True)),
                 core_flops_full=attention_core_flops(n_h, d_qk, d_v, attention_context(S, False)),
                 kv_elements=kv, spec=att, dims=dims)


def ffn_piece(ffn, d, q: Quantities, sfx: str = "") -> Piece:
    """The Piece of one FFN definition (dense SwiGLU or MoE)."""
    path = f"model.ffn.{ffn.name}"
    norm = (("norm", d, "norm"),)
    if ffn.kind == "dense":
        d_ff = q.sym("d_ff" + sfx, ffn.intermediate, f"{path}.intermediate")
        return Piece(ffn.name, "dense", _linears(swiglu_linears(d, d_ff)), norm, spec=ffn,
                     dims={"d": d, "d_ff": d_ff})
    E = q.sym("E" + sfx, ffn.routed, f"{path}.routed")
    k = q.sym("k" + sfx, ffn.top_k, f"{path}.top_k")
    d_e = q.sym("d_e" + sfx, ffn.intermediate, f"{path}.intermediate")
    linears = (Linear("router", *router_linear(d, E), component="router"),)
    linears += _linears(swiglu_linears(d, d_e), prefix="expert.", count=E, active=k, expert=True)
    dims = {"d": d, "E": E, "k": k, "d_e": d_e, "E_s": 0, "d_s": 0}
    if ffn.shared:
        E_s = q.sym("E_s" + sfx, ffn.shared, f"{path}.shared")
        d_s = (d_e if ffn.shared_intermediate == ffn.intermediate else
               q.sym("d_s" + sfx, ffn.shared_intermediate, f"{path}.shared_intermediate"))
        linears += _linears(swiglu_linears(d, d_s), prefix="shared.", count=E_s, active=E_s)
        dims.update(E_s=E_s, d_s=d_s)
    return Piece(ffn.name, "moe", linears, norm, spec=ffn, dims=dims)


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """Layers built as block(attention, ffn); `count` is a symbol or a number."""

    key: str  # "mla+moe"
    attention: Piece
    ffn: Piece
    count: Any
    indices: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """Everything later families need about the model, in `q`'s terms."""

    d: Any
    V: Any
    S: Any
    embedding: Piece
    head: Piece
    mtp: Piece | None  # one MTP module's own parts (its block is `mtp_block`)
    mtp_block: LayerKind | None
    mtp_depth: int
    attentions: dict[str, Piece]
    ffns: dict[str, Piece]
    kinds: tuple[LayerKind, ...]
    kind_of_layer: tuple[str, ...]  # layer index -> LayerKind.key
    layers_of_attention: dict[str, Any]  # attention name -> how many layers use it
    params_of: dict = dataclasses.field(default_factory=dict)  # piece name -> P_* symbol

    def kind(self, key: str) -> LayerKind:
        return next(k for k in self.kinds if k.key == key)


def _suffixes(names) -> dict[str, str]:
    names = list(names)
    return {n: ("" if len(names) == 1 else f"_{n}") for n in names}


def _count_name(att: str, ffn: str, atts: set, ffns: set, single: bool) -> str:
    if single:
        return "L"
    if len(atts) == 1:
        return f"L_{ffn}"
    if len(ffns) == 1:
        return f"L_{att}"
    return f"L_{att}_{ffn}"


def build_model(spec, q: Quantities) -> ModelCosts:
    """Pieces of `spec`'s model, with its figures recorded in `q` (section `model`)."""
    m = spec.model
    d = q.sym("d", m.hidden, "model.hidden")
    V = q.sym("V", m.vocab, "model.vocab")
    if spec.train is not None:
        S = q.sym("S", spec.train.seq_len, "train.seq_len")
    else:
        S = q.sym("S", m.max_seq, "model.max_seq")
    att_sfx = _suffixes(m.attentions)
    dense_names = [n for n, f in m.ffns.items() if f.kind == "dense"]
    moe_names = [n for n, f in m.ffns.items() if f.kind == "moe"]
    ffn_sfx = {**_suffixes(dense_names), **_suffixes(moe_names)}
    attentions = {n: attention_piece(a, d, S, q, att_sfx[n]) for n, a in m.attentions.items()}
    ffns = {n: ffn_piece(f, d, q, ffn_sfx[n]) for n, f in m.ffns.items()}

    order: dict[tuple[str, str], list[int]] = {}
    for i, layer in enumerate(m.layers):
        order.setdefault((layer.attention, layer.ffn), []).append(i)
    atts = {a for a, _ in order}
    fs = {f for _, f in order}
    kinds = []
    for (a, f), idx in order.items():
        name = _count_name(a, f, atts, fs, len(order) == 1)
        count = q.sym(name, len(idx), f"model.layers ({a}+{f})")
        kinds.append(LayerKind(f"{a}+{f}", attentions[a], ffns[f], count, tuple(idx)))
    kind_of_layer = tuple(f"{lay.attention}+{lay.ffn}" for lay in m.layers)
    if len(atts) == 1:
        per_att = {next(iter(atts)): q.sym("L", m.num_layers, "model.layers (all)")}
    else:
        per_att = {a: ssum(k.count for k in kinds if k.attention.name == a) for a in sorted(atts)}

    embedding = Piece("embedding", "embedding", (), (("embedding", embedding_params(V, d),
                                                         "embedding"),), dims={"d": d, "V": V})
    head_linears = () if m.tie_embeddings else (Linear("head", d, V, component="head"),)
    head = Piece("head", "head", head_linears, (("final_norm", d, "norm"),), dims={"d": d, "V": V})
    mtp = mtp_block = None
    depth = q.sym("D", m.mtp.depth, "model.mtp.depth") if m.mtp.depth else 0
    if depth:
        last = kinds[[k.key for k in kinds].index(kind_of_layer[-1])]
        mtp_block = dataclasses.replace(last, count=1, indices=())
        mtp = Piece("mtp", "mtp", (Linear("eh_proj", 2 * d, d, component="mtp_projection"),),
                    (("norms", 3 * d, "norm"),), dims={"d": d, "V": V})
    return ModelCosts(d, V, S, embedding, head, mtp, mtp_block, depth, attentions, ffns,
                      tuple(kinds), kind_of_layer, per_att)
