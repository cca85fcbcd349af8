"""The `layers { lo..hi = block(attention, ffn) }` block: every layer index exactly once."""

from __future__ import annotations

from dsvc.dsl import ast
from dsvc.dsl import fields as F
from dsvc.dsl.diagnostics import Span, did_you_mean
from dsvc.dsl.limits import MAX_LAYERS
from dsvc.dsl.values import CallValue, Ident


def read_layers(block, sink, ev, spans, attentions, ffns, declared=frozenset()):
    from dsvc.dsl import spec as S

    spans["model.layers"] = block.kind_span
    plain = [e for e in block.entries if isinstance(e, (ast.Assign, ast.Const))]
    subs = [e for e in block.entries if isinstance(e, ast.Block)]
    ranges = [e for e in block.entries if isinstance(e, ast.RangeAssign)]
    for e in plain:
        if isinstance(e, ast.Const):
            ev.constants[e.name] = ev.evaluate(e.value)
        else:
            sink.error(f"unexpected '{e.key} = ...' in `layers`", e.key_span,
                       "layers are given by index ranges: `0..2 = block(mla, dense)`")
    for b in subs:
        sink.error(f"unexpected block '{b.kind}' in `layers`", b.kind_span)
    assigned: dict[int, Span] = {}
    per_layer: dict[int, S.LayerSpec] = {}
    int_conv = F.integer(0)
    past_limit = False
    for ra in ranges:
        lo_v = ev.evaluate(ra.lo)
        hi_v = lo_v if ra.hi is None else ev.evaluate(ra.hi)
        if lo_v is None or hi_v is None:
            continue  # already reported
        lo = int_conv(lo_v, ra.lo.span, sink, "layer index")
        hi = lo if ra.hi is None else int_conv(hi_v, ra.hi.span, sink, "layer index")
        if lo is None or hi is None:
            continue
        if hi < lo:
            sink.error(f"empty layer range {lo}..{hi}", ra.span,
                       "ranges are inclusive and ascending: `3..60`")
            continue
        if hi >= MAX_LAYERS:  # before the loop below walks the range
            sink.error(f"layer {hi} is past the limit of {MAX_LAYERS} layers (0..{MAX_LAYERS - 1})",
                       ra.hi.span if ra.hi is not None else ra.lo.span,
                       "the limit keeps report and compile within seconds (docs/limits.md)")
            past_limit = True
            continue
        layer = _read_block_call(ra.value, sink, ev, attentions, ffns, declared)
        for i in range(lo, hi + 1):
            if i in assigned:
                sink.error(f"layer {i} is assigned twice", ra.span,
                           f"it is also in the range at line {assigned[i].line}")
                break
            assigned[i] = ra.span
            spans[f"model.layers.{i}"] = ra.span
            if layer is not None:
                per_layer[i] = layer
    if not assigned:
        if not past_limit:
            sink.error("`layers` assigns no layer", block.kind_span,
                       "add e.g. `0..31 = block(attn, ffn)`")
        return None
    n = max(assigned) + 1
    missing = [i for i in range(n) if i not in assigned]
    if missing:
        sink.error(f"layer{'s' if len(missing) > 1 else ''} {_ranges_text(missing)} "
                   f"{'are' if len(missing) > 1 else 'is'} not assigned", block.kind_span,
                   f"layer ranges must cover 0..{n - 1} exactly once")
        return None
    if len(per_layer) != n:
        return None
    return tuple(per_layer[i] for i in range(n))


def _ranges_text(idx: list[int]) -> str:
    parts, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}" if start == prev else f"{start}..{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def _read_block_call(value, sink, ev, attentions, ffns, declared=frozenset()):
    from dsvc.dsl import spec as S

    if isinstance(value, ast.TypedBlock):
        sink.error("a layer is `block(attention, ffn)`", value.span)
        return None
    v = ev.evaluate(value)
    if not isinstance(v, CallValue) or v.func != "block":
        sink.error("a layer is `block(attention, ffn)`", value.span,
                   "e.g. `3..60 = block(mla, moe)`")
        return None
    args = list(v.args)
    spans_ = list(v.arg_spans)
    for key in ("attention", "ffn"):
        if key in v.kwargs:
            args.append(v.kwargs[key])
            spans_.append(v.kwarg_spans[key])
    if len(args) != 2:
        sink.error("`block(...)` takes an attention and an ffn", v.span,
                   "e.g. `block(mla, moe)`")
        return None
    names = []
    for arg, span, table, what in ((args[0], spans_[0], attentions, "attention"),
                                   (args[1], spans_[1], ffns, "ffn")):
        if not isinstance(arg, Ident) or arg.id not in table:
            word = arg.id if isinstance(arg, Ident) else None
            if word in declared and word not in ffns and word not in attentions:
                return None  # its block has an error of its own: say nothing more here
            other = ffns if what == "attention" else attentions
            guess = did_you_mean(word, table) if word else None
            if word in other:
                hint = f"'{word}' is an {'ffn' if what == 'attention' else 'attention'}; " \
                       f"the order is block(attention, ffn)"
            elif guess:
                hint = f"did you mean `{guess}`?"
            else:
                hint = f"defined {what}s: {', '.join(sorted(table)) or 'none'}"
            sink.error(f"unknown {what} '{word if word else F.describe(arg)}'", span, hint)
            return None
        names.append(arg.id)
    return S.LayerSpec(attention=names[0], ffn=names[1])
