"""The invariants of a plan, written once: what a well-typed plan can still get wrong.

Each function returns `Problem`s (the key to fix, a message, a hint) and raises
nothing. The runtime runs `plan_problems` on every plan it reads (`plan.py`); the
spec's rules (`dsvc.dsl.rules*`) call the same functions on the spec's values and
only add the source location, so `dsvc check` and the runtime cannot disagree about
what is valid. Standard library only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .actions import ActionSyntaxError, parse_action


class Problem(NamedTuple):
    where: str  # the key to fix: a field name, or a dotted path from the plan's top
    message: str
    hint: str = ""
    code: str = ""  # the invariant's name; `dsvc check` shows it as the rule id


def divisors_near(n: int, x: int, count: int = 2) -> str:
    """The `count` divisors of n closest to x, for hints ("use 32 or 64"), in bounded time
    whatever n (a hint must not hang `check`): every divisor by trial division up to sqrt(n)
    for n up to 10^12; beyond that 1, n and those within 10^5 of x."""
    if n <= 10**12:
        small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
        divisors = set(small) | {n // d for d in small}
    else:
        divisors = {1, n} | {d for d in range(max(1, x - 10**5), x + 10**5) if n % d == 0}
    best = sorted(divisors, key=lambda d: (abs(d - x), d))[:count]
    return " or ".join(str(d) for d in sorted(best))


# ----------------------------------------------------------------------------- model


def moe_problems(name: str, routed: int, top_k: int, groups: int, top_groups: int) -> list[Problem]:
    """Routing over `groups` groups of experts, `top_groups` reachable, `top_k` chosen."""
    out = []
    if top_k > routed:
        out.append(Problem("top_k", f"top_k {top_k} exceeds the {routed} routed experts of ffn "
                                    f"'{name}'", f"top_k must be at most {routed}", "moe-top-k"))
    if routed % groups:
        out.append(Problem("groups", f"{routed} routed experts do not divide into {groups} groups",
                           f"use {divisors_near(routed, groups)} groups", "moe-groups-divide"))
    elif top_groups > groups:
        out.append(Problem("top_groups", f"top_groups {top_groups} exceeds groups {groups} in ffn "
                                         f"'{name}'", f"a token can reach at most {groups} groups", "moe-top-groups"))
    elif groups > 1 and top_k <= routed and top_k > top_groups * (routed // groups):
        out.append(Problem("top_k", f"top_k {top_k} cannot be met from {top_groups} group"
                                    f"{'s' if top_groups != 1 else ''} of {routed // groups} "
                                    "experts", "raise top_groups or lower top_k", "moe-top-groups"))
    if groups > 1 and top_groups < groups and routed % groups == 0 and routed // groups < 2:
        out.append(Problem("groups", f"groups of one expert cannot be ranked by their top-2 "
                                     f"scores (ffn '{name}')", f"use at most {routed // 2} groups", "moe-group-top2"))
    return out


def gqa_problems(name: str, heads: int, kv_heads: int, head_dim: int) -> list[Problem]:
    out = []
    if heads % kv_heads:
        out.append(Problem("kv_heads", f"{heads} heads do not divide into {kv_heads} kv_heads "
                                       f"(attention '{name}')",
                           f"use {divisors_near(heads, kv_heads)} kv_heads", "gqa-heads"))
    if head_dim % 2:
        out.append(Problem("head_dim", f"RoPE needs an even head_dim, got {head_dim} (attention "
                                       f"'{name}')", f"use {head_dim + 1}", "gqa-heads"))
    return out


def seq_len_problems(seq_len: int, max_seq_len: int) -> list[Problem]:
    if seq_len > max_seq_len:
        return [Problem("seq_len", f"seq_len {seq_len} exceeds the model's maximum sequence "
                                   f"{max_seq_len}", "raise the model's max_seq or shorten "
                                                     "seq_len", "seq-len")]
    return []


# ----------------------------------------------------------------------------- precision


def fp8_tile_problems(act_tile: int, weight_block: tuple[int, int]) -> list[Problem]:
    """Both scales apply per K-step of act_tile, and the weight's blocks are square."""
    rows, cols = weight_block
    if cols != act_tile:
        return [Problem("weight_block", f"weight block K {cols} differs from activation tile K "
                                        f"{act_tile}", "both scales are applied per K-step, so "
                                                       "the two must match", "fp8-tile-shapes")]
    if rows != cols:
        return [Problem("weight_block", f"weight blocks of {rows} x {cols} are not square",
                        f"use block({cols}, {cols}): the kernels scale weights in square blocks",
                        "fp8-tile-shapes")]
    return []


# ----------------------------------------------------------------------------- parallel, train


def mesh_problems(pipeline: int, data: int, expert: int, world_size: int, nodes: int = 0,
                  gpus_per_node: int = 0) -> list[Problem]:
    out = []
    if pipeline * data != world_size:
        out.append(Problem("world_size", f"pipeline {pipeline} x data {data} = {pipeline * data}, "
                                         f"not {world_size}"))
    if data % expert:
        out.append(Problem("expert", f"expert parallelism {expert} is not inside data "
                                     f"parallelism {data}",
                           f"EP groups live inside the data dimension; use "
                           f"{divisors_near(data, expert)}", "expert-parallel"))
    if nodes and gpus_per_node and nodes * gpus_per_node != world_size:
        out.append(Problem("nodes", f"{nodes} nodes x {gpus_per_node} GPUs != world_size "
                                    f"{world_size}"))
    return out


def batch_problems(global_batch: int, data: int, micro_batch: int) -> list[Problem]:
    denom = data * micro_batch
    if global_batch % denom:
        return [Problem("global_batch", f"global_batch {global_batch} is not divisible by data "
                                        f"{data} x micro_batch {micro_batch} = {denom}",
                        f"use a multiple of {denom}, e.g. "
                        f"{max(denom, global_batch // denom * denom)}", "micro-batches")]
    return []


def microbatch_problems(kind: str, pipeline: int, num_microbatches: int,
                        sequences_each: int = 0) -> list[Problem]:
    """What DualPipe and DualPipeV need: PP ranks (the README's PP), micro-batches even and
    at least 2 x PP for DualPipe, at least 2 x PP for DualPipeV. `sequences_each` (data x
    micro_batch), when given, lets the hint name the global_batch that would do."""
    m, need = num_microbatches, 2 * pipeline
    if kind == "dualpipe" and (m % 2 or m < need):
        good = max(need, m + m % 2)
        hint = f"global_batch = {good * sequences_each} would give {good}" if sequences_each else ""
        return [Problem("num_microbatches", f"DualPipe over {pipeline} ranks needs an even number "
                                            f"of at least {need} micro-batches; global_batch "
                                            f"gives {m}", hint, "micro-batches")]
    if kind == "dualpipev" and m < need:
        hint = f"global_batch = {need * sequences_each} would give {need}" if sequences_each else ""
        return [Problem("num_microbatches", f"DualPipeV over {pipeline} ranks needs at least "
                                            f"{need} micro-batches; global_batch gives {m}",
                        hint, "micro-batches")]
    return []


def lr_schedule_problems(kind: str, lr: float, warmup_steps: int, total_steps: int,
                         final_lr: float) -> list[Problem]:
    out = []
    if kind == "warmup_cosine" and final_lr > lr:
        out.append(Problem("final_lr", f"final_lr {final_lr:g} exceeds the peak lr {lr:g}", "",
                           "lr-schedule"))
    if kind == "warmup_cosine" and total_steps <= warmup_steps:
        out.append(Problem("total_steps", f"warmup_cosine needs total_steps > warmup_steps "
                                          f"({total_steps} <= {warmup_steps})", "", "lr-schedule"))
    return out


# ----------------------------------------------------------------------------- a whole plan


def plan_problems(plan) -> list[Problem]:
    """Every invariant of a typed plan (`plan.Plan`), each problem at its full key path."""
    out: list[Problem] = []

    def under(prefix: str, problems: list[Problem]) -> None:
        out.extend(Problem(f"{prefix}.{p.where}", p.message, p.hint) for p in problems)

    m = plan.model
    for name, a in sorted(m.attention.items()):
        if a.kind == "gqa":
            under(f"model.attention.{name}", gqa_problems(name, a.heads, a.kv_heads, a.head_dim))
    for name, f in sorted(m.ffn.items()):
        if f.kind == "moe":
            under(f"model.ffn.{name}", moe_problems(name, f.routed, f.top_k, f.groups,
                                                    f.top_groups))
    out += _layer_problems(m)
    formats = {"precision.linear": plan.precision.linear}
    formats.update({f"precision.linear_overrides.{r}": f
                    for r, f in sorted(plan.precision.linear_overrides.items())})
    for where, fmt in formats.items():
        if fmt.format.startswith("fp8"):
            under(where, fp8_tile_problems(fmt.act_tile, fmt.weight_block))
    mesh, t = plan.mesh, plan.train
    under("mesh", mesh_problems(mesh.pipeline, mesh.data, mesh.expert, mesh.world_size,
                                mesh.nodes, mesh.gpus_per_node))
    under("train", batch_problems(t.global_batch, mesh.data, t.micro_batch))
    under("train", seq_len_problems(t.seq_len, m.max_seq_len))
    s = t.lr_schedule
    under("train.lr_schedule", lr_schedule_problems(s.kind, t.optimizer.lr, s.warmup_steps,
                                                    s.total_steps, s.final_lr))
    if t.data.kind == "tokens" and not t.data.path:
        out.append(Problem("train.data.path", "token data needs a path"))
    if any(not 0 <= b < 1 for b in t.optimizer.betas):
        out.append(Problem("train.optimizer.betas", f"expected [beta1, beta2] in [0, 1), got "
                                                    f"{list(t.optimizer.betas)}"))
    out += _stage_problems(plan)
    out += _expert_problems(plan)
    out += _schedule_problems(plan)
    return out


def _layer_problems(m) -> list[Problem]:
    out = []
    if not m.layers:
        out.append(Problem("model.layers", "a model needs at least one layer"))
    for i, layer in enumerate(m.layers):
        if layer.attention not in m.attention:
            out.append(Problem(f"model.layers[{i}].attention",
                               f"no attention named {layer.attention!r}"))
        if layer.ffn not in m.ffn:
            out.append(Problem(f"model.layers[{i}].ffn", f"no ffn named {layer.ffn!r}"))
    if m.mtp.depth:
        if m.mtp.attention and m.mtp.attention not in m.attention:
            out.append(Problem("model.mtp.attention", f"no attention named {m.mtp.attention!r}"))
        if m.mtp.ffn and m.mtp.ffn not in m.ffn:
            out.append(Problem("model.mtp.ffn", f"no ffn named {m.mtp.ffn!r}"))
    if m.rope.kind == "yarn" and m.rope.original_max_seq < 1:
        out.append(Problem("model.rope.original_max_seq", "YaRN needs the original context "
                                                          "length"))
    return out


def _stage_problems(plan) -> list[Problem]:
    stages, mesh, kind = plan.stages, plan.mesh, plan.schedule.kind
    if not stages:
        return [Problem("stages", "a plan needs at least one stage")]
    if sorted(s.index for s in stages) != list(range(len(stages))):
        return [Problem("stages", "stage indices must be 0, 1, ... in order, each once")]
    out = []
    ordered = sorted(stages, key=lambda s: s.index)
    for s in ordered:
        if not 0 <= s.rank < mesh.pipeline:
            out.append(Problem(f"stages[{s.index}].rank", f"pipeline rank {s.rank} outside "
                                                          f"0..{mesh.pipeline - 1}"))
        if s.mtp and not s.head:
            out.append(Problem(f"stages[{s.index}].mtp", "MTP shares the output head: put it on "
                                                         "the head stage"))
    copies = {s.copy for s in stages}
    if kind != "dualpipe" and copies != {"A"}:
        out.append(Problem("stages", f"copy B stages exist only under dualpipe, not {kind}"))
    num_layers = len(plan.model.layers)
    for copy in sorted(copies):
        chain = [s for s in ordered if s.copy == copy]
        flat = [layer for s in chain for layer in s.layers]
        if flat != list(range(num_layers)):
            out.append(Problem("stages", f"copy {copy}: stages must hold layers "
                                         f"0..{num_layers - 1} in order, each once; got {flat}"))
        if not chain[0].embedding or any(s.embedding for s in chain[1:]):
            out.append(Problem("stages", f"copy {copy}: the embedding belongs to its first stage "
                                         "only"))
        if not chain[-1].head or any(s.head for s in chain[:-1]):
            out.append(Problem("stages", f"copy {copy}: the head belongs to its last stage only"))
        if plan.model.mtp.depth and not chain[-1].mtp:
            out.append(Problem("stages", f"copy {copy}: MTP (depth {plan.model.mtp.depth}) needs "
                                         "the head stage"))
    pp = mesh.pipeline
    per_rank = [[s.index for s in ordered if s.rank == k] for k in range(pp)]
    if kind in ("1f1b", "zb1p") and per_rank != [[k] for k in range(pp)]:
        out.append(Problem("stages", f"{kind} runs stage i on pipeline rank i; got {per_rank}"))
    if kind == "dualpipev" and per_rank != [[k, 2 * pp - 1 - k] for k in range(pp)]:
        out.append(Problem("stages", f"dualpipev runs stages i and {2 * pp - 1}-i on rank i; got "
                                     f"{per_rank}"))
    if kind == "dualpipe" and len(stages) != 2 * pp:
        out.append(Problem("stages", f"dualpipe holds two copies of {pp} stages: expected "
                                     f"{2 * pp} stages"))
    return out


def _expert_problems(plan) -> list[Problem]:
    m, mesh, out = plan.model, plan.mesh, []
    used = {layer.ffn for layer in m.layers}
    if m.mtp.depth and m.layers:
        used.add(m.mtp_block().ffn)
    for name in sorted(used):
        ffn = m.ffn.get(name)
        if ffn is None or ffn.kind != "moe":
            continue
        where = f"experts.{name}"
        place = plan.experts.get(name)
        if place is None:
            out.append(Problem(where, f"MoE ffn {name!r} has no expert placement"))
            continue
        if len(place.per_rank) != mesh.expert:
            out.append(Problem(f"{where}.per_rank", f"one list per EP rank: expected "
                                                    f"{mesh.expert}, got {len(place.per_rank)}"))
        if sorted(e for ranks in place.per_rank for e in ranks) != list(range(ffn.routed)):
            out.append(Problem(f"{where}.per_rank", f"must place experts 0..{ffn.routed - 1} "
                                                    "exactly once"))
        if len({len(x) for x in place.per_rank}) > 1:
            out.append(Problem(f"{where}.per_rank", "every EP rank must hold the same number of "
                                                    "experts"))
        size = ffn.routed // max(ffn.groups, 1)
        if place.group_of_expert and place.group_of_expert != tuple(
                e // size for e in range(ffn.routed)):
            out.append(Problem(f"{where}.group_of_expert", "groups are contiguous id ranges: "
                                                           "expert e is in group e // (routed / "
                                                           "groups)"))
        if place.two_hop and (not mesh.gpus_per_node or mesh.expert % mesh.gpus_per_node):
            out.append(Problem(f"{where}.two_hop", "the two-hop path needs mesh.gpus_per_node "
                                                   "dividing mesh.expert"))
    return out


def _schedule_problems(plan) -> list[Problem]:
    sch, t, mesh, out = plan.schedule, plan.train, plan.mesh, []
    denom = t.micro_batch * mesh.data
    if t.global_batch % denom == 0 and sch.num_microbatches != t.global_batch // denom:
        out.append(Problem("schedule.num_microbatches",
                           f"global_batch {t.global_batch} / (data {mesh.data} x micro_batch "
                           f"{t.micro_batch}) = {t.global_batch // denom}, not "
                           f"{sch.num_microbatches}"))
    out += [Problem(f"schedule.{p.where}", p.message, p.hint)
            for p in microbatch_problems(sch.kind, mesh.pipeline, sch.num_microbatches)]
    if not sch.actions:
        return out
    if len(sch.actions) != mesh.pipeline:
        out.append(Problem("schedule.actions", f"need an action list for every pipeline rank "
                                               f"0..{mesh.pipeline - 1}, got {len(sch.actions)}"))
    stage_rank = {s.index: s.rank for s in plan.stages}
    for rank, acts in enumerate(sch.actions):
        shown = 0
        for i, text in enumerate(acts):
            problem = _action_problem(text, rank, stage_rank, sch.num_microbatches)
            if problem:
                out.append(Problem(f"schedule.actions[{rank}][{i}]", problem))
                shown += 1
                if shown == 3:  # a wrong list repeats one problem
                    out.append(Problem(f"schedule.actions[{rank}]", "more problems in this list "
                                                                    "not shown"))
                    break
    return out


def _action_problem(text: str, rank: int, stage_rank: dict, num_microbatches: int) -> str:
    try:
        action = parse_action(text)
    except ActionSyntaxError:
        return f"not an action string: {text!r}"
    for part in action.parts():
        if stage_rank.get(part.stage) != rank:
            return f"{text!r}: stage {part.stage} is not on rank {rank}"
        if part.microbatch >= num_microbatches:
            return f"{text!r}: micro-batch {part.microbatch} out of range"
    return ""
