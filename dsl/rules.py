"""Cross-field rules: what makes a spec that parses into one that will run.

Each rule is a function `(spec, sink)` registered in `RULES` with a short id;
all run, every violation is collected. Rules that need only one block's fields
(types, units, ranges, unknown keys, layer coverage) are checked while reading
the block (`dsl/blocks.py`); these look across blocks. `docs/language.md`
lists every rule.
"""

from __future__ import annotations

import math
from typing import Callable

from dsl.diagnostics import DiagnosticSink
from dsl.spec import MLA, GQA, MoE, Spec

Rule = Callable[[Spec, DiagnosticSink], None]
RULES: list[tuple[str, Rule]] = []


def rule(rule_id: str):
    def register(fn: Rule) -> Rule:
        RULES.append((rule_id, fn))
        return fn

    return register


def check(spec: Spec, sink: DiagnosticSink) -> None:
    for _, fn in RULES:
        fn(spec, sink)


def _moes(spec: Spec) -> list[MoE]:
    used = {layer.ffn for layer in spec.model.layers}
    return [f for n, f in sorted(spec.model.ffns.items()) if isinstance(f, MoE) and n in used]


def _divisors_near(n: int, x: int, count: int = 2) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
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
        elif f.routed % f.groups == 0 and f.top_k > f.top_groups * (f.routed // f.groups):
            sink.error(f"top_k {f.top_k} cannot be met from {f.top_groups} groups of "
                       f"{f.routed // f.groups} experts", spec.span(f"model.ffn.{f.name}.top_k"),
                       "raise top_groups or lower top_k")


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
    for i, layer in enumerate(m.layers):
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
            if (what, k) not in seen:
                seen.add((what, k))
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


@rule("fp8-tile-shapes")
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


@rule("precision-master")
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


# ----------------------------------------------------------------------------- cluster


@rule("bandwidth-effective")
def _effective(spec, sink):
    c = spec.cluster
    if c is None:
        return
    if c.nvlink.effective > c.nvlink.bandwidth:
        sink.error("NVLink effective bandwidth exceeds its nominal bandwidth",
                   spec.span("cluster.nvlink.effective"))
    if c.network is not None and c.network.effective > c.network.nic:
        sink.error("network effective bandwidth exceeds the NIC line rate",
                   spec.span("cluster.network.effective"),
                   "note 400 Gb/s (bits) is 50 GB/s (bytes)")


@rule("nvlink-domain")
def _domain(spec, sink):
    c = spec.cluster
    if c is None:
        return
    d = c.nvlink.domain
    if d % c.gpus_per_node and c.gpus_per_node % d:
        sink.error(f"an NVLink domain of {d} GPUs neither divides nor is a multiple of "
                   f"{c.gpus_per_node} GPUs per node", spec.span("cluster.nvlink.domain"))
    elif d > c.world_size:
        sink.error(f"an NVLink domain of {d} GPUs is larger than the cluster's "
                   f"{c.world_size}", spec.span("cluster.nvlink.domain"))
    if c.nodes > 1 and c.network is None and d < c.world_size:
        sink.error(f"{c.nodes} nodes but no `network` block", spec.span("cluster"),
                   "add `network infiniband { nic = 400 Gb/s, ... }`")


@rule("fat-tree-capacity")
def _fat_tree(spec, sink):
    c = spec.cluster
    if c is None or c.network is None or c.network.topology is None:
        return
    t = c.network.topology
    span = spec.span("cluster.network.topology")
    if t.radix % 2:
        sink.error(f"fat-tree radix {t.radix} must be even (half the ports face down)", span)
        return
    endpoints = 2 * (t.radix // 2) ** t.layers * t.planes
    gpus = c.world_size
    if gpus > endpoints:
        sink.error(f"{gpus} GPUs exceed the fabric's {endpoints} endpoints "
                   f"({t.layers}-layer fat-tree of radix {t.radix} x {t.planes} planes)", span,
                   "add a layer, planes or a larger radix")
    if t.planes > 1 and c.gpus_per_node % t.planes:
        sink.warning(f"{t.planes} planes do not divide {c.gpus_per_node} GPU-NIC pairs per node",
                     span, "multi-plane fabrics put each of a node's NICs on its own plane")


@rule("gpu-rates")
def _gpu(spec, sink):
    c = spec.cluster
    if c is not None and c.gpu.fp8_flops < c.gpu.bf16_flops:
        sink.warning("FP8 peak below BF16 peak: FP8 will not pay off on this GPU",
                     spec.span("cluster.gpu.fp8"))


# ----------------------------------------------------------------------------- parallel & train


@rule("pipeline-stages")
def _stages(spec, sink):
    p = spec.parallel
    if p is None:
        return
    n = spec.model.num_layers
    stages = p.num_stages
    if stages > n:
        sink.error(f"{stages} pipeline stages ({p.schedule} over {p.pipeline} ranks) exceed the "
                   f"model's {n} layers", spec.span("parallel.pipeline"),
                   f"use at most {n if p.num_stages == p.pipeline else n // 2} pipeline ranks")
    if p.schedule == "dualpipe" and p.pipeline % 2:
        sink.error(f"DualPipe needs an even number of pipeline ranks, got {p.pipeline}",
                   spec.span("parallel.pipeline"),
                   f"use {p.pipeline - 1 or 2} or {p.pipeline + 1}, or schedule = 1f1b")
    if p.layers_per_stage is not None:
        lps = p.layers_per_stage
        span = spec.span("parallel.layers_per_stage")
        if len(lps) != stages:
            sink.error(f"layers_per_stage lists {len(lps)} stages, the plan has {stages}", span)
        elif sum(lps) != n:
            sink.error(f"layers_per_stage sums to {sum(lps)}, the model has {n} layers", span,
                       "every layer on exactly one stage")


@rule("micro-batches")
def _micro(spec, sink):
    p, t = spec.parallel, spec.train
    if p is None or t is None:
        return
    denom = p.data * t.micro_batch
    if t.global_batch % denom:
        sink.error(f"global_batch {t.global_batch} is not divisible by data {p.data} x "
                   f"micro_batch {t.micro_batch} = {denom}", spec.span("train.global_batch"),
                   f"use a multiple of {denom}, e.g. {max(denom, t.global_batch // denom * denom)}")
        return
    m = t.global_batch // denom
    stages = p.num_stages
    span = spec.span("train.global_batch")
    if p.schedule == "dualpipe" and (m % 2 or m < 2 * stages):
        sink.error(f"DualPipe over {p.pipeline} ranks ({stages} stages) needs an even number of "
                   f"at least {2 * stages} micro-batches; global_batch gives {m}", span,
                   f"global_batch = {2 * stages * denom} would give {2 * stages}")
    if p.schedule == "dualpipev" and m < 2 * p.pipeline:
        sink.error(f"DualPipeV over {p.pipeline} ranks needs at least {2 * p.pipeline} "
                   f"micro-batches; global_batch gives {m}", span,
                   f"global_batch = {2 * p.pipeline * denom} would give {2 * p.pipeline}")
    if p.schedule in ("1f1b", "zb1p") and m < p.pipeline:
        sink.warning(f"{m} micro-batches for {p.pipeline} pipeline stages leave most of the "
                     "pipeline idle", span, f"use at least {p.pipeline} micro-batches")


@rule("expert-parallel")
def _ep(spec, sink):
    p = spec.parallel
    if p is None:
        return
    moes = _moes(spec)
    span = spec.span("parallel.expert")
    if p.expert > 1 and not moes:
        sink.warning(f"expert = {p.expert} but the model has no MoE layers", span)
        return
    if p.data % p.expert:
        sink.error(f"expert parallelism {p.expert} is not inside data parallelism {p.data}",
                   span, f"EP groups live inside the data dimension; use "
                   f"{_divisors_near(p.data, p.expert)}")
    for f in moes:
        if f.routed % p.expert:
            sink.error(f"{f.routed} experts do not divide over {p.expert} EP ranks",
                       span, f"use {_divisors_near(f.routed, p.expert)}")
        if p.redundant_experts % p.expert:
            sink.error(f"{p.redundant_experts} redundant experts do not spread evenly over "
                       f"{p.expert} EP ranks", spec.span("parallel.redundant_experts"))


@rule("node-limited-routing")
def _node_limited(spec, sink):
    p, c = spec.parallel, spec.cluster
    if p is None or c is None or p.expert <= 1:
        return
    nodes_spanned = max(1, math.ceil(p.expert / c.gpus_per_node))
    for f in _moes(spec):
        if f.groups > 1 and f.top_groups < f.groups and f.groups != nodes_spanned:
            sink.warning(f"ffn '{f.name}' routes over {f.groups} groups but its EP group of "
                         f"{p.expert} ranks spans {nodes_spanned} node"
                         f"{'s' if nodes_spanned != 1 else ''}: top_groups = {f.top_groups} "
                         "does not limit the nodes a token reaches",
                         spec.span(f"model.ffn.{f.name}.groups"),
                         f"set groups = {nodes_spanned} (one group per node)")


@rule("zero-stage")
def _zero(spec, sink):
    p = spec.parallel
    if p is not None and p.zero > 1:
        sink.warning(f"ZeRO-{p.zero}: the report models it, the runtime shards optimizer "
                     "states only (ZeRO-1)", spec.span("parallel.zero"))


@rule("overlap-needs-moe")
def _overlap(spec, sink):
    p = spec.parallel
    if p is not None and p.overlap == "dual_microbatch" and p.expert <= 1:
        sink.warning("dual micro-batch overlap hides expert all-to-all; with expert = 1 there "
                     "is none to hide", spec.span("parallel.overlap"))


@rule("seq-len")
def _seq(spec, sink):
    t = spec.train
    if t is None:
        return
    limit = spec.model.max_seq
    if spec.model.rope.kind == "yarn":
        limit = max(limit, int(spec.model.rope.original_max_seq * spec.model.rope.factor))
    if t.seq_len > limit:
        sink.error(f"seq_len {t.seq_len} exceeds the model's maximum sequence {limit}",
                   spec.span("train.seq_len"), "raise `max_seq` in the model or shorten seq_len")
    if t.micro_batch > t.global_batch:
        sink.error(f"micro_batch {t.micro_batch} exceeds global_batch {t.global_batch}",
                   spec.span("train.micro_batch"))


@rule("lr-schedule")
def _lr(spec, sink):
    t = spec.train
    if t is None:
        return
    s = t.lr_schedule
    if s.kind == "warmup_cosine" and s.final_lr > t.optimizer.lr:
        sink.error(f"final_lr {s.final_lr:g} exceeds the peak lr {t.optimizer.lr:g}",
                   spec.span("train.lr_schedule.final_lr"))
    if s.total_steps is not None and s.warmup_steps > s.total_steps:
        sink.error("warmup_steps exceed total_steps", spec.span("train.lr_schedule.warmup_steps"))


@rule("expert-load-file")
def _expert_load(spec, sink):
    import os

    p = spec.parallel
    if p is None or p.expert_load is None:
        return
    path = os.path.join(os.path.dirname(spec.file), p.expert_load)
    if not os.path.isfile(path):
        sink.error(f"expert load file not found: '{p.expert_load}'",
                   spec.span("parallel.expert_load"),
                   "paths are relative to the spec; the file is a JSON histogram")


@rule("decode")
def _decode(spec, sink):
    d = spec.decode
    if d is None:
        return
    moes = _moes(spec)
    if not moes:
        sink.warning("the decode analysis assumes expert parallelism; the model has no MoE",
                     spec.span("decode"))
    if d.link in ("nic", "effective") and (spec.cluster is None or spec.cluster.network is None):
        sink.error(f"decode link = {d.link} but the cluster has no network",
                   spec.span("decode.link"), "use link = nvlink, or describe the network")
    if d.link == "nvlink" and spec.cluster is None:
        sink.error("decode link = nvlink but there is no cluster", spec.span("decode.link"))
