"""Cross-field rules: what makes a spec that parses into one that will run.

Each rule is a function `(spec, sink)` registered in `RULES` with a short id;
all run, every violation is collected. Rules that need only one block's fields
(types, units, ranges, unknown keys, layer coverage) are checked while reading
the block (`dsl/blocks.py`); these look across blocks. `docs/language.md`
lists every rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dsvc.dsl.diagnostics import DiagnosticSink
from dsvc.dsl.spec import GQA, MLA, MoE, Spec

Rule = Callable[[Spec, DiagnosticSink], None]
RULES: list[tuple[str, Rule]] = []
# rule id -> the top-level blocks it reads, for rules that need no model: a file of shared
# blocks (`examples/clusters/*.dsv`, checked on its own) runs just these
FRAGMENT_RULES: dict[str, tuple[str, ...]] = {}


def rule(rule_id: str, needs: tuple[str, ...] | None = None):
    """Register a rule; `needs` names the blocks it reads when it reads no model."""
    def register(fn: Rule) -> Rule:
        RULES.append((rule_id, fn))
        if needs is not None:
            FRAGMENT_RULES[rule_id] = needs
        return fn

    return register


class _Tagged:
    """The sink as one rule sees it: every diagnostic carries the rule's id."""

    def __init__(self, sink: DiagnosticSink, rule_id: str):
        self._sink, self._id = sink, rule_id

    def error(self, message, span=None, hint=None):
        self._sink.error(message, span, hint, code=self._id)

    def warning(self, message, span=None, hint=None):
        self._sink.warning(message, span, hint, code=self._id)


def check(spec: Spec, sink: DiagnosticSink) -> None:
    """Run every rule; diagnostics are tagged with the rule id (rendered as `[rule-id]`).
    A `Fragment` (no model) runs the rules whose blocks it has."""
    present = getattr(spec, "blocks", None)
    for rule_id, fn in RULES:
        if present is None or set(FRAGMENT_RULES.get(rule_id, ("model",))) <= present:
            fn(spec, _Tagged(sink, rule_id))


def _moes(spec: Spec) -> list[MoE]:
    used = {layer.ffn for layer in spec.model.layers}
    return [f for n, f in sorted(spec.model.ffns.items()) if isinstance(f, MoE) and n in used]


def _divisors_near(n: int, x: int, count: int = 2) -> str:
    """The `count` divisors of `n` nearest `x`, in bounded time whatever `n` (a hint must
    not hang `check`): all of them, by trial division up to sqrt(n), for n up to 10^12;
    beyond that 1, n and those within 10^5 of x."""
    if n <= 10**12:
        small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
        divs = set(small) | {n // d for d in small}
    else:
        divs = {1, n} | {d for d in range(max(1, x - 10**5), x + 10**5) if n % d == 0}
    best = sorted(divs, key=lambda d: (abs(d - x), d))[:count]
    return " or ".join(str(d) for d in sorted(best))


# ----------------------------------------------------------------------------- model


@rule("moe-top-k")
def _top_k(spec, sink):
    for f in _moes(spec):
        if f.top_k > f.routed:
            sink.error(f"top_k {f.top_k} exceeds the {f.routed} routed experts of ffn '{f.name}'",
                       spec.span(f"model.ffn.{f.name}.top_k"), f"top_k must be at most {f.routed}")


@rule("moe-groups-divide")
def _groups_divide(spec, sink):
    for f in _moes(spec):
        if f.routed % f.groups:
            sink.error(f"{f.routed} routed experts do not divide into {f.groups} groups",
                       spec.span(f"model.ffn.{f.name}.groups"),
                       f"use {_divisors_near(f.routed, f.groups)} groups")


@rule("moe-top-groups")
def _top_groups(spec, sink):
    for f in _moes(spec):
        if f.top_groups > f.groups:
            sink.error(f"top_groups {f.top_groups} exceeds groups {f.groups} in ffn '{f.name}'",
                       spec.span(f"model.ffn.{f.name}.top_groups"),
                       f"a token can reach at most {f.groups} groups")
        elif f.groups > 1 and f.routed % f.groups == 0 and f.top_k <= f.routed \
                and f.top_k > f.top_groups * (f.routed // f.groups):
            sink.error(f"top_k {f.top_k} cannot be met from {f.top_groups} group"
                       f"{'s' if f.top_groups != 1 else ''} of {f.routed // f.groups} experts",
                       spec.span(f"model.ffn.{f.name}.top_k"), "raise top_groups or lower top_k")


@rule("moe-group-top2")
def _group_top2(spec, sink):
    for f in _moes(spec):
        if f.groups > 1 and f.top_groups < f.groups and f.routed % f.groups == 0 \
                and f.routed // f.groups < 2:
            sink.error(f"groups of one expert cannot be ranked by their top-2 scores "
                       f"(ffn '{f.name}')", spec.span(f"model.ffn.{f.name}.groups"),
                       f"use at most {f.routed // 2} groups")


@rule("gqa-heads")
def _gqa_heads(spec, sink):
    for name, a in sorted(spec.model.attentions.items()):
        if isinstance(a, GQA) and a.heads % a.kv_heads:
            sink.error(f"{a.heads} heads do not divide into {a.kv_heads} kv_heads "
                       f"(attention '{name}')", spec.span(f"model.attention.{name}.kv_heads"),
                       f"use {_divisors_near(a.heads, a.kv_heads)} kv_heads")


@rule("mla-dims")
def _mla_dims(spec, sink):
    for name, a in sorted(spec.model.attentions.items()):
        if isinstance(a, MLA) and a.q_lora_rank >= spec.model.hidden * 4:
            sink.warning(f"q_lora_rank {a.q_lora_rank} is not low-rank for hidden "
                         f"{spec.model.hidden}", spec.span(f"model.attention.{name}.q_lora_rank"))


@rule("unused-definitions")
def _unused(spec, sink):
    used_a = {layer.attention for layer in spec.model.layers}
    used_f = {layer.ffn for layer in spec.model.layers}
    for name in sorted(set(spec.model.attentions) - used_a):
        sink.warning(f"attention '{name}' is defined but no layer uses it",
                     spec.span(f"model.attention.{name}"))
    for name in sorted(set(spec.model.ffns) - used_f):
        sink.warning(f"ffn '{name}' is defined but no layer uses it",
                     spec.span(f"model.ffn.{name}"))


@rule("mtp-weight")
def _mtp(spec, sink):
    m = spec.model.mtp
    if m.depth > 0 and m.loss_weight == 0:
        sink.warning(f"MTP depth {m.depth} with loss_weight 0 trains modules that never learn",
                     spec.span("model.mtp"), "set `loss_weight` (DeepSeek-V3: 0.3) or depth 0")


@rule("moe-bias-rate")
def _bias(spec, sink):
    for f in _moes(spec):
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


@rule("fp8-tile-divides-k")
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


@rule("fp8-tile-shapes", needs=("precision",))
def _fp8_tile_shapes(spec, sink):
    lin = spec.precision.linear
    if not lin.is_fp8:
        return
    span = spec.span("precision.linear")
    if lin.act_tile[0] != 1:
        sink.error(f"activation tiles are 1 x K per token, got {lin.act_tile[0]} x "
                   f"{lin.act_tile[1]}", spec.span("precision.linear.act"),
                   f"use tile(1, {lin.act_tile[1]})")
    if lin.weight_block[1] != lin.act_tile[1]:
        sink.error(f"weight block K {lin.weight_block[1]} differs from activation tile K "
                   f"{lin.act_tile[1]}", spec.span("precision.linear.weight"),
                   "both scales are applied per K-step, so the two must match")
    if lin.promote_every % lin.act_tile[1]:
        sink.error(f"promote_every {lin.promote_every} is not a multiple of the tile "
                   f"{lin.act_tile[1]}", spec.span("precision.linear.promote_every") or span)
    if lin.accumulate != "fp32":
        sink.warning(f"accumulating FP8 GEMMs in {lin.accumulate} loses precision "
                     "(Hopper keeps ~14 bits)", spec.span("precision.linear.accumulate") or span,
                     "use accumulate = fp32")


@rule("precision-master", needs=("precision",))
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


# ----------------------------------------------------------------------------- cluster, parallel,
# train and decode rules live in dsl/rules_run.py to keep files short.

from dsvc.dsl import rules_run  # noqa: E402,F401  (registers them)
