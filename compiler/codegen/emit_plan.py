"""Pass `emit_plan`: the runtime's plan, constructed from what the passes decided.

The plan's schema is the runtime's (`dsvc.runtime.plan`, docs/plan.md); this pass
only constructs its records, from the graph: stages and their layers from
`partition_stages`, expert placement from `place_experts`, per-linear formats from
`assign_precision` (a role whose ops compute in another format than the policy's
linear default gets a `linear_overrides` entry), the action lists from `schedule`.
What the format cannot say yet is listed in the plan's `comment`. The result is
`graph.plan`; `dsvc.runtime.plan.dump_plan` gives its JSON (`plan.json`).
"""

from __future__ import annotations

import os

from dsvc import __version__
from dsvc.dsl.diagnostics import Diagnostic, SpecError
from dsvc.runtime import plan as P
from dsvc.runtime.plan_check import plan_problems


def emit_plan(graph, fp8_backend: str = "torch"):
    """A copy of `graph` with `plan` set (after the schedule pass)."""
    assert graph.schedule is not None, "emit_plan runs after the schedule pass"
    spec, notes = graph.spec, []
    plan = P.Plan(
        version=P.PLAN_VERSION,
        model=model_record(spec.model),
        precision=_precision(graph, fp8_backend),
        mesh=_mesh(spec),
        stages=tuple(P.Stage(index=s.index, rank=s.device, copy=s.copy, layers=tuple(s.layers),
                             embedding=s.embedding, head=s.head, mtp=s.mtp)
                     for s in sorted(graph.partition.stages, key=lambda s: s.index)),
        experts=_experts(graph, notes),
        schedule=_schedule(spec, graph.schedule),
        train=_train(spec, notes),
        source=P.Source(spec=os.path.basename(spec.file), content_hash=spec.content_hash,
                        passes=(*graph.passes, "emit_plan"), dsvc=__version__),
        comment=tuple(notes),
    )
    problems = plan_problems(plan)
    assert not problems, f"the compiler emitted an invalid plan: {problems}"
    out = graph.derive("emit_plan")
    out.plan = plan
    return out


def model_record(m) -> P.Model:
    """The plan's `model` of a spec's model (`spec.model`)."""
    r = m.rope
    atts = {}
    for name, a in sorted(m.attentions.items()):
        if a.kind == "mla":
            atts[name] = P.Attention(kind="mla", heads=a.heads, q_lora_rank=a.q_lora_rank,
                                     kv_lora_rank=a.kv_lora_rank, qk_nope_dim=a.qk_nope_dim,
                                     qk_rope_dim=a.qk_rope_dim, v_dim=a.v_dim)
        else:
            atts[name] = P.Attention(kind="gqa", heads=a.heads, kv_heads=a.kv_heads,
                                     head_dim=a.head_dim, qkv_bias=a.qkv_bias)
    ffns = {}
    for name, f in sorted(m.ffns.items()):
        if f.kind == "dense":
            ffns[name] = P.Ffn(kind="dense", intermediate=f.intermediate)
            continue
        ffns[name] = P.Ffn(kind="moe", routed=f.routed, shared=f.shared, top_k=f.top_k,
                           intermediate=f.intermediate,
                           shared_intermediate=f.shared_intermediate, score=f.score,
                           groups=f.groups, top_groups=f.top_groups, route_scale=f.route_scale,
                           bias_update_rate=f.bias_update_rate if f.balance == "bias" else 0.0,
                           seq_aux_loss=f.seq_aux_loss, renormalize=f.renormalize)
    return P.Model(
        vocab=m.vocab, hidden=m.hidden, norm_eps=m.norm.eps, max_seq_len=m.max_seq,
        rope=P.Rope(kind=r.kind, theta=r.theta, factor=r.factor,
                    original_max_seq=r.original_max_seq, beta_fast=r.beta_fast,
                    beta_slow=r.beta_slow, mscale=r.mscale,
                    # the spec's 0 is "not given": one mscale for both, as DeepSeek-V3's reference
                    mscale_all_dim=r.mscale_all_dim or r.mscale),
        attention=atts, ffn=ffns,
        layers=tuple(P.LayerSpec(attention=lay.attention, ffn=lay.ffn) for lay in m.layers),
        mtp=P.Mtp(depth=m.mtp.depth, loss_weight=m.mtp.loss_weight),
        tie_embeddings=m.tie_embeddings,
    )


def _format(dtype: str, lin) -> P.LinearFormat:
    if dtype.startswith("fp8"):
        return P.LinearFormat(format=dtype, act_tile=lin.act_tile[1],
                              weight_block=tuple(lin.weight_block), ue8m0=lin.scales == "ue8m0",
                              pad=lin.pad)
    return P.LinearFormat(format=dtype)


def _precision(graph, fp8_backend: str) -> P.Precision:
    spec = graph.spec
    pol = spec.precision
    bad = [(k, v) for k, v in (("default", pol.default), ("optimizer_states", pol.optimizer_states),
                               ("combine", pol.combine)) if v not in P.DTYPES]
    if bad:
        raise SpecError([Diagnostic("error", f"precision {k} = {v}: the runtime runs fp32 or bf16",
                                    spec.span(f"precision.{k}")) for k, v in bad])
    default_linear = _format(pol.linear.format, pol.linear)
    overrides = {}
    for op in graph.ops():  # the format each linear role actually got
        role = op.attr("role")
        if role is None or role == "head" or op.kind == "router":
            continue
        fmt = _format(op.dtype, pol.linear)
        if fmt != default_linear:
            overrides[role] = fmt
    kept = {c: pol.keep.get(c, "fp32" if c == "norm" else pol.default)
            for c in P.KEPT_COMPONENTS}
    return P.Precision(default=pol.default, linear=default_linear,
                       linear_overrides=dict(sorted(overrides.items())), kept=kept,
                       master_weights=pol.master_weights, grads=pol.grads,
                       optimizer_states=pol.optimizer_states, dispatch=pol.dispatch,
                       combine=pol.combine, fp8_backend=fp8_backend)


def _mesh(spec) -> P.Mesh:
    p, c = spec.parallel, spec.cluster
    mesh = {"pipeline": p.pipeline, "data": p.data, "expert": p.expert,
            "world_size": p.pipeline * p.data}
    if c.world_size == p.pipeline * p.data:
        mesh.update(nodes=c.nodes, gpus_per_node=c.gpus_per_node)
    return P.Mesh(**mesh)


def _experts(graph, notes: list) -> dict[str, P.ExpertPlacement]:
    spec = graph.spec
    p, c = spec.parallel, spec.cluster
    gpn = c.gpus_per_node
    two_hop = bool(p.two_hop and gpn and p.expert > gpn and p.expert % gpn == 0)
    out: dict = {}
    replicas = False
    for op in graph.ops():
        if op.kind != "experts" or op.attr("ffn") in out:
            continue
        place = op.attr("placement")
        per = place.routed // len(place.per_rank)
        out[op.attr("ffn")] = P.ExpertPlacement(
            per_rank=tuple(tuple(ids[:per]) for ids in place.per_rank),
            group_of_expert=tuple(place.group_of_expert), two_hop=two_hop)
        replicas = replicas or place.replicas > 0
    if replicas:
        notes.append("redundant (replicated) experts are not expressible in plan v1: primary "
                     "placement only")
    return dict(sorted(out.items()))


def _schedule(spec, sched) -> P.Schedule:
    from dsvc.compiler.schedules import SCHEDULE_FORMAT_VERSION

    p = spec.parallel
    return P.Schedule(kind=p.schedule, num_microbatches=spec.micro_batches,
                      overlap=p.overlap == "dual_microbatch",
                      actions=tuple(tuple(str(a) for a in acts) for acts in sched.actions),
                      version=SCHEDULE_FORMAT_VERSION)


def _train(spec, notes: list) -> P.Train:
    t = spec.train
    o, s, d = t.optimizer, t.lr_schedule, t.data
    total = s.total_steps if s.total_steps is not None else t.steps
    if s.kind == "warmup_cosine" and total <= s.warmup_steps:
        notes.append(f"lr_schedule: {total} steps end inside the {s.warmup_steps}-step warm-up; "
                     f"total_steps set to {s.warmup_steps + 1}")
        total = s.warmup_steps + 1
    return P.Train(
        seq_len=t.seq_len, global_batch=t.global_batch, micro_batch=t.micro_batch, steps=t.steps,
        optimizer=P.Optimizer(kind="adamw", lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                              weight_decay=o.weight_decay, grad_clip=o.grad_clip),
        lr_schedule=P.LrSchedule(kind=s.kind, warmup_steps=s.warmup_steps, final_lr=s.final_lr,
                                 total_steps=total),
        data=P.Data(kind=d.kind, path=d.path or "", dtype=d.dtype),
        seed=t.seed, recompute=t.recompute,
    )
