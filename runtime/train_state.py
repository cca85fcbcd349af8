"""What a checkpoint holds, keyed so that it survives a change of data parallelism.

Keys (global, the same whichever rank writes them):

- `model.<name>`: parameters and buffers (router biases) by model name; replicated
  copies are written once. Routed experts, stacked per EP rank, get `.ep<k>`.
- `optim.<part>.<name>` for part in master / exp_avg / exp_avg_sq: each parameter's
  full optimizer state, all-gathered from the ZeRO-1 shards at save time and sliced
  back into whatever shard a rank owns at load time, so a run can resume with another
  data-parallel degree. (The all-gather holds one full copy of a stage's optimizer
  state per rank for the moment of the save: fine at the sizes this runtime is tested
  at; a production path would write the flat shards as DTensors.)
- `trainer.step`, `trainer.optimizer_steps`; `rng.rank<r>` (restored only when the
  world size is unchanged: another world has other ranks).

The checkpoint's record (dsvc.json, see checkpoint.py) holds what identifies it:
`model_hash` (the plan's model section only, so a second spec that differs in cluster
size or data degree resumes it) and `pipeline_layout` (stages per pipeline rank and the
routed experts per EP rank: what the shards' keys depend on), plus `data_samples`, the
global sample index the next step reads.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist


def _expert_names(trainer) -> set[str]:
    return {name for name, _ in trainer.optimizer.expert.named}


def _key(trainer, name: str) -> str:
    if name in _expert_names(trainer) and trainer.mesh.ep > 1:
        return f"{name}.ep{trainer.mesh.ep_rank}"
    return name


def _full(shard, t: torch.Tensor) -> torch.Tensor:
    return shard.gather(t.float()).float()


def model_hash(plan_raw: dict) -> str:
    """Identifies the model's architecture, not how it is laid out or trained: the plan's
    `model` section only (cluster, parallel plan, precision and schedule may differ)."""
    model = json.dumps(plan_raw["model"], sort_keys=True)
    return hashlib.sha256(model.encode()).hexdigest()


def pipeline_layout(plan_raw: dict) -> dict:
    """What a checkpoint's shards depend on besides data parallelism: which pipeline rank
    holds which stage (layers, embedding, head, MTP; the model copy under DualPipe) and
    which routed experts each EP rank holds. The schedule is not part of it: the same
    stages under 1F1B or ZB1P hold the same state."""
    stages = [[s["rank"], s.get("copy", "A"), list(s["layers"]), bool(s["embedding"]),
               bool(s["head"]), bool(s["mtp"])] for s in plan_raw["stages"]]
    experts = {k: v["per_rank"] for k, v in sorted(plan_raw.get("experts", {}).items())}
    # through JSON, so that it compares equal to what dsvc.json gives back (lists, not tuples)
    return json.loads(json.dumps({"pipeline": plan_raw["mesh"]["pipeline"], "stages": stages,
                                  "experts": experts}))


def state_for_save(trainer) -> dict:
    """This rank's checkpoint entries (collective: all-gathers the optimizer shards)."""
    out: dict = {}
    seen = set()
    for mod in trainer.modules:
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if name in seen or not _persistent(mod, name):
                continue
            seen.add(name)
            out[f"model.{_key(trainer, name)}"] = t.detach().clone()
    for shard in trainer.optimizer.shards:
        parts = {"master": _full(shard, shard.master), "exp_avg": _full(shard, shard.exp_avg),
                 "exp_avg_sq": _full(shard, shard.exp_avg_sq)}
        off = 0
        for name, p in shard.named:
            for part, flat in parts.items():
                out[f"optim.{part}.{_key(trainer, name)}"] = flat[off: off + p.numel()].view_as(p).clone()
            off += p.numel()
    out["trainer.step"] = torch.tensor(trainer.step_index)
    out["trainer.optimizer_steps"] = torch.tensor(trainer.optimizer.steps)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out[f"rng.rank{rank}"] = torch.get_rng_state()
    return out


def _persistent(mod, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    sub = mod.get_submodule(owner) if owner else mod
    return leaf not in getattr(sub, "_non_persistent_buffers_set", set())


def template_for_load(trainer, with_rng: bool) -> dict:
    """Tensors of the right shapes for dcp.load to fill, for this rank's current layout."""
    state = {k: torch.empty_like(v) for k, v in _shapes(trainer).items()}
    state["trainer.step"] = torch.tensor(0)
    state["trainer.optimizer_steps"] = torch.tensor(0)
    if with_rng:
        rank = dist.get_rank() if dist.is_initialized() else 0
        state[f"rng.rank{rank}"] = torch.get_rng_state()
    return state


def _shapes(trainer) -> dict:
    out, seen = {}, set()
    for mod in trainer.modules:
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if name in seen or not _persistent(mod, name):
                continue
            seen.add(name)
            out[f"model.{_key(trainer, name)}"] = t.detach()
    for shard in trainer.optimizer.shards:
        for name, p in shard.named:
            for part in ("master", "exp_avg", "exp_avg_sq"):
                out[f"optim.{part}.{_key(trainer, name)}"] = torch.empty(p.shape, dtype=torch.float32)
    return out


@torch.no_grad()
def apply_loaded(trainer, state: dict, with_rng: bool) -> None:
    """Write a loaded state into the modules and this rank's optimizer shards."""
    for mod in trainer.modules:
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            key = f"model.{_key(trainer, name)}"
            if key in state:
                t.copy_(state[key].to(t.dtype))
    for shard in trainer.optimizer.shards:
        for part in ("master", "exp_avg", "exp_avg_sq"):
            pieces = [state[f"optim.{part}.{_key(trainer, name)}"].reshape(-1).float()
                      for name, _ in shard.named]
            flat = shard._flatten(pieces, shard.padded).to(getattr(shard, part).device)
            getattr(shard, part).copy_(flat[shard.lo: shard.hi].to(getattr(shard, part).dtype))
    trainer.step_index = int(state["trainer.step"])
    trainer.optimizer.steps = int(state["trainer.optimizer_steps"])
    if with_rng:
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.set_rng_state(state[f"rng.rank{rank}"])
