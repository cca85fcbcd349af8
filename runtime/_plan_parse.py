"""JSON -> plan dataclasses, section by section (types and ranges only).

Cross-section rules (stages cover every layer once, batch arithmetic, expert
placement) live in `_plan_check.py`.
"""

from __future__ import annotations

from typing import Any

from . import plan as P
from ._plan_read import Reader

_FORMATS = ("fp8_e4m3", "bf16", "fp32")


def read_plan(r: Reader, raw: Any) -> P.Plan | None:
    if not isinstance(raw, dict):
        r.error("", f"a plan is a JSON object, got {type(raw).__name__}")
        return None
    r.unknown_keys(
        raw,
        ("version", "model", "precision", "mesh", "stages", "experts", "schedule", "train",
         "source", "comment"),
        "",
    )  # fmt: skip
    version = r.int_(raw, "version", "")
    if "version" in raw and version != P.PLAN_VERSION:
        r.error("version", f"this runtime reads plan version {P.PLAN_VERSION}, got {version}")
    return P.Plan(
        version=version,
        model=_model(r, r.obj(raw, "model", "")),
        precision=_precision(r, r.obj(raw, "precision", "")),
        mesh=_mesh(r, r.obj(raw, "mesh", "")),
        stages=tuple(_stage(r, s, f"stages[{i}]") for i, s in enumerate(r.arr(raw, "stages", ""))),
        experts={
            name: _placement(r, v, f"experts.{name}")
            for name, v in r.obj(raw, "experts", "", required=False).items()
        },
        schedule=_schedule(r, r.obj(raw, "schedule", "")),
        train=_train(r, r.obj(raw, "train", "")),
    )


def _model(r: Reader, d: dict) -> P.Model:
    w = "model"
    r.unknown_keys(
        d,
        ("vocab", "hidden", "norm_eps", "max_seq_len", "rope", "attention", "ffn", "layers",
         "mtp", "tie_embeddings", "init_std"),
        w,
    )  # fmt: skip
    rope = r.obj(d, "rope", w)
    r.unknown_keys(
        rope,
        ("kind", "theta", "factor", "original_max_seq", "beta_fast", "beta_slow", "mscale",
         "mscale_all_dim"),
        f"{w}.rope",
    )  # fmt: skip
    layers = []
    for i, layer in enumerate(r.arr(d, "layers", w)):
        where = f"{w}.layers[{i}]"
        r.unknown_keys(layer, ("attention", "ffn"), where)
        layers.append(P.LayerSpec(r.str_(layer, "attention", where), r.str_(layer, "ffn", where)))
    mtp = r.obj(d, "mtp", w, required=False)
    r.unknown_keys(mtp, ("depth", "loss_weight", "attention", "ffn"), f"{w}.mtp")
    return P.Model(
        vocab=r.int_(d, "vocab", w, minimum=2),
        hidden=r.int_(d, "hidden", w, minimum=1),
        norm_eps=r.num(d, "norm_eps", w, default=1e-6, minimum=0.0),
        max_seq_len=r.int_(d, "max_seq_len", w, minimum=1),
        rope=P.Rope(
            kind=r.choice(rope, "kind", f"{w}.rope", ("plain", "yarn")),
            theta=r.num(rope, "theta", f"{w}.rope", minimum=1.0),
            factor=r.num(rope, "factor", f"{w}.rope", default=1.0, minimum=1.0),
            original_max_seq=r.int_(rope, "original_max_seq", f"{w}.rope", default=0, minimum=0),
            beta_fast=r.num(rope, "beta_fast", f"{w}.rope", default=32.0),
            beta_slow=r.num(rope, "beta_slow", f"{w}.rope", default=1.0),
            mscale=r.num(rope, "mscale", f"{w}.rope", default=1.0),
            mscale_all_dim=(  # absent: plan v1, where `mscale` also scales the softmax
                r.num(rope, "mscale_all_dim", f"{w}.rope", minimum=0.0)
                if "mscale_all_dim" in rope
                else None
            ),
        ),
        attention={
            name: _attention(r, a, f"{w}.attention.{name}")
            for name, a in r.obj(d, "attention", w).items()
        },
        ffn={name: _ffn(r, f, f"{w}.ffn.{name}") for name, f in r.obj(d, "ffn", w).items()},
        layers=tuple(layers),
        mtp=P.Mtp(
            depth=r.int_(mtp, "depth", f"{w}.mtp", default=0, minimum=0),
            loss_weight=r.num(mtp, "loss_weight", f"{w}.mtp", default=0.0, minimum=0.0),
            attention=r.str_(mtp, "attention", f"{w}.mtp", default=""),
            ffn=r.str_(mtp, "ffn", f"{w}.mtp", default=""),
        ),
        tie_embeddings=r.bool_(d, "tie_embeddings", w, default=False),
        init_std=r.num(d, "init_std", w, default=0.02, minimum=0.0),
    )


def _attention(r: Reader, d: Any, w: str) -> P.Attention:
    kind = r.choice(d, "kind", w, ("mla", "gqa"))
    if kind == "mla":
        r.unknown_keys(
            d,
            ("kind", "heads", "q_lora_rank", "kv_lora_rank", "qk_nope_dim", "qk_rope_dim", "v_dim"),
            w,
        )
        return P.Attention(
            kind=kind,
            heads=r.int_(d, "heads", w, minimum=1),
            q_lora_rank=r.int_(d, "q_lora_rank", w, default=0, minimum=0),
            kv_lora_rank=r.int_(d, "kv_lora_rank", w, minimum=1),
            qk_nope_dim=r.int_(d, "qk_nope_dim", w, minimum=1),
            qk_rope_dim=r.int_(d, "qk_rope_dim", w, minimum=2),
            v_dim=r.int_(d, "v_dim", w, minimum=1),
        )
    r.unknown_keys(d, ("kind", "heads", "kv_heads", "head_dim", "qkv_bias"), w)
    heads = r.int_(d, "heads", w, minimum=1)
    kv_heads = r.int_(d, "kv_heads", w, default=heads, minimum=1)
    head_dim = r.int_(d, "head_dim", w, minimum=2)
    if kv_heads and heads % max(kv_heads, 1):
        r.error(f"{w}.kv_heads", f"{heads} heads do not divide into {kv_heads} kv_heads groups")
    if head_dim % 2:
        r.error(f"{w}.head_dim", f"RoPE needs an even head_dim, got {head_dim}")
    return P.Attention(
        kind=kind,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        qkv_bias=r.bool_(d, "qkv_bias", w, default=False),
    )


def _ffn(r: Reader, d: Any, w: str) -> P.Ffn:
    kind = r.choice(d, "kind", w, ("dense", "moe"))
    if kind == "dense":
        r.unknown_keys(d, ("kind", "intermediate"), w)
        return P.Ffn(kind=kind, intermediate=r.int_(d, "intermediate", w, minimum=1))
    r.unknown_keys(
        d,
        ("kind", "routed", "shared", "top_k", "intermediate", "shared_intermediate", "score",
         "groups", "top_groups", "route_scale", "bias_update_rate", "seq_aux_loss",
         "renormalize"),
        w,
    )  # fmt: skip
    routed = r.int_(d, "routed", w, minimum=1)
    top_k = r.int_(d, "top_k", w, minimum=1)
    groups = r.int_(d, "groups", w, default=1, minimum=1)
    top_groups = r.int_(d, "top_groups", w, default=groups, minimum=1)
    intermediate = r.int_(d, "intermediate", w, minimum=1)
    if top_k > routed:
        r.error(f"{w}.top_k", f"top_k {top_k} exceeds the {routed} routed experts")
    if groups and routed % groups:
        r.error(f"{w}.groups", f"{routed} routed experts do not divide into {groups} groups")
    if top_groups > groups:
        r.error(f"{w}.top_groups", f"top_groups {top_groups} exceeds groups {groups}")
    elif groups > 1 and top_groups * (routed // groups) < top_k:
        r.error(f"{w}.top_groups", f"{top_groups} groups hold fewer than top_k {top_k} experts")
    if groups > 1 and routed // groups < 2:
        r.error(f"{w}.groups", "group scores use each group's top-2 experts: need >= 2 per group")
    return P.Ffn(
        kind=kind,
        intermediate=intermediate,
        routed=routed,
        shared=r.int_(d, "shared", w, default=0, minimum=0),
        top_k=top_k,
        shared_intermediate=r.int_(d, "shared_intermediate", w, default=intermediate, minimum=1),
        score=r.choice(d, "score", w, ("softmax", "sigmoid")),
        groups=groups,
        top_groups=top_groups,
        route_scale=r.num(d, "route_scale", w, default=1.0),
        bias_update_rate=r.num(d, "bias_update_rate", w, default=0.0, minimum=0.0),
        seq_aux_loss=r.num(d, "seq_aux_loss", w, default=0.0, minimum=0.0),
        renormalize=r.bool_(d, "renormalize", w, default=None),  # absent: sigmoid only
    )


def _linear(r: Reader, d: Any, w: str) -> P.LinearFormat:
    if isinstance(d, str):  # shorthand: "bf16"
        d = {"format": d}
    r.unknown_keys(d, ("format", "act_tile", "weight_block", "ue8m0", "pad"), w)
    block = d.get("weight_block", [128, 128]) if isinstance(d, dict) else [128, 128]
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        r.error(f"{w}.weight_block", f"expected [rows, cols], got {block!r}")
        block = [128, 128]
    return P.LinearFormat(
        format=r.choice(d, "format", w, _FORMATS),
        act_tile=r.int_(d, "act_tile", w, default=128, minimum=1),
        weight_block=(block[0], block[1]),
        ue8m0=r.bool_(d, "ue8m0", w, default=False),
        pad=r.bool_(d, "pad", w, default=False),
    )


def _precision(r: Reader, d: dict) -> P.Precision:
    w = "precision"
    r.unknown_keys(
        d,
        ("default", "linear", "linear_overrides", "kept", "master_weights", "grads",
         "optimizer_states", "dispatch", "combine", "fp8_backend"),
        w,
    )  # fmt: skip
    overrides = {}
    for role, fmt in r.obj(d, "linear_overrides", w, required=False).items():
        if role not in P.LINEAR_ROLES:
            r.error(
                f"{w}.linear_overrides.{role}",
                f"unknown linear; one of {', '.join(P.LINEAR_ROLES)}",
            )
        overrides[role] = _linear(r, fmt, f"{w}.linear_overrides.{role}")
    kept_raw = r.obj(d, "kept", w, required=False)
    r.unknown_keys(kept_raw, P.KEPT_COMPONENTS, f"{w}.kept")
    default = r.choice(d, "default", w, P.DTYPES)
    kept = {c: r.choice(kept_raw, c, f"{w}.kept", P.DTYPES, default="fp32" if c == "norm" else default)
            for c in P.KEPT_COMPONENTS}  # fmt: skip
    return P.Precision(
        default=default,
        linear=_linear(r, d.get("linear", default), f"{w}.linear"),
        linear_overrides=overrides,
        kept=kept,
        master_weights=r.choice(d, "master_weights", w, ("fp32",), default="fp32"),
        grads=r.choice(d, "grads", w, ("fp32",), default="fp32"),
        optimizer_states=r.choice(d, "optimizer_states", w, P.DTYPES, default="fp32"),
        dispatch=r.choice(d, "dispatch", w, _FORMATS, default=default),
        combine=r.choice(d, "combine", w, P.DTYPES, default=default),
        fp8_backend=r.choice(d, "fp8_backend", w, ("torch", "triton", "cublas"), default="torch"),
    )


def _mesh(r: Reader, d: dict) -> P.Mesh:
    w = "mesh"
    r.unknown_keys(d, ("pipeline", "data", "expert", "world_size", "nodes", "gpus_per_node"), w)
    return P.Mesh(
        pipeline=r.int_(d, "pipeline", w, minimum=1),
        data=r.int_(d, "data", w, minimum=1),
        expert=r.int_(d, "expert", w, default=1, minimum=1),
        world_size=r.int_(d, "world_size", w, minimum=1),
        nodes=r.int_(d, "nodes", w, default=0, minimum=0),
        gpus_per_node=r.int_(d, "gpus_per_node", w, default=0, minimum=0),
    )


def _stage(r: Reader, d: Any, w: str) -> P.Stage:
    r.unknown_keys(d, ("index", "rank", "copy", "layers", "embedding", "head", "mtp"), w)
    layers = r.arr(d, "layers", w)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        r.error(f"{w}.layers", f"expected layer indices, got {layers!r}")
        layers = []
    return P.Stage(
        index=r.int_(d, "index", w, minimum=0),
        rank=r.int_(d, "rank", w, minimum=0),
        copy=r.choice(d, "copy", w, ("A", "B"), default="A"),
        layers=tuple(layers),
        embedding=r.bool_(d, "embedding", w, default=False),
        head=r.bool_(d, "head", w, default=False),
        mtp=r.bool_(d, "mtp", w, default=False),
    )


def _placement(r: Reader, d: Any, w: str) -> P.ExpertPlacement:
    r.unknown_keys(d, ("per_rank", "group_of_expert", "two_hop"), w)
    per_rank = []
    for i, ids in enumerate(r.arr(d, "per_rank", w)):
        if not isinstance(ids, list) or not all(isinstance(x, int) for x in ids):
            r.error(f"{w}.per_rank[{i}]", f"expected a list of expert ids, got {ids!r}")
            ids = []
        per_rank.append(tuple(ids))
    groups = r.arr(d, "group_of_expert", w, required=False)
    return P.ExpertPlacement(
        per_rank=tuple(per_rank),
        group_of_expert=tuple(g for g in groups if isinstance(g, int)),
        two_hop=r.bool_(d, "two_hop", w, default=False),
    )


def _schedule(r: Reader, d: dict) -> P.Schedule:
    w = "schedule"
    r.unknown_keys(d, ("kind", "num_microbatches", "overlap", "actions", "version"), w)
    actions: dict[int, tuple[str, ...]] = {}
    raw_actions = d.get("actions") or {}
    if isinstance(raw_actions, list):  # the schedule generator's form: one list per rank
        raw_actions = {str(i): a for i, a in enumerate(raw_actions)}
    if not isinstance(raw_actions, dict):
        r.error(f"{w}.actions", "expected {rank: [actions]} or [[actions] per rank]")
        raw_actions = {}
    for key, acts in raw_actions.items():
        if not str(key).isdigit():
            r.error(f"{w}.actions.{key}", "keys are pipeline ranks (0, 1, ...)")
            continue
        if not isinstance(acts, list) or not all(isinstance(a, str) for a in acts):
            r.error(f"{w}.actions.{key}", 'expected a list of action strings like "0F1"')
            continue
        actions[int(key)] = tuple(acts)
    return P.Schedule(
        kind=r.choice(d, "kind", w, P.SCHEDULE_KINDS),
        num_microbatches=r.int_(d, "num_microbatches", w, minimum=1),
        overlap=r.bool_(d, "overlap", w, default=False),
        actions=actions,
    )


def _train(r: Reader, d: dict) -> P.Train:
    w = "train"
    r.unknown_keys(
        d,
        ("seq_len", "global_batch", "micro_batch", "optimizer", "lr_schedule", "data", "seed",
         "steps"),
        w,
    )  # fmt: skip
    opt = r.obj(d, "optimizer", w)
    r.unknown_keys(
        opt, ("kind", "lr", "betas", "eps", "weight_decay", "grad_clip"), f"{w}.optimizer"
    )
    betas = opt.get("betas", [0.9, 0.95])
    if not (isinstance(betas, list) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        r.error(f"{w}.optimizer.betas", f"expected [beta1, beta2] in [0, 1), got {betas!r}")
        betas = [0.9, 0.95]
    sched = r.obj(d, "lr_schedule", w, required=False)
    r.unknown_keys(sched, ("kind", "warmup_steps", "final_lr", "total_steps"), f"{w}.lr_schedule")
    data = r.obj(d, "data", w, required=False)
    r.unknown_keys(data, ("kind", "path", "dtype"), f"{w}.data")
    ws, wd = f"{w}.lr_schedule", f"{w}.data"
    return P.Train(
        seq_len=r.int_(d, "seq_len", w, minimum=1),
        global_batch=r.int_(d, "global_batch", w, minimum=1),
        micro_batch=r.int_(d, "micro_batch", w, minimum=1),
        optimizer=P.Optimizer(
            kind=r.choice(opt, "kind", f"{w}.optimizer", ("adamw",), default="adamw"),
            lr=r.num(opt, "lr", f"{w}.optimizer", minimum=0.0),
            betas=(float(betas[0]), float(betas[1])),
            eps=r.num(opt, "eps", f"{w}.optimizer", default=1e-8, minimum=0.0),
            weight_decay=r.num(opt, "weight_decay", f"{w}.optimizer", default=0.0, minimum=0.0),
            grad_clip=r.num(opt, "grad_clip", f"{w}.optimizer", default=0.0, minimum=0.0),
        ),
        lr_schedule=P.LrSchedule(
            kind=r.choice(sched, "kind", ws, ("warmup_cosine", "constant"), default="constant"),
            warmup_steps=r.int_(sched, "warmup_steps", ws, default=0, minimum=0),
            final_lr=r.num(sched, "final_lr", ws, default=0.0, minimum=0.0),
            total_steps=r.int_(sched, "total_steps", ws, default=0, minimum=0),
        ),
        data=P.Data(
            kind=r.choice(data, "kind", wd, ("synthetic", "tokens"), default="synthetic"),
            path=r.str_(data, "path", wd, default=""),
            dtype=r.choice(data, "dtype", wd, ("uint16", "uint32"), default="uint16"),
        ),
        seed=r.int_(d, "seed", w, default=0, minimum=0),
        steps=r.int_(d, "steps", w, default=0, minimum=0),
    )
