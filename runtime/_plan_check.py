"""Cross-section rules of a plan: the things a well-typed plan can still get wrong.

Each rule names the key to fix. The compiler should never emit a plan that
fails here; a hand-edited one may.
"""

from __future__ import annotations

import re

from . import plan as P
from ._plan_read import Reader

# torch.distributed.pipelining `_Action` string form (compute and comm actions),
# plus the overlapped pair "(0F1;3B0)OVERLAP_F_B".
_ACTION = re.compile(
    r"^(\d+)(F|I|B|W|UNSHARD|RESHARD|REDUCE_GRAD|SEND_F|RECV_F|SEND_B|RECV_B)(\d*)$"
)
_OVERLAP = re.compile(r"^\((.*)\)OVERLAP_F_B$")


def check_plan(r: Reader, plan: P.Plan) -> None:
    _check_model(r, plan.model)
    _check_mesh(r, plan.mesh)
    _check_stages(r, plan)
    _check_experts(r, plan)
    _check_schedule(r, plan)
    _check_train(r, plan)


def _check_model(r: Reader, m: P.Model) -> None:
    for i, layer in enumerate(m.layers):
        if layer.attention not in m.attention:
            r.error(f"model.layers[{i}].attention", f"no attention named {layer.attention!r}")
        if layer.ffn not in m.ffn:
            r.error(f"model.layers[{i}].ffn", f"no ffn named {layer.ffn!r}")
    if not m.layers:
        r.error("model.layers", "a model needs at least one layer")
    if m.mtp.depth:
        if m.mtp.attention and m.mtp.attention not in m.attention:
            r.error("model.mtp.attention", f"no attention named {m.mtp.attention!r}")
        if m.mtp.ffn and m.mtp.ffn not in m.ffn:
            r.error("model.mtp.ffn", f"no ffn named {m.mtp.ffn!r}")
    if m.rope.kind == "yarn" and m.rope.original_max_seq < 1:
        r.error("model.rope.original_max_seq", "YaRN needs the original context length")


def _check_mesh(r: Reader, mesh: P.Mesh) -> None:
    if mesh.pipeline * mesh.data != mesh.world_size:
        r.error(
            "mesh.world_size",
            f"pipeline {mesh.pipeline} x data {mesh.data} = {mesh.pipeline * mesh.data}, "
            f"not {mesh.world_size}",
        )
    if mesh.expert and mesh.data % mesh.expert:
        r.error("mesh.expert", f"expert parallelism {mesh.expert} must divide data {mesh.data}")
    if mesh.nodes and mesh.gpus_per_node and mesh.nodes * mesh.gpus_per_node != mesh.world_size:
        r.error("mesh.nodes", f"{mesh.nodes} nodes x {mesh.gpus_per_node} GPUs != world_size")


def _check_stages(r: Reader, plan: P.Plan) -> None:
    stages, mesh, kind = plan.stages, plan.mesh, plan.schedule.kind
    if not stages:
        r.error("stages", "a plan needs at least one stage")
        return
    if sorted(s.index for s in stages) != list(range(len(stages))):
        r.error("stages", "stage indices must be 0, 1, ... in order, each once")
        return
    ordered = sorted(stages, key=lambda s: s.index)
    for s in ordered:
        if not 0 <= s.rank < mesh.pipeline:
            r.error(
                f"stages[{s.index}].rank", f"pipeline rank {s.rank} outside 0..{mesh.pipeline - 1}"
            )
    copies = {s.copy for s in stages}
    if kind != "dualpipe" and copies != {"A"}:
        r.error("stages", f"copy B stages exist only under dualpipe, not {kind}")
    for copy in sorted(copies):
        chain = [s for s in ordered if s.copy == copy]
        flat = [layer for s in chain for layer in s.layers]
        if flat != list(range(len(plan.model.layers))):
            r.error(
                "stages",
                f"copy {copy}: stages must hold layers 0..{len(plan.model.layers) - 1} in order, "
                f"each once; got {flat}",
            )
        if not chain[0].embedding or any(s.embedding for s in chain[1:]):
            r.error("stages", f"copy {copy}: the embedding belongs to its first stage only")
        if not chain[-1].head or any(s.head for s in chain[:-1]):
            r.error("stages", f"copy {copy}: the head belongs to its last stage only")
        if plan.model.mtp.depth and not chain[-1].mtp:
            r.error(
                "stages", f"copy {copy}: MTP (depth {plan.model.mtp.depth}) needs the head stage"
            )
    for s in ordered:
        if s.mtp and not s.head:
            r.error(
                f"stages[{s.index}].mtp", "MTP shares the output head: put it on the head stage"
            )
    per_rank = [[s.index for s in ordered if s.rank == k] for k in range(mesh.pipeline)]
    n, pp = len(stages), mesh.pipeline
    if kind in ("1f1b", "zb1p") and per_rank != [[k] for k in range(pp)]:
        r.error("stages", f"{kind} runs stage i on pipeline rank i; got {per_rank}")
    if kind == "dualpipev" and per_rank != [[k, 2 * pp - 1 - k] for k in range(pp)]:
        r.error("stages", f"dualpipev runs stages i and {2 * pp - 1}-i on rank i; got {per_rank}")
    if kind == "dualpipe" and n != 2 * pp:
        r.error("stages", f"dualpipe holds two copies of {pp} stages: expected {2 * pp} stages")


def _check_experts(r: Reader, plan: P.Plan) -> None:
    used = {spec.ffn for spec in plan.model.layers}
    if plan.model.mtp.depth and plan.model.layers:
        used.add(plan.model.mtp_block().ffn)
    for name in sorted(used):
        ffn = plan.model.ffn.get(name)
        if ffn is None or ffn.kind != "moe":
            continue
        w = f"experts.{name}"
        place = plan.experts.get(name)
        if place is None:
            r.error(w, f"MoE ffn {name!r} has no expert placement")
            continue
        if len(place.per_rank) != plan.mesh.expert:
            r.error(
                f"{w}.per_rank",
                f"one list per EP rank: expected {plan.mesh.expert}, got {len(place.per_rank)}",
            )
        ids = sorted(e for ranks in place.per_rank for e in ranks)
        if ids != list(range(ffn.routed)):
            r.error(f"{w}.per_rank", f"must place experts 0..{ffn.routed - 1} exactly once")
        if len({len(x) for x in place.per_rank}) > 1:
            r.error(f"{w}.per_rank", "every EP rank must hold the same number of experts")
        size = ffn.routed // max(ffn.groups, 1)
        expected = tuple(e // size for e in range(ffn.routed))
        if place.group_of_expert and place.group_of_expert != expected:
            r.error(
                f"{w}.group_of_expert",
                "groups are contiguous id ranges: expert e is in group e // (routed / groups)",
            )
        if place.two_hop:
            g = plan.mesh.gpus_per_node
            if not g or plan.mesh.expert % g:
                r.error(
                    f"{w}.two_hop", "the two-hop path needs mesh.gpus_per_node dividing mesh.expert"
                )


def _check_schedule(r: Reader, plan: P.Plan) -> None:
    sch, t, mesh = plan.schedule, plan.train, plan.mesh
    if t.micro_batch * mesh.data and t.global_batch % (t.micro_batch * mesh.data) == 0:
        expected = t.global_batch // (t.micro_batch * mesh.data)
        if sch.num_microbatches != expected:
            r.error(
                "schedule.num_microbatches",
                f"global_batch {t.global_batch} / (data {mesh.data} x micro_batch {t.micro_batch}) "
                f"= {expected}, not {sch.num_microbatches}",
            )
    if sch.kind == "dualpipev" and not sch.actions and sch.num_microbatches < len(plan.stages):
        r.error(
            "schedule.num_microbatches",
            f"torch's DualPipeV needs >= {len(plan.stages)} micro-batches",
        )
    stage_rank = {s.index: s.rank for s in plan.stages}
    for rank, acts in sorted(sch.actions.items()):
        if not 0 <= rank < mesh.pipeline:
            r.error(f"schedule.actions.{rank}", f"no pipeline rank {rank}")
            continue
        before = len(r.problems)
        for i, text in enumerate(acts):
            if len(r.problems) - before >= 3:  # a wrong list would repeat one problem
                r.error(f"schedule.actions.{rank}", "more problems in this list not shown")
                break
            for sub in _sub_actions(text):
                m = _ACTION.match(sub)
                if not m:
                    r.error(f"schedule.actions.{rank}[{i}]", f"not an action string: {text!r}")
                    break
                stage, mb = int(m.group(1)), m.group(3)
                if stage_rank.get(stage) != rank:
                    r.error(
                        f"schedule.actions.{rank}[{i}]",
                        f"{text!r}: stage {stage} is not on rank {rank}",
                    )
                if mb and int(mb) >= sch.num_microbatches:
                    r.error(
                        f"schedule.actions.{rank}[{i}]", f"{text!r}: micro-batch {mb} out of range"
                    )
    if sch.actions and sorted(sch.actions) != list(range(mesh.pipeline)):
        r.error(
            "schedule.actions",
            f"need an action list for every pipeline rank 0..{mesh.pipeline - 1}",
        )


def _sub_actions(text: str) -> list[str]:
    m = _OVERLAP.match(text.strip())
    if m:
        return [s.strip() for s in m.group(1).split(";") if s.strip()]
    return [text.strip()]


def _check_train(r: Reader, plan: P.Plan) -> None:
    t, mesh = plan.train, plan.mesh
    if t.global_batch % (t.micro_batch * mesh.data):
        r.error(
            "train.global_batch",
            f"{t.global_batch} sequences do not split over data {mesh.data} x micro_batch {t.micro_batch}",
        )
    if t.seq_len > plan.model.max_seq_len:
        r.error("train.seq_len", f"{t.seq_len} exceeds model.max_seq_len {plan.model.max_seq_len}")
    if (
        t.lr_schedule.kind == "warmup_cosine"
        and t.lr_schedule.total_steps <= t.lr_schedule.warmup_steps
    ):
        r.error("train.lr_schedule.total_steps", "warmup_cosine needs total_steps > warmup_steps")
    if t.data.kind == "tokens" and not t.data.path:
        r.error("train.data.path", "token data needs a path")
