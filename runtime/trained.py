"""A trained model outside its training job: from a run directory or a checkpoint, to modules.

    path = find_checkpoint("runs/tiny")          # RUN_DIR, RUN_DIR/checkpoints or step_NNNNNNNN
    meta = checkpoint.read_meta(path)             # its record (dsvc.json)
    recorded = recorded_plan(meta)                # the plan the run executed
    plan = serving_plan(recorded["model"], recorded["precision"], ep=1)   # or from a spec
    model = build_serving_model(plan)             # this EP rank's share of the whole model
    load_checkpoint_weights(path, model, plan, meta)

A checkpoint's record names the model it holds (`model_hash`) and carries the
plan the run executed (`recorded_plan`), so a checkpoint is usable without the
build directory that wrote it. `serving_plan` is the one-stage plan of that model on
`ep` processes (experts in contiguous blocks of routed / ep, one hop): what
decoding and export need. `load_checkpoint_weights` reads, without a process
group (`no_dist`), the parameters and router biases of a module from the DCP
files, whatever pipeline and expert layout wrote them: keys are global model
names, routed experts stacked per training EP rank (`.ep<k>`), and each rank
copies the experts it holds. Optimizer state is not read.
"""

from __future__ import annotations

import os

import torch

from . import checkpoint as ckpt
from .ep import ExpertComm
from .model import StageModule
from .plan import PLAN_VERSION, Plan, dump_plan, parse_plan
from .train_state import model_hash


def recorded_plan(meta: dict) -> dict | None:
    """The plan (JSON form) a checkpoint's record carries: its `model` and `precision` sections
    are what `serving_plan` takes. None for a checkpoint written before records carried it."""
    plan = meta.get("plan")
    ok = isinstance(plan, dict) and all(isinstance(plan.get(k), dict) for k in ("model", "precision"))
    return plan if ok else None


def find_checkpoint(path: str) -> str:
    """The checkpoint `path` names: itself if it is one, else the latest complete one of a run
    directory (`path/checkpoints`) or of a checkpoints directory. `CheckpointError` if none."""
    if os.path.isfile(os.path.join(path, ckpt.META)):
        return path
    if not os.path.isdir(path):
        raise ckpt.CheckpointError(f"{path}: no such run directory or checkpoint")
    for root in (os.path.join(path, "checkpoints"), path):
        found = ckpt.latest(root)
        if found is not None:
            return found
    raise ckpt.CheckpointError(f"{path} holds no complete checkpoint (a run directory has "
                               "checkpoints/step_NNNNNNNN/ with a dsvc.json)")


def serving_plan(model: dict, precision: dict, ep: int = 1) -> Plan:
    """The plan of `model` (a plan's model section) in `precision` as one stage on `ep`
    processes: attention and dense layers on every process, routed experts in contiguous
    blocks of routed / ep (one-hop dispatch), no pipeline."""
    layers = len(model.get("layers", []))
    mtp = int(model.get("mtp", {}).get("depth", 0))
    experts = {}
    for name, ffn in model.get("ffn", {}).items():
        if ffn.get("kind") != "moe":
            continue
        routed, groups = int(ffn["routed"]), int(ffn.get("groups", 1))
        if routed % ep:
            raise ValueError(f"ffn {name!r}: {routed} routed experts do not divide over {ep} "
                             "processes")
        per = routed // ep
        experts[name] = {"per_rank": [list(range(r * per, (r + 1) * per)) for r in range(ep)],
                         "group_of_expert": [e // (routed // groups) for e in range(routed)]}
    raw = {
        "version": PLAN_VERSION, "model": model, "precision": precision,
        "mesh": {"pipeline": 1, "data": ep, "expert": ep, "world_size": ep},
        "stages": [{"index": 0, "rank": 0, "copy": "A", "layers": list(range(layers)),
                    "embedding": True, "head": True, "mtp": mtp > 0}],
        "experts": experts,
        "schedule": {"kind": "1f1b", "num_microbatches": 1, "overlap": False, "actions": []},
        "train": {"seq_len": 1, "global_batch": ep, "micro_batch": 1, "seed": 0,
                  "optimizer": {"kind": "adamw", "lr": 0.0, "betas": [0.9, 0.95], "eps": 1e-8,
                                "weight_decay": 0.0, "grad_clip": 0.0},
                  "lr_schedule": {"kind": "constant"}, "data": {"kind": "synthetic"}},
    }  # fmt: skip
    return parse_plan(raw, source="serving plan")


def build_serving_model(plan: Plan, ep_rank: int = 0, group=None) -> StageModule:
    """The whole model with this EP rank's routed experts (all of them for one process);
    `group`: the EP process group when the plan spans several processes."""
    prec = plan.precision
    comms = {
        name: ExpertComm(place, ep_rank, group if len(place.per_rank) > 1 else None,
                         prec.dispatch, prec.combine, prec.linear_for("experts").ue8m0)
        for name, place in plan.experts.items()
    }  # fmt: skip
    return StageModule(plan, plan.stages[0], comms)


def _ffn_of(plan: Plan, name: str) -> str:
    """The ffn definition of the MoE layer a parameter name belongs to."""
    parts = name.split(".")
    if parts[0] == "layers":
        return plan.model.layers[int(parts[1])].ffn
    return plan.model.mtp_block().ffn


@torch.no_grad()
def load_checkpoint_weights(path: str, module: StageModule, plan: Plan, meta: dict) -> list[str]:
    """Copy the parameters and persistent buffers of `module` from checkpoint `path` (record
    `meta`); returns the names loaded. `CheckpointError` (nothing changed) for a checkpoint
    of another model or one whose files lack a tensor the module needs."""
    want = meta.get("model_hash")
    have = model_hash(dump_plan(plan))
    if want != have:
        raise ckpt.CheckpointError(
            f"{path} is a checkpoint of a different model (model hash {str(want)[:12]}, the "
            f"model to load {have[:12]}): it was not trained from this spec")
    layout = (meta.get("pipeline_layout") or {}).get("experts", {})
    state: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    stacked: dict[str, tuple[torch.Tensor, list[list[int]], list[torch.Tensor]]] = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        if leaf in getattr(sub, "_non_persistent_buffers_set", set()):
            continue
        if ".mlp.experts." in name:
            per_rank = layout.get(_ffn_of(plan, name))
            if not per_rank:
                raise ckpt.CheckpointError(f"{path}: its record has no expert layout for "
                                           f"{name}")
            parts = []
            for r, ids in enumerate(per_rank):
                buf = torch.empty((len(ids), *t.shape[1:]), dtype=t.dtype)
                state[f"model.{name}.ep{r}" if len(per_rank) > 1 else f"model.{name}"] = buf
                parts.append(buf)
            stacked[name] = (t, per_rank, parts)
            continue
        buf = torch.empty(t.shape, dtype=t.dtype)
        state[f"model.{name}"] = buf
        targets[name] = buf
    ckpt.load_tensors(path, state)
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    for name, buf in targets.items():
        params[name].copy_(buf)
    for name, (t, per_rank, parts) in stacked.items():
        where = {e: (r, j) for r, ids in enumerate(per_rank) for j, e in enumerate(ids)}
        experts = module.get_submodule(name.rsplit(".", 1)[0]).expert_ids
        for j, e in enumerate(experts):
            r, i = where[e]
            t[j].copy_(parts[r][i])
    return sorted(targets) + sorted(stacked)
