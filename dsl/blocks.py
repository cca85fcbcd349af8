"""Readers for each top-level block: the schema of every key the language has.

Each reader checks its block's entries against a field table (see
`dsl/fields.py`) and returns keyword arguments for the Spec's records.
`docs/language.md` documents the same keys.
"""

from __future__ import annotations

from dsvc.dsl import ast
from dsvc.dsl import fields as F
from dsvc.dsl import spec as S
from dsvc.dsl.diagnostics import DiagnosticSink, did_you_mean
from dsvc.dsl.fields import Field
from dsvc.dsl.values import Evaluator

DTYPES = ("fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2")
ATTENTION_KINDS = ("mla", "gqa", "mha", "mqa")
FFN_KINDS = ("dense", "moe")


def read_all(by_kind: dict[str, ast.Block], sink, ev, spans, file):
    out = {}
    if "model" in by_kind:
        out["model"] = read_model(by_kind["model"], sink, ev, spans)
    if "precision" in by_kind:
        out["precision"] = read_precision(by_kind["precision"], sink, ev, spans)
    if "cluster" in by_kind:
        out["cluster"] = read_cluster(by_kind["cluster"], sink, ev, spans)
    if "train" in by_kind:
        out["train"] = read_train(by_kind["train"], sink, ev, spans)
    if "parallel" in by_kind:
        out["parallel"] = read_parallel(by_kind["parallel"], sink, ev, spans, out)
    if "decode" in by_kind:
        out["decode"] = read_decode(by_kind["decode"], sink, ev, spans)
    if any(v is None for v in out.values()):
        return None
    return out


def _label(block: ast.Block, sink: DiagnosticSink, required: bool, default: str) -> str:
    if block.label is None:
        if required:
            sink.error(f"`{block.kind}` needs a name", block.kind_span,
                       f"write `{block.kind} NAME {{ ... }}`")
        return default
    return block.label


def _split(entries):
    """Plain entries vs sub-blocks vs range entries."""
    plain = [e for e in entries if isinstance(e, (ast.Assign, ast.Const))]
    subs = [e for e in entries if isinstance(e, ast.Block)]
    ranges = [e for e in entries if isinstance(e, ast.RangeAssign)]
    return plain, subs, ranges


def _no_ranges(ranges, where, sink):
    for r in ranges:
        sink.error(f"index ranges are only allowed in `layers {{ }}`, not in {where}", r.span)


# ----------------------------------------------------------------------------- model

MODEL_KEYS = {
    "vocab": Field(F.integer(1), True, "vocabulary size"),
    "hidden": Field(F.integer(1), True, "model width"),
    "max_seq": Field(F.integer(1)),
    "tie_embeddings": Field(F.boolean()),
    "norm": Field(lambda v, s, k, key: v),
    "rope": Field(lambda v, s, k, key: v),
}
MLA_KEYS = {
    "kind": Field(F.choice(*ATTENTION_KINDS)),
    "heads": Field(F.integer(1), True),
    "q_lora_rank": Field(F.integer(0), True, "0 for a plain q projection"),
    "kv_lora_rank": Field(F.integer(1), True),
    "qk_nope_dim": Field(F.integer(1), True),
    "qk_rope_dim": Field(F.integer(1), True),
    "v_dim": Field(F.integer(1), True),
}
GQA_KEYS = {
    "kind": Field(F.choice(*ATTENTION_KINDS)),
    "heads": Field(F.integer(1), True),
    "kv_heads": Field(F.integer(1)),
    "head_dim": Field(F.integer(1)),
    "qkv_bias": Field(F.boolean()),
}
DENSE_KEYS = {
    "kind": Field(F.choice(*FFN_KINDS)),
    "intermediate": Field(F.integer(1), True),
    "act": Field(F.choice("swiglu")),
}
MOE_KEYS = {
    "kind": Field(F.choice(*FFN_KINDS)),
    "routed": Field(F.integer(1), True, "routed experts"),
    "shared": Field(F.integer(0)),
    "top_k": Field(F.integer(1), True, "experts per token"),
    "intermediate": Field(F.integer(1), True, "of one routed expert"),
    "shared_intermediate": Field(F.integer(1)),
    "score": Field(F.choice("softmax", "sigmoid")),
    "groups": Field(F.integer(1)),
    "top_groups": Field(F.integer(1)),
    "route_scale": Field(F.number(0, lo_open=True)),
    "renormalize": Field(F.boolean()),
    "balance": Field(lambda v, s, k, key: v),
    "seq_aux_loss": Field(F.number(0)),
    "act": Field(F.choice("swiglu")),
}
MTP_KEYS = {
    "depth": Field(F.integer(0, 16), True),
    "loss_weight": Field(F.number(0)),
}


def read_model(block: ast.Block, sink, ev: Evaluator, spans):
    name = _label(block, sink, True, "model")
    spans["model"] = block.kind_span
    plain, subs, ranges = _split(block.entries)
    _no_ranges(ranges, "`model`", sink)
    r = F.read_entries(plain, MODEL_KEYS, sink, ev, "`model`", block.kind_span, "model", spans)
    out = {"name": name}
    for k in ("vocab", "hidden", "max_seq", "tie_embeddings"):
        if r.get(k) is not None:
            out[k] = r.get(k)
    if r.get("norm") is not None:
        cv = F.as_call(r.get("norm"), block.span, sink, "norm", ("rmsnorm",))
        if cv is not None:
            eps = {"eps": Field(F.number(0, lo_open=True))}
            a = F.call_args(cv, eps, sink, "model.norm", spans)
            if a is not None:
                out["norm"] = S.RMSNorm(**a)
    if r.get("rope") is not None:
        cv = F.as_call(r.get("rope"), block.span, sink, "rope", ("rope", "yarn"))
        if cv is not None:
            schema = {"theta": Field(F.number(0, lo_open=True))}
            if cv.func == "yarn":
                schema.update({
                    "factor": Field(F.number(1)),
                    "original_max_seq": Field(F.integer(1)),
                    "beta_fast": Field(F.number(0)),
                    "beta_slow": Field(F.number(0)),
                    "mscale": Field(F.number(0)),
                    "mscale_all_dim": Field(F.number(0)),
                })
            a = F.call_args(cv, schema, sink, "model.rope", spans)
            if a is not None:
                out["rope"] = S.Rope(kind="yarn" if cv.func == "yarn" else "plain", **a)

    attentions, ffns, layers, mtp = {}, {}, None, None
    seen_layers = None
    for sub in subs:
        if sub.kind == "attention":
            a = _read_attention(sub, sink, ev, spans, r.get("hidden"))
            if sub.label in attentions or sub.label in ffns:
                sink.error(f"'{sub.label}' is defined twice", sub.label_span)
            elif a is not None:
                attentions[a.name] = a
        elif sub.kind == "ffn":
            f = _read_ffn(sub, sink, ev, spans)
            if sub.label in ffns or sub.label in attentions:
                sink.error(f"'{sub.label}' is defined twice", sub.label_span)
            elif f is not None:
                ffns[f.name] = f
        elif sub.kind == "layers":
            if seen_layers is not None:
                sink.error("a second `layers` block", sub.kind_span,
                           f"the first is at line {seen_layers.line}")
                continue
            seen_layers = sub.kind_span
            layers = sub
        elif sub.kind == "mtp":
            p, s2, rg = _split(sub.entries)
            _no_ranges(rg, "`mtp`", sink)
            for b in s2:
                sink.error(f"unexpected block '{b.kind}' in `mtp`", b.kind_span)
            spans["model.mtp"] = sub.kind_span
            rr = F.read_entries(p, MTP_KEYS, sink, ev, "`mtp`", sub.kind_span, "model.mtp", spans)
            if rr.get("depth") is not None:
                mtp = S.MTP(depth=rr.get("depth"), loss_weight=rr.get("loss_weight", 0.0))
        else:
            guess = did_you_mean(sub.kind, ("attention", "ffn", "layers", "mtp"))
            sink.error(f"unexpected block '{sub.kind}' in `model`", sub.kind_span,
                       f"did you mean `{guess}`?" if guess else
                       "`model` contains attention, ffn, layers and mtp blocks")
    if not attentions and not sink.has_errors:
        sink.error("the model has no `attention` block", block.kind_span,
                   "add e.g. `attention mla { heads = ..., ... }`")
    if not ffns and not sink.has_errors:
        sink.error("the model has no `ffn` block", block.kind_span,
                   "add e.g. `ffn dense { intermediate = ... }`")
    if layers is None:
        sink.error("the model has no `layers` block", block.kind_span,
                   "add e.g. `layers { 0..31 = block(attn, ffn) }`")
        return None
    declared = {s.label for s in subs if s.label}  # valid or not, even if misspelt
    layer_list = read_layers(layers, sink, ev, spans, attentions, ffns, declared)
    if layer_list is None or sink.has_errors:
        return None
    out.update(attentions=attentions, ffns=ffns, layers=layer_list)
    if mtp is not None:
        out["mtp"] = mtp
    try:
        return S.Model(**out)
    except Exception as err:  # noqa: BLE001
        sink.error(f"invalid model: {err}", block.kind_span)
        return None


def _kind_of(sub: ast.Block, kinds, sink) -> str | None:
    for e in sub.entries:
        if isinstance(e, ast.Assign) and e.key == "kind":
            word = e.value.id if isinstance(e.value, ast.Name) else None
            if word in kinds:
                return word
            guess = did_you_mean(word, kinds) if word else None
            sink.error(f"unknown {sub.kind} kind `{word or '...'}`", e.value.span,
                       f"did you mean `{guess}`?" if guess else f"one of: {', '.join(kinds)}")
            return None
    if sub.label in kinds:
        return sub.label
    sink.error(f"cannot tell what kind of {sub.kind} '{sub.label}' is",
               sub.label_span or sub.kind_span,
               f"add `kind = {'|'.join(kinds)}` (or name the block after its kind)")
    return None


def _open_kind_block(sub: ast.Block, what: str, kinds, sink, spans):
    """(name, key path, kind, plain entries, where) of a named `attention`/`ffn` sub-block,
    or None when its kind is unknown; ranges and nested blocks in it are reported."""
    name = _label(sub, sink, True, what)
    path = f"model.{what}.{name}"
    spans[path] = sub.label_span or sub.kind_span
    kind = _kind_of(sub, kinds, sink)
    if kind is None:
        return None
    where = f"{what} '{name}'"
    plain, subs, ranges = _split(sub.entries)
    _no_ranges(ranges, where, sink)
    for b in subs:
        sink.error(f"unexpected block '{b.kind}' in {where}", b.kind_span)
    return name, path, kind, plain, where


def _read_attention(sub, sink, ev, spans, hidden):
    opened = _open_kind_block(sub, "attention", ATTENTION_KINDS, sink, spans)
    if opened is None:
        return None
    name, path, kind, plain, where = opened
    if kind == "mla":
        r = F.read_entries(plain, MLA_KEYS, sink, ev, where, sub.kind_span, path, spans)
        vals = {k: r.get(k) for k in MLA_KEYS if k != "kind"}
        if any(v is None for v in vals.values()):
            return None
        return S.MLA(name=name, **vals)
    r = F.read_entries(plain, GQA_KEYS, sink, ev, where, sub.kind_span, path, spans)
    heads = r.get("heads")
    if heads is None:
        return None
    default_kv = {"mha": heads, "mqa": 1}.get(kind, heads)
    kv_heads = r.get("kv_heads", default_kv)
    if kind == "gqa" and "kv_heads" not in r.spans:
        sink.error(f"attention '{name}' is gqa but does not say `kv_heads`", sub.kind_span,
                   "add `kv_heads = N` (or use kind mha / mqa)")
    head_dim = r.get("head_dim")
    if head_dim is None:
        if hidden and hidden % heads == 0:
            head_dim = hidden // heads
        else:
            sink.error(f"attention '{name}' needs `head_dim` (hidden {hidden} is not a multiple "
                       f"of {heads} heads)", sub.kind_span)
            return None
    return S.GQA(name=name, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                 qkv_bias=r.get("qkv_bias", False))


def _read_ffn(sub, sink, ev, spans):
    opened = _open_kind_block(sub, "ffn", FFN_KINDS, sink, spans)
    if opened is None:
        return None
    name, path, kind, plain, where = opened
    if kind == "dense":
        r = F.read_entries(plain, DENSE_KEYS, sink, ev, where, sub.kind_span, path, spans)
        if r.get("intermediate") is None:
            return None
        return S.DenseFFN(name=name, intermediate=r.get("intermediate"))
    r = F.read_entries(plain, MOE_KEYS, sink, ev, where, sub.kind_span, path, spans)
    req = [r.get(k) for k in ("routed", "top_k", "intermediate")]
    if any(v is None for v in req):
        return None
    balance, rate = "none", 0.0
    if r.get("balance") is not None:
        cv = F.as_call(r.get("balance"), sub.span, sink, "balance", ("bias", "none"))
        if cv is not None and cv.func == "bias":
            a = F.call_args(cv, {"update_rate": Field(F.number(0), True)}, sink,
                            f"{path}.balance", spans)
            if a is not None:
                balance, rate = "bias", a["update_rate"]
    score = r.get("score", "softmax")
    return S.MoE(
        name=name, routed=r.get("routed"), shared=r.get("shared", 0), top_k=r.get("top_k"),
        intermediate=r.get("intermediate"),
        shared_intermediate=r.get("shared_intermediate", r.get("intermediate")),
        score=score, groups=r.get("groups", 1), top_groups=r.get("top_groups", r.get("groups", 1)),
        route_scale=r.get("route_scale", 1.0), renormalize=r.get("renormalize", score == "sigmoid"),
        balance=balance, bias_update_rate=rate, seq_aux_loss=r.get("seq_aux_loss", 0.0),
    )


# ----------------------------------------------------------------------------- other blocks:
# precision, cluster, parallel, train, decode live in dsl/blocks_run.py to keep files short.

from dsvc.dsl.blocks_layers import read_layers  # noqa: E402 - they import this module
from dsvc.dsl.blocks_run import (  # noqa: E402
    read_cluster,
    read_decode,
    read_parallel,
    read_precision,
    read_train,
)
