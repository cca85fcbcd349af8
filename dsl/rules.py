"""Cross-field rules about the model and its precision: what makes a spec that parses into
one that will run (the cluster, plan and training rules are in dsl/rules_run.py; dsl/checks.py
runs both lists).

Each rule is a function `(spec, sink)` listed in `MODEL_RULES` with the diagnostic codes it
reports; all run, every violation is collected. Rules that need only one block's fields
(types, units, ranges, unknown keys, layer coverage) are checked while reading the block
(`dsl/blocks.py`); these look across blocks. An invariant the trainer also enforces on its
plan is written once, in `dsvc.runtime.plan_check`: the rule calls it and adds the source
location (`RuleSink.problems`). `docs/language.md` lists every code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from dsvc.dsl.diagnostics import DiagnosticSink
from dsvc.dsl.spec import GQA, MLA, MoE, Spec
from dsvc.runtime.plan_check import fp8_tile_problems, gqa_problems, moe_problems


class Rule(NamedTuple):
    codes: tuple[str, ...]  # the codes its diagnostics carry; the first tags plain ones
    check: Callable[[Spec, RuleSink], None]
    needs: tuple[str, ...] | None = None  # blocks it reads when there is no model (a fragment)


class RuleSink:
    """The sink as one rule sees it: every diagnostic carries the rule's code."""

    def __init__(self, sink: DiagnosticSink, code: str):
        self._sink, self._code = sink, code

    def error(self, message, span=None, hint=None):
        self._sink.error(message, span, hint, code=self._code)

    def warning(self, message, span=None, hint=None):
        self._sink.warning(message, span, hint, code=self._code)

    def problems(self, spec, prefix: str, problems) -> None:
        """`plan_check.Problem`s as errors at `prefix + problem.where`, each with its code."""
        for p in problems:
            self._sink.error(p.message, spec.span(prefix + p.where), p.hint or None,
                             code=p.code or self._code)


def used_moes(spec: Spec) -> list[MoE]:
    """The MoE FFNs some layer uses, by name."""
    used = {layer.ffn for layer in spec.model.layers}
    return [f for n, f in sorted(spec.model.ffns.items()) if isinstance(f, MoE) and n in used]


# ----------------------------------------------------------------------------- model


def _moe_routing(spec, sink):
    for f in used_moes(spec):
        sink.problems(spec, f"model.ffn.{f.name}.",
                      moe_problems(f.name, f.routed, f.top_k, f.groups, f.top_groups))


def _gqa_heads(spec, sink):
    for name, a in sorted(spec.model.attentions.items()):
        if isinstance(a, GQA):
            sink.problems(spec, f"model.attention.{name}.",
                          gqa_problems(name, a.heads, a.kv_heads, a.head_dim))


def _mla_dims(spec, sink):
    for name, a in sorted(spec.model.attentions.items()):
        if isinstance(a, MLA) and a.q_lora_rank >= spec.model.hidden * 4:
            sink.warning(f"q_lora_rank {a.q_lora_rank} is not low-rank for hidden "
                         f"{spec.model.hidden}", spec.span(f"model.attention.{name}.q_lora_rank"))


def _unused(spec, sink):
    used_a = {layer.attention for layer in spec.model.layers}
    used_f = {layer.ffn for layer in spec.model.layers}
    for name in sorted(set(spec.model.attentions) - used_a):
        sink.warning(f"attention '{name}' is defined but no layer uses it",
                     spec.span(f"model.attention.{name}"))
    for name in sorted(set(spec.model.ffns) - used_f):
        sink.warning(f"ffn '{name}' is defined but no layer uses it",
                     spec.span(f"model.ffn.{name}"))


def _mtp(spec, sink):
    m = spec.model.mtp
    if m.depth > 0 and m.loss_weight == 0:
        sink.warning(f"MTP depth {m.depth} with loss_weight 0 trains modules that never learn",
                     spec.span("model.mtp"), "set `loss_weight` (DeepSeek-V3: 0.3) or depth 0")


def _bias(spec, sink):
    for f in used_moes(spec):
        if f.balance == "bias" and f.bias_update_rate > 0.1:
            sink.warning(f"bias update_rate {f.bias_update_rate:g} is very large "
                         "(DeepSeek-V3 uses 0.001)", spec.span(f"model.ffn.{f.name}.balance"))


# ----------------------------------------------------------------------------- precision


def _gemm_ks(spec: Spec) -> list[tuple[str, int, str]]:
    """(what, K, span path) of every GEMM the linear policy quantises."""
    m, out = spec.model, []
    seen = set()
    for layer in m.layers:
        a, f = m.attentions[layer.attention], m.ffns[layer.ffn]
        ks = []
        if isinstance(a, MLA):
            ks += [("q/kv down-projections", m.hidden)]
            if a.q_lora_rank:
                ks += [("q up-projection (q_lora_rank)", a.q_lora_rank)]
            ks += [("kv up-projection (kv_lora_rank)", a.kv_lora_rank),
                   ("output projection (heads x v_dim)", a.heads * a.v_dim)]
            p = f"model.attention.{a.name}"
        else:
            ks += [("qkv projection", m.hidden), ("output projection", a.heads * a.head_dim)]
            p = f"model.attention.{a.name}"
        for what, k in ks:
            if (a.name, what, k) not in seen:
                seen.add((a.name, what, k))
                out.append((f"{what} of attention '{a.name}'", k, p))
        inter = f.intermediate
        fk = [("up/gate projections", m.hidden), ("down projection (intermediate)", inter)]
        if isinstance(f, MoE) and f.shared and f.shared_intermediate != inter:
            fk.append(("shared down projection", f.shared_intermediate))
        for what, k in fk:
            if (f.name, what, k) not in seen:
                seen.add((f.name, what, k))
                out.append((f"{what} of ffn '{f.name}'", k, f"model.ffn.{f.name}"))
    return out


def _fp8_tiles(spec, sink):
    lin = spec.precision.linear
    if not lin.is_fp8 or lin.pad:
        return
    tile = lin.act_tile[1]
    for what, k, path in _gemm_ks(spec):
        if k % tile:
            sink.error(f"FP8 tile of {tile} does not divide K = {k} of the {what}",
                       spec.span(path), "declare `pad = true` in the linear policy, or change "
                       f"the dimension to a multiple of {tile}")


def _fp8_tile_shapes(spec, sink):
    lin = spec.precision.linear
    if not lin.is_fp8:
        return
    span = spec.span("precision.linear")
    if lin.act_tile[0] != 1:
        sink.error(f"activation tiles are 1 x K per token, got {lin.act_tile[0]} x "
                   f"{lin.act_tile[1]}", spec.span("precision.linear.act"),
                   f"use tile(1, {lin.act_tile[1]})")
    for p in fp8_tile_problems(lin.act_tile[1], lin.weight_block):  # where: weight_block
        sink.error(p.message, spec.span("precision.linear.weight"), p.hint)
    if lin.promote_every % lin.act_tile[1]:
        sink.error(f"promote_every {lin.promote_every} is not a multiple of the tile "
                   f"{lin.act_tile[1]}", spec.span("precision.linear.promote_every") or span)
    if lin.accumulate != "fp32":
        sink.warning(f"accumulating FP8 GEMMs in {lin.accumulate} loses precision "
                     "(Hopper keeps ~14 bits)", spec.span("precision.linear.accumulate") or span,
                     "use accumulate = fp32")


def _master(spec, sink):
    p = spec.precision
    order = {"fp8_e4m3": 0, "fp8_e5m2": 0, "fp16": 1, "bf16": 1, "fp32": 2}
    if order[p.master_weights] < order[p.default]:
        sink.error(f"master weights in {p.master_weights} are less precise than the "
                   f"{p.default} compute weights", spec.span("precision.master_weights"))
    if p.master_weights.startswith("fp8") or p.grads.startswith("fp8") \
            or p.optimizer_states.startswith("fp8"):
        sink.error("master weights, gradients and optimizer states cannot be FP8",
                   spec.span("precision"), "use fp32 or bf16")


MODEL_RULES = (
    Rule(("moe-top-k", "moe-groups-divide", "moe-top-groups", "moe-group-top2"), _moe_routing),
    Rule(("gqa-heads",), _gqa_heads),
    Rule(("mla-dims",), _mla_dims),
    Rule(("unused-definitions",), _unused),
    Rule(("mtp-weight",), _mtp),
    Rule(("moe-bias-rate",), _bias),
    Rule(("fp8-tile-divides-k",), _fp8_tiles),
    Rule(("fp8-tile-shapes",), _fp8_tile_shapes, needs=("precision",)),
    Rule(("precision-master",), _master, needs=("precision",)),
)
