"""The plan.json emitter: the partitioned, placed graph + spec -> the runtime's plan dict.

The format is the runtime's (`runtime/plan.py`, docs/plan.md); this module
only fills it in, from decisions the passes made: stages and their layers
from `partition_stages`, expert placement from `place_experts`, per-linear
formats from `assign_precision` (a role whose ops compute in another format
than the policy's linear default gets a `linear_overrides` entry). The
schedule's action lists are left empty for the schedule pass to fill.
Things the plan format cannot say yet are listed in `plan["comment"]`.

    from dsvc.compiler.plan import build_plan
    plan = build_plan(dsl.load("examples/tiny.dsv"))     # a dict; json.dump it
"""

from __future__ import annotations

from dsvc.dsl.diagnostics import Diagnostic, SpecError

_PLAN_DTYPES = ("fp32", "bf16")


def build_plan(spec, expert_load: str | None = None, fp8_backend: str = "torch") -> dict:
    """Run the graph passes and emit the plan dict (validated by runtime.plan in tests)."""
    from dsvc.compiler.pipeline import run_until

    return emit_plan(run_until(spec, "insert_comm", expert_load=expert_load), fp8_backend)


def emit_plan(graph, fp8_backend: str = "torch") -> dict:
    """The plan dict of a graph that went through partition_stages and place_experts."""
    from dsvc import __version__
    from dsvc.runtime.plan import PLAN_VERSION

    assert graph.pipeline is not None and "place_experts" in graph.passes
    spec, notes = graph.spec, []
    plan = {
        "version": PLAN_VERSION,
        "model": _model(spec),
        "precision": _precision(graph, fp8_backend),
        "mesh": _mesh(spec),
        "stages": [{"index": s.index, "rank": s.device, "copy": s.copy, "layers": list(s.layers),
                    "embedding": s.embedding, "head": s.head, "mtp": s.mtp}
                   for s in sorted(graph.pipeline.stages, key=lambda s: s.index)],
        "experts": _experts(graph, notes),
        "schedule": _schedule(spec),
        "train": _train(spec, notes),
        "source": {"spec": spec.file, "content_hash": spec.content_hash,
                   "passes": list(graph.passes), "dsvc": __version__},
    }
    if notes:
        plan["comment"] = notes
    return plan


def _model(spec) -> dict:
    m = spec.model
    r = m.rope
    atts = {}
    for name, a in sorted(m.attentions.items()):
        if a.kind == "mla":
            atts[name] = {"kind": "mla", "heads": a.heads, "q_lora_rank": a.q_lora_rank,
                          "kv_lora_rank": a.kv_lora_rank, "qk_nope_dim": a.qk_nope_dim,
                          "qk_rope_dim": a.qk_rope_dim, "v_dim": a.v_dim}
        else:
            atts[name] = {"kind": "gqa", "heads": a.heads, "kv_heads": a.kv_heads,
                          "head_dim": a.head_dim, "qkv_bias": a.qkv_bias}
    ffns = {}
    for name, f in sorted(m.ffns.items()):
        if f.kind == "dense":
            ffns[name] = {"kind": "dense", "intermediate": f.intermediate}
            continue
        ffns[name] = {"kind": "moe", "routed": f.routed, "shared": f.shared, "top_k": f.top_k,
                      "intermediate": f.intermediate,
                      "shared_intermediate": f.shared_intermediate, "score": f.score,
                      "groups": f.groups, "top_groups": f.top_groups,
                      "route_scale": f.route_scale,
                      "bias_update_rate": f.bias_update_rate if f.balance == "bias" else 0.0,
                      "seq_aux_loss": f.seq_aux_loss, "renormalize": f.renormalize}
    return {
        "vocab": m.vocab, "hidden": m.hidden, "norm_eps": m.norm.eps, "max_seq_len": m.max_seq,
        "rope": {"kind": r.kind, "theta": r.theta, "factor": r.factor,
                 "original_max_seq": r.original_max_seq, "beta_fast": r.beta_fast,
                 "beta_slow": r.beta_slow, "mscale": r.mscale,
                 # the spec's 0 is "not given": one mscale for both, as DeepSeek-V3's reference
                 "mscale_all_dim": r.mscale_all_dim or r.mscale},
        "attention": atts, "ffn": ffns,
        "layers": [{"attention": lay.attention, "ffn": lay.ffn} for lay in m.layers],
        "mtp": {"depth": m.mtp.depth, "loss_weight": m.mtp.loss_weight},
        "tie_embeddings": m.tie_embeddings,
    }


def _format(dtype: str, lin) -> dict | str:
    if dtype.startswith("fp8"):
        return {"format": dtype, "act_tile": lin.act_tile[1], "weight_block": list(lin.weight_block),
                "ue8m0": lin.scales == "ue8m0", "pad": lin.pad}
    return dtype


def _precision(graph, fp8_backend: str) -> dict:
    spec = graph.spec
    pol = spec.precision
    bad = [(k, v) for k, v in (("default", pol.default), ("optimizer_states", pol.optimizer_states),
                               ("combine", pol.combine)) if v not in _PLAN_DTYPES]
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
            for c in ("embedding", "head", "router", "attention_core", "norm")}
    return {"default": pol.default, "linear": default_linear,
            "linear_overrides": dict(sorted(overrides.items())), "kept": kept,
            "master_weights": pol.master_weights, "grads": pol.grads,
            "optimizer_states": pol.optimizer_states, "dispatch": pol.dispatch,
            "combine": pol.combine, "fp8_backend": fp8_backend}


def _mesh(spec) -> dict:
    p, c = spec.parallel, spec.cluster
    pp, dp = (p.pipeline, p.data) if p is not None else (1, 1)
    mesh = {"pipeline": pp, "data": dp, "expert": p.expert if p is not None else 1,
            "world_size": pp * dp}
    if c is not None and c.world_size == pp * dp:
        mesh.update(nodes=c.nodes, gpus_per_node=c.gpus_per_node)
    return mesh


def _experts(graph, notes: list) -> dict:
    spec = graph.spec
    p, c = spec.parallel, spec.cluster
    ep = p.expert if p is not None else 1
    gpn = c.gpus_per_node if c is not None else 0
    two_hop = bool(p is not None and p.two_hop and gpn and ep > gpn and ep % gpn == 0)
    out: dict = {}
    replicas = False
    for op in graph.ops():
        if op.kind != "experts" or op.attr("ffn") in out:
            continue
        place = op.attr("placement")
        per = place.routed // len(place.per_rank)
        out[op.attr("ffn")] = {"per_rank": [list(ids[:per]) for ids in place.per_rank],
                               "group_of_expert": list(place.group_of_expert), "two_hop": two_hop}
        replicas = replicas or any(o.attr("placement").replicas for o in graph.ops()
                                   if o.kind == "experts")
    if replicas:
        notes.append("redundant (replicated) experts are not expressible in plan v1: primary "
                     "placement only")
    return out


def _schedule(spec) -> dict:
    p = spec.parallel
    kind = p.schedule if p is not None else "1f1b"
    m = spec.micro_batches if spec.train is not None and p is not None else 1
    return {"kind": kind, "num_microbatches": m,
            "overlap": bool(p is not None and p.overlap == "dual_microbatch"), "actions": {}}


def _train(spec, notes: list) -> dict:
    t = spec.train
    if t is None:
        raise SpecError([Diagnostic("error", "a plan needs a `train` block (batch, optimizer, data)",
                                    spec.span("model"))])
    o, s, d = t.optimizer, t.lr_schedule, t.data
    total = s.total_steps if s.total_steps is not None else t.steps
    if s.kind == "warmup_cosine" and total <= s.warmup_steps:
        notes.append(f"lr_schedule: {total} steps end inside the {s.warmup_steps}-step warm-up; "
                     f"total_steps set to {s.warmup_steps + 1}")
        total = s.warmup_steps + 1
    return {
        "seq_len": t.seq_len, "global_batch": t.global_batch, "micro_batch": t.micro_batch,
        "steps": t.steps,
        "optimizer": {"kind": "adamw", "lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                      "weight_decay": o.weight_decay, "grad_clip": o.grad_clip},
        "lr_schedule": {"kind": s.kind, "warmup_steps": s.warmup_steps, "final_lr": s.final_lr,
                        "total_steps": total},
        "data": {"kind": d.kind, "path": d.path or "", "dtype": d.dtype},
        "seed": t.seed,
    }
