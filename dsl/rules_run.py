"""Cross-field rules about the cluster, the parallel plan, training and decoding.

Registered in `dsl.rules.RULES` (imported at the end of dsl/rules.py, so the
order of RULES is the order of the two files).
"""

from __future__ import annotations

from dsvc.dsl.limits import (
    MAX_EXPERTS,
    MAX_REDUNDANT_EXPERTS,
    MAX_SCHEDULE_CHUNKS,
    MAX_WORLD_SIZE,
)
from dsvc.dsl.rules import _divisors_near, _moes, rule

# ----------------------------------------------------------------------------- cluster


@rule("size-limits")
def _size_limits(spec, sink):
    """Counts that drive the work of report / inspect / compile, bounded (dsl/limits.py);
    the layer count is bounded where layers are read, schedule chunks with micro-batches."""
    c, p = spec.cluster, spec.parallel
    if c is not None and c.world_size > MAX_WORLD_SIZE:
        sink.error(f"{c.nodes:,} nodes x {c.gpus_per_node:,} GPUs = {c.world_size:,} GPUs, past "
                   f"the limit of {MAX_WORLD_SIZE:,}", spec.span("cluster.nodes"),
                   "the simulator walks every collective group's ranks (docs/limits.md)")
    for name, f in sorted(spec.model.ffns.items()):
        if f.kind == "moe" and f.routed > MAX_EXPERTS:
            sink.error(f"{f.routed:,} routed experts in ffn '{name}', past the limit of "
                       f"{MAX_EXPERTS:,}", spec.span(f"model.ffn.{name}.routed"),
                       "expert placement is planned per layer and expert (docs/limits.md)")
    if p is not None and p.redundant_experts > MAX_REDUNDANT_EXPERTS:
        sink.error(f"{p.redundant_experts:,} redundant experts, past the limit of "
                   f"{MAX_REDUNDANT_EXPERTS:,}", spec.span("parallel.redundant_experts"),
                   "replicas are placed per layer, replica and EP rank (docs/limits.md)")


@rule("bandwidth-effective", needs=("cluster",))
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


@rule("nvlink-domain", needs=("cluster",))
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


@rule("fat-tree-capacity", needs=("cluster",))
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


# What one GPU's links run at in hardware that exists, in bytes/s. NICs: 1 GbE at the bottom;
# 800 Gb/s per port today (ConnectX-8, Quantum-X800), 1.6 Tb/s announced. NVLink per GPU:
# 1.8 TB/s both directions on B200 (NVLink 5), 3.6 TB/s on Rubin (NVLink 6), whichever way a
# spec counts it; PCIe-only boxes well below, but not below 1 GB/s. Outside these a unit
# slipped: bits for bytes (x8) or a prefix (x1000); the warning says which reading fits.
NIC_RANGE = (1e9 / 8, 1.6e12 / 8)
NVLINK_RANGE = (1e9, 3.6e12)


def _readable(value: float, bits: bool) -> str:
    """`value` bytes/s as the number and decimal prefix a person writes: 400 GB/s, 400 Gb/s."""
    v = value * 8 if bits else value
    prefix = next((p for p, f in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))
                   if v >= f), "")
    scale = {"P": 1e15, "T": 1e12, "G": 1e9, "M": 1e6, "K": 1e3, "": 1.0}[prefix]
    return f"{v / scale:g} {prefix}{'b' if bits else 'B'}/s"


def _slip(value: float, lo: float, hi: float, bits_usual: bool) -> str | None:
    """What the user likely meant, written as they would write it, when that is plausible."""
    if bits_usual and lo <= value / 8 <= hi:  # `400 GB/s` for a 400 Gb/s NIC
        return _readable(value, False).replace("B/s", "b/s")
    if not bits_usual and lo <= value * 8 <= hi:  # `400 Gb/s` for 400 GB/s of NVLink
        return _readable(value, True).replace("b/s", "B/s")
    for step in (1e-3, 1e3):  # a prefix off by one: TB/s for GB/s, Mb/s for Gb/s
        if lo <= value * step <= hi:
            return _readable(value * step, bits_usual)
    return None


@rule("link-bandwidth", needs=("cluster",))
def _link_bandwidth(spec, sink):
    c = spec.cluster
    if c is None:
        return
    checks = [("NVLink bandwidth", c.nvlink.bandwidth, NVLINK_RANGE, False,
               "cluster.nvlink.bandwidth")]
    if c.network is not None:
        checks.append(("NIC line rate", c.network.nic, NIC_RANGE, True, "cluster.network.nic"))
    for what, value, (lo, hi), bits, path in checks:
        if lo <= value <= hi:
            continue
        written = _readable(value, False) + (f" ({_readable(value, True)})" if bits else "")
        side = "above" if value > hi else "below"
        limit = _readable(hi if value > hi else lo, bits)
        meant = _slip(value, lo, hi, bits)
        hint = (f"did you mean `{meant}`? " if meant else "") + "bandwidths here are per GPU; " \
            "NICs are sold in Gb/s (bits), NVLink in GB/s (bytes)"
        sink.warning(f"{what} {written} per GPU is {side} what hardware offers ({limit})",
                     spec.span(path), hint)


@rule("gpu-rates", needs=("cluster",))
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
    stages = p.stages_per_copy
    if stages > n:
        per_rank = stages // p.pipeline
        sink.error(f"{stages} pipeline stages ({p.schedule} over {p.pipeline} ranks) exceed the "
                   f"model's {n} layers", spec.span("parallel.pipeline"),
                   f"use at most {n // per_rank} pipeline ranks")
    if p.schedule == "dualpipe" and p.pipeline % 2:
        sink.error(f"DualPipe needs an even number of pipeline ranks, got {p.pipeline}",
                   spec.span("parallel.pipeline"),
                   f"use {' or '.join(str(x) for x in (p.pipeline - 1, p.pipeline + 1) if x > 0)}"
                   ", or schedule = 1f1b")
    if p.layers_per_stage is not None:
        lps = p.layers_per_stage
        span = spec.span("parallel.layers_per_stage")
        if len(lps) != stages:
            sink.error(f"layers_per_stage lists {len(lps)} stages, the plan cuts the model into "
                       f"{stages}", span, "one entry per stage of one model copy")
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
    span = spec.span("train.global_batch")
    chunks = m * p.stages_per_copy
    if chunks > MAX_SCHEDULE_CHUNKS:  # every chunk is generated, checked, simulated, drawn
        sink.error(f"{p.stages_per_copy} pipeline stage{'s' if p.stages_per_copy != 1 else ''} "
                   f"x {m:,} micro-batches = {chunks:,} schedule chunks, past the limit of "
                   f"{MAX_SCHEDULE_CHUNKS:,}", span,
                   "raise micro_batch or data parallelism, or lower global_batch "
                   "(docs/limits.md)")
        return
    # DualPipe: PP ranks (the README's PP), micro-batches even and at least 2 x PP, half fed
    # from each end. DualPipeV: 2 stages per rank, at least 2 x ranks micro-batches.
    need = 2 * p.pipeline
    if p.schedule == "dualpipe" and (m % 2 or m < need):
        good = max(need, m + m % 2)
        sink.error(f"DualPipe over {p.pipeline} ranks needs an even number of at least {need} "
                   f"micro-batches; global_batch gives {m}", span,
                   f"global_batch = {good * denom} would give {good}")
    if p.schedule == "dualpipev" and m < need:
        sink.error(f"DualPipeV over {p.pipeline} ranks needs at least {need} "
                   f"micro-batches; global_batch gives {m}", span,
                   f"global_batch = {need * denom} would give {need}")
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
        elif f.routed % p.expert == 0 and \
                p.redundant_experts // p.expert > f.routed - f.routed // p.expert:
            # a rank replicates only experts it does not hold: past that a slot stays empty
            most = p.expert * (f.routed - f.routed // p.expert)
            sink.error(f"{p.redundant_experts} redundant experts cannot be placed: each of the "
                       f"{p.expert} EP ranks can take a replica only of the "
                       f"{f.routed - f.routed // p.expert} experts of ffn '{f.name}' it does "
                       "not hold", spec.span("parallel.redundant_experts"),
                       f"use at most {most}")
    if moes and p.redundant_experts and p.redundant_experts % p.expert == 0:
        # the trainer's plan (v1) has no replicated experts: say so before anyone trains
        sink.warning(f"{p.redundant_experts} redundant experts appear in `dsvc inspect`'s "
                     "placement, but the trainer `dsvc compile` generates runs each expert's "
                     "primary copy only", spec.span("parallel.redundant_experts"),
                     "plan v1 has no replicas yet (docs/ir.md): the report and the simulated "
                     "step charge the primary placement, as the trainer runs it")


def _domains_per_group(routed: int, groups: int, expert: int, domain: int) -> int:
    """The most scale-up domains one routing group's experts occupy: experts in order over
    the EP ranks (as dsvc places them), EP ranks consecutive GPUs (as the mesh lays them)."""
    per_group, per_rank = routed // groups, routed // expert

    def domain_of(e: int) -> int:
        return e // per_rank // domain

    return max(domain_of((g + 1) * per_group - 1) - domain_of(g * per_group) + 1
               for g in range(groups))


@rule("node-limited-routing")
def _node_limited(spec, sink):
    # Node-limited routing (DeepSeek-V3 sec. 2.1.2) bounds the scale-up domains a token's
    # dispatch crosses the network to: top_groups groups, each on as few domains as possible.
    # The domain is the NVLink domain (a node of 8, or a 72-GPU NVL72 rack), not a node: inside
    # it nothing crosses the network, and groups there limit devices (DeepSeek-V2's
    # device-limited routing, EP 8 in a node), which costs no network bytes either way.
    p, c = spec.parallel, spec.cluster
    if p is None or c is None or p.expert <= 1:
        return
    domain = c.nvlink.domain
    domains = -(-p.expert // domain)  # scale-up domains one EP group spans
    if domains <= 1:
        return
    for f in _moes(spec):
        if not (f.groups > 1 and f.top_groups < f.groups) or f.routed % f.groups \
                or f.routed % p.expert:
            continue  # not group-limited, or a shape other rules reject
        per_group = _domains_per_group(f.routed, f.groups, p.expert, domain)
        if min(domains, f.top_groups * per_group) < min(domains, f.top_k):
            continue
        fix = (f"set groups = {domains} (one group per NVLink domain) and top_groups below it"
               if f.routed % domains == 0 and p.expert % domain == 0 else
               f"an EP group of whole NVLink domains ({domain} GPUs each), one group per domain")
        sink.warning(f"ffn '{f.name}' routes over {f.groups} groups but its EP group of "
                     f"{p.expert} ranks spans {domains} NVLink domains of {domain} GPUs: "
                     f"top_groups = {f.top_groups} does not limit the domains a token reaches "
                     "over the network", spec.span(f"model.ffn.{f.name}.groups"), fix)


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
    from dsvc.runtime.inputs import InputError, check_regular_file

    path = os.path.join(os.path.dirname(spec.file), p.expert_load)
    try:
        check_regular_file(path)
    except InputError as err:
        what = "not found" if not os.path.lexists(path) else err.reason
        sink.error(f"expert load file {what}: '{p.expert_load}'" if what == "not found" else
                   f"expert load file '{p.expert_load}' {what}",
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
