"""What a checkpoint holds, keyed so that it survives a change of data parallelism.

Keys (global, the same whichever rank writes them):

- `model.<name>`: parameters and buffers (router biases) by model name; replicated
  copies are written once. Routed experts, stacked per EP rank, get `.ep<k>`.
- `optim.pp<p>.dense.<part>` and `optim.pp<p>.expert[.ep<k>].<part>` for part in
  exp_avg / exp_avg_sq: the ZeRO-1 state of pipeline rank p's replicated
  parameters and of its routed experts, each a flat vector (the group's parameters in
  name order) written as a DTensor sharded over the data-parallel (expert-data-
  parallel) ranks exactly as ZeRO-1 holds it (under DualPipe, p is the lower rank of
  the pair holding the same two stages). Every rank writes only its own shard,
  in the state's own dtype (bf16 moments stay bf16); nothing is gathered. At load,
  DCP reads each rank's slice of the vector for whatever data-parallel degree the
  run now has. The master weights are not written: the parameters, kept in fp32, are
  their own master (runtime/optim.py), so `model.<name>` is the master. (Format 2
  checkpoints, which also wrote a `master` part identical to the parameters, and format
  1, one full fp32 tensor per parameter gathered at save time, `optim.<part>.<name>`,
  still load.)
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

from .plan import Model
from .schema import SchemaError, read, to_json

FORMAT = 3  # dsvc.json `checkpoint_format`; 1 (absent): per-parameter optimizer state
PARTS = ("exp_avg", "exp_avg_sq")  # the ZeRO-1 vectors a checkpoint of FORMAT holds


def parts(fmt: int) -> tuple[str, ...]:
    """The optimizer parts a checkpoint of format `fmt` holds: formats 1 and 2 also wrote
    the master weights, which now are the parameters themselves."""
    return PARTS if fmt == FORMAT else ("master", *PARTS)


def _expert_names(trainer) -> set[str]:
    return {name for name, _ in trainer.optimizer.expert.named}


def _key(trainer, name: str) -> str:
    if name in _expert_names(trainer) and trainer.mesh.ep > 1:
        return f"{name}.ep{trainer.mesh.ep_rank}"
    return name


def model_hash(plan_raw: dict) -> str:
    """Identifies the model's architecture, not how it is laid out or trained: the plan's
    `model` section only (cluster, parallel plan, precision and schedule may differ), in its
    canonical form (every default written out), so two plans that say the same model the
    same way or more briefly hash alike."""
    try:
        model = to_json(read(Model, plan_raw["model"], "model"))
    except SchemaError:  # not a model this runtime reads: its hash matches no checkpoint's
        model = plan_raw["model"]
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()


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
    """This rank's checkpoint entries: its parameters and its own optimizer shards."""
    out: dict = {}
    seen = set()
    for mod in trainer.modules:
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if name in seen or not _persistent(mod, name):
                continue
            seen.add(name)
            out[f"model.{_key(trainer, name)}"] = t.detach()  # saved synchronously: no copy
    for key, shard, mesh in _flat_groups(trainer):
        for part in PARTS:
            out[f"{key}.{part}"] = _flat(shard, getattr(shard, part)[: _owned(shard)], mesh)
    out["trainer.step"] = torch.tensor(trainer.step_index)
    out["trainer.optimizer_steps"] = torch.tensor(trainer.optimizer.steps)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out[f"rng.rank{rank}"] = torch.get_rng_state()
    return out


def model_entries(path: str):
    """(parameter name, EP rank, tensor) of every model entry of checkpoint `path`, one at a
    time, read offline (runtime/checkpoint.read_entries); the EP rank is that of a routed-
    expert stack (`.ep<k>`), 0 for one written without EP, None for everything else."""
    import re

    from .checkpoint import read_entries

    for key, tensor in read_entries(path, "model."):
        name = key[len("model."):]
        m = re.fullmatch(r"(.*\.experts\.\w+)\.ep(\d+)", name)
        if m:
            yield m.group(1), int(m.group(2)), tensor
        else:
            yield name, (0 if re.search(r"\.experts\.\w+$", name) else None), tensor


def _persistent(mod, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    sub = mod.get_submodule(owner) if owner else mod
    return leaf not in getattr(sub, "_non_persistent_buffers_set", set())


def _flat_groups(trainer):
    """(key, ZeRO-1 shard, 1-D device mesh or None) per non-empty shard group of this rank.

    The key names what the flat vector holds, the same for every data-parallel degree:
    the pipeline rank's replicated parameters, or its routed experts of one EP rank."""
    m, opt = trainer.mesh, trainer.optimizer
    ep = f".ep{m.ep_rank}" if m.ep > 1 else ""
    pp = m.pp_rank
    if trainer.plan.schedule.kind == "dualpipe":
        # ranks i and PP-1-i hold the same two stages (the copies) and step them to the
        # same bits: one key for the pair, which DCP then writes once
        pp = min(pp, m.pp - 1 - pp)
    groups = (
        (f"optim.pp{pp}.dense", opt.dense, m.device_mesh, "dp"),
        (f"optim.pp{pp}.expert{ep}", opt.expert, m.expert_mesh, "edp"),
    )
    for key, shard, mesh, dim in groups:
        if shard.numel:
            yield key, shard, (mesh[dim] if shard.size > 1 and mesh is not None else None)


def _owned(shard) -> int:
    """Elements of the flat vector this rank's shard holds (the padding excluded)."""
    return max(0, min(shard.hi, shard.numel) - shard.lo)


def _flat(shard, local: torch.Tensor, mesh):
    """The group's flat vector as DCP should see it: this rank's `local` piece of it."""
    if mesh is None:  # one data-parallel rank: the shard is the whole vector
        if shard.size > 1:  # each rank's piece under one key: DCP would keep only one
            raise RuntimeError("ZeRO-1 shards over several ranks need their device mesh")
        return local
    from torch.distributed.tensor import DTensor, Shard

    # ZeRO-1's shards are torch.chunk's pieces (ceil(numel / size) each, the last ones
    # short or empty), which is how a DTensor sharded on dim 0 lays them out
    return DTensor.from_local(
        local, mesh, [Shard(0)], run_check=False, shape=torch.Size([shard.numel]), stride=(1,)
    )


def template_for_load(trainer, with_rng: bool, fmt: int = FORMAT) -> dict:
    """Tensors of the right shapes for dcp.load to fill, for this rank's current layout
    (`fmt`: the checkpoint's format, from its record)."""
    if fmt in (2, FORMAT):
        state = {k: torch.empty_like(v) for k, v in _model_shapes(trainer).items()}
        for key, shard, mesh in _flat_groups(trainer):
            for part in parts(fmt):
                local = torch.empty_like(getattr(shard, part)[: _owned(shard)])
                state[f"{key}.{part}"] = _flat(shard, local, mesh)
    elif fmt == 1:
        state = {k: torch.empty_like(v) for k, v in _shapes_v1(trainer).items()}
    else:
        raise ValueError(f"checkpoint format {fmt!r} is not one this runtime reads")
    state["trainer.step"] = torch.tensor(0)
    state["trainer.optimizer_steps"] = torch.tensor(0)
    if with_rng:
        rank = dist.get_rank() if dist.is_initialized() else 0
        state[f"rng.rank{rank}"] = torch.get_rng_state()
    return state


def _model_shapes(trainer) -> dict:
    out, seen = {}, set()
    for mod in trainer.modules:
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if name in seen or not _persistent(mod, name):
                continue
            seen.add(name)
            out[f"model.{_key(trainer, name)}"] = t.detach()
    return out


def _shapes_v1(trainer) -> dict:
    out = _model_shapes(trainer)
    for shard in trainer.optimizer.shards:
        for name, p in shard.named:
            for part in parts(1):
                out[f"optim.{part}.{_key(trainer, name)}"] = torch.empty(p.shape, dtype=torch.float32)
    return out


@torch.no_grad()
def apply_loaded(trainer, state: dict, with_rng: bool, fmt: int = FORMAT) -> None:
    """Write a loaded state into the modules and this rank's optimizer shards."""
    for mod in trainer.modules:
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            key = f"model.{_key(trainer, name)}"
            if key in state:
                t.copy_(state[key].to(t.dtype))
    if fmt in (2, FORMAT):  # format 2's master equals the parameters: copied all the same
        for key, shard, _ in _flat_groups(trainer):
            for part in parts(fmt):
                loaded = state[f"{key}.{part}"]
                local = loaded.to_local() if hasattr(loaded, "to_local") else loaded
                dst = getattr(shard, part)
                dst.zero_()  # the padding past the last parameter stays zero
                dst[: _owned(shard)].copy_(local)
    elif fmt == 1:  # full per-parameter tensors, sliced to this rank's shard
        for shard in trainer.optimizer.shards:
            for part in parts(fmt):
                pieces = [state[f"optim.{part}.{_key(trainer, name)}"].reshape(-1).float()
                          for name, _ in shard.named]  # fmt: skip
                flat = shard._flatten(pieces, shard.padded).to(getattr(shard, part).device)
                getattr(shard, part).copy_(flat[shard.lo : shard.hi].to(getattr(shard, part).dtype))
    else:
        raise ValueError(f"checkpoint format {fmt!r} is not one this runtime reads")
    trainer.step_index = int(state["trainer.step"])
    trainer.optimizer.steps = int(state["trainer.optimizer_steps"])
    if with_rng:
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.set_rng_state(state[f"rng.rank{rank}"])
