"""Renders a build's `program.py`: the stage program, from the graph after the `fuse` pass.

For every block kind of the model (attention name, ffn name) the emitter reads one
block's ops and fusion groups: dimensions from the ops' tensors and attributes (not
from the spec), the routing constants from the router op, the epsilon from the norms,
the formats from `assign_precision`'s marks, the group names for the code's comments.
A kind the program cannot express yet (a linear that is not FP8, a norm not kept in
fp32: `eager_reason`, which the memory model reads too) is listed with the reason and
runs the eager modules; the build says so and the runtime reports it. K padding (`pad`)
needs nothing: the fused kernels and GEMMs take ragged K, and zero padding changes no
scale and no product.
"""

from __future__ import annotations

from dsvc.compiler.codegen.render import render_generated

PROGRAM_API = 2  # must equal runtime/program.PROGRAM_API (a test checks)


def render_program(graph, *, spec_file: str | None, span, passes) -> str:
    """The program's source (deterministic: kinds in layer order, constants from the IR)."""
    kinds = block_kinds(graph)
    roles = sorted({r for k in kinds if not k["eager"] for r in k["roles"]})
    pol = graph.spec.precision
    precision = {"default": pol.default, "norm": pol.keep.get("norm", "fp32"),
                 "router": pol.keep.get("router", pol.default),
                 "attention_core": pol.keep.get("attention_core", pol.default)}
    lin = pol.linear
    for role in roles:
        precision[f"linear.{role}"] = (f"{lin.format}/{lin.act_tile[1]}/"
                                       f"{lin.scales == 'ue8m0'}/{lin.pad}")
    tile = {"act": f"1x{lin.act_tile[1]}", "weight": "x".join(map(str, lin.weight_block)),
            "blocks": sum(1 for k in kinds if not k["eager"])}
    return render_generated("program.py.jinja", spec_file=spec_file, span=span, passes=passes,
                            tile_config=tile, model=graph.spec.model.name, kinds=kinds,
                            api=PROGRAM_API, precision=sorted(precision.items()),
                            fp8_roles=tuple(roles))


def block_kinds(graph) -> list[dict]:
    """One context per (attention, ffn) kind of block, in order of first appearance."""
    spec = graph.spec
    m = spec.model
    layers: dict[tuple[str, str], list[str]] = {}
    first: dict[tuple[str, str], str] = {}
    for i, lay in enumerate(m.layers):
        key = (lay.attention, lay.ffn)
        layers.setdefault(key, []).append(str(i))
        first.setdefault(key, f"L{i}")
    last = m.layers[-1] if m.layers else None
    for k in range(m.mtp.depth if last else 0):
        key = (last.attention, last.ffn)
        layers.setdefault(key, []).append(f"mtp{k}")
        first.setdefault(key, f"mtp{k}")
    by_prefix = {}
    for op in graph.ops():
        if op.block in ("layer", "mtp"):
            by_prefix.setdefault(op.name.split(".", 1)[0], {})[op.name.split(".", 1)[1]] = op
    groups = {g.name: g for g in graph.fusion or ()}
    return [_kind(graph, key, first[key], by_prefix[first[key]], groups, _ranges(layers[key]))
            for key in layers]


def _ranges(names: list[str]) -> str:
    nums = [int(n) for n in names if n.isdigit()]
    text, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            text.append(f"{start}" if start == n else f"{start}..{n}")
            start = None
    return ", ".join(text + [n for n in names if not n.isdigit()])


def _cls(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def _kind(graph, key, prefix, ops, groups, layer_text) -> dict:
    pol = graph.spec.precision
    att_name, ffn_name = key
    name = f"{att_name}__{ffn_name}"
    core = ops["attn.core"]
    ctx = {"attention": att_name, "ffn": ffn_name, "name": name, "cls": _cls(name),
           "layers": layer_text, "title": f"{att_name} + {ffn_name}", "eager": "",
           "tile": pol.linear.act_tile[1], "eps": repr(float(ops["attn_norm"].attr("eps"))),
           "cache_swiglu": bool(pol.cache_fp8_activations)}
    rope = ops["attn.rope"]
    if core.attr("kv_heads") is None:  # MLA
        heads = core.attr("heads")
        r = rope.attr("rotary_dim")
        q_lora = "attn.q_down" in ops
        q_out = ops["attn.q_up" if q_lora else "attn.q_proj"].attr("out_features")
        nope = q_out // heads - r
        kv_up = ops["attn.kv_up"].attr("out_features")
        ctx["att"] = {"kind": "mla", "heads": heads, "rope": r, "nope": nope,
                      "v": kv_up // heads - nope, "q_lora": q_lora,
                      "kv_lora": ops["attn.kv_down"].attr("out_features") - r}
        linears = (["attn.q_down", "attn.q_up"] if q_lora else ["attn.q_proj"])
        linears += ["attn.kv_down", "attn.kv_up", "attn.o_proj"]
        norms = ["attn_norm", "ffn_norm", "attn.kv_norm"] + (["attn.q_norm"] if q_lora else [])
    else:
        heads, kv_heads = core.attr("heads"), core.attr("kv_heads")
        bias = ops["attn.q_proj"].attr("bias") is not None
        ctx["att"] = {"kind": "gqa", "heads": heads, "kv_heads": kv_heads,
                      "head_dim": rope.attr("rotary_dim"), "bias": bias}
        linears = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"]
        norms = ["attn_norm", "ffn_norm"]
    if "ffn.act" in ops:
        ctx["ffn_kind"] = "dense"
        linears += ["ffn.gate", "ffn.up", "ffn.down"]
    else:
        ctx["ffn_kind"] = "moe"
        router, experts = ops["moe.router"], ops["moe.experts"]
        shared = ops.get("moe.shared")
        ctx["moe"] = {
            "score": router.attr("score"), "groups": router.attr("groups"),
            "top_groups": router.attr("top_groups"), "top_k": router.attr("top_k"),
            "renormalize": bool(router.attr("renormalize")),
            "route_scale": repr(float(router.attr("route_scale"))),
            "shared": shared is not None,
            "dispatch_fp8": experts.inputs[0].dtype.startswith("fp8"),
            "combine_dtype": _torch_dtype(experts.outputs[0].dtype),
            "router_dtype": _torch_dtype(router.dtype)}
        linears += ["moe.experts"] + (["moe.shared"] if shared is not None else [])
    ctx["roles"] = sorted({ops[n].attr("role") for n in linears})
    ctx["eager"] = eager_reason(pol, graph.spec.model.ffns[ffn_name])
    assert ctx["eager"] or (all(ops[n].attr("fp8") for n in linears)
                            and all("fusion" in ops[n].attrs for n in norms)), \
        f"{name}: eager_reason disagrees with the IR"
    ctx["group"], ctx["groups"] = _group_names(prefix, ops, groups)
    return ctx


def _torch_dtype(name: str) -> str:
    return {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[name]


def eager_reason(precision, ffn=None) -> str:
    """Why the program cannot run a block under `precision` ("" when it can), the block's
    FFN definition `ffn` given (without it, the policy's reasons only). The one rule for
    what the program covers: `render_program` leaves such kinds to the eager modules, and
    the memory model (`compiler.costs.activations`) charges what the code that runs keeps.
    A MoE without shared experts under a dispatch that is not FP8 gives its ffn norm no
    FP8 consumer at the token's rank (the router keeps its dtype, the experts quantise
    after the dispatch), so `fuse` leaves that norm unfused (`_kind` asserts the IR
    agrees)."""
    lin = precision.linear
    if not lin.is_fp8:
        return f"every linear computes in {lin.format}, not FP8"
    norm = precision.keep.get("norm", "fp32")
    if norm != "fp32":
        return f"norms are kept in {norm}, the fused norms compute in fp32"
    if precision.default not in ("bf16", "fp32"):
        return f"activations in {precision.default}"
    if ffn is not None and ffn.kind == "moe" and not ffn.shared \
            and not precision.dispatch.startswith("fp8"):
        return f"the ffn norm has no fusion group (no shared experts, {precision.dispatch} dispatch)"
    return ""


def _group_names(prefix, ops, groups) -> tuple[dict, dict]:
    """The block's fusion groups by role in the program (for its comments)."""
    def named(op_key, kind=None):
        op = ops.get(op_key)
        if op is None:
            return "-"
        for g in op.attr("fusion") or ():
            if kind is None or groups[g].kind == kind:
                return g
        return "-"

    one = {
        "attn_norm": named("attn_norm"), "q_norm": named("attn.q_norm"),
        "kv_norm": named("attn.kv_norm"), "rope": named("attn.rope"),
        "core_quant": named("attn.core.quant"), "o_residual": named("attn.o_proj"),
        "ffn_norm": named("ffn_norm"), "swiglu": named("ffn.act"),
        "down_residual": named("ffn.down"), "route": named("moe.router"),
        "routed_swiglu": named("moe.experts", "swiglu_quant"),
        "shared_swiglu": named("moe.shared", "swiglu_quant"),
        "combine": named("moe.experts", "moe_combine"),
    }
    attn_in = [one[k] for k in ("attn_norm", "q_norm", "kv_norm", "rope") if one[k] != "-"]
    out = [one[k] for k in ("core_quant", "o_residual", "ffn_norm", "swiglu", "down_residual")
           if one[k] != "-"]
    moe = [one[k] for k in ("route", "routed_swiglu", "shared_swiglu", "combine") if one[k] != "-"]
    return one, {"attn_in": attn_in, "out": out, "moe": moe}
