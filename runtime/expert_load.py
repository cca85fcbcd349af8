"""RUN_DIR/expert_load.json: the tokens each routed expert received over a run.

Written in the compiler's histogram format (docs/ir.md, `dsvc-expert-load` version 1),
so a measured routing goes straight back into `dsvc report / inspect / compile
--expert-load` (or `parallel { expert_load = ... }`): the report's load imbalance,
the simulated all-to-all and the redundant-expert placement then follow what the
router did rather than a uniform guess.

Counts are token-expert assignments (each token counts once per expert it is routed
to), summed over data-parallel ranks and DualPipe copies, over the whole run: each
checkpoint's record carries the counts so far, so a resumed run continues them (a
checkpoint written before this existed restarts the count at the resume). Each
pipeline rank holds only its own stages' layers, so every rank takes part in the
gather; rank 0 writes the file atomically.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.distributed as dist

FORMAT = "dsvc-expert-load"


def layer_index(name: str, num_layers: int) -> int:
    """The compiler's layer index of a MoE module: "layers.3.mlp" -> 3, "mtp.0..." -> L + 0."""
    parts = name.split(".")
    if parts[0] == "layers":
        return int(parts[1])
    if parts[0] == "mtp":
        return num_layers + int(parts[1])
    raise ValueError(f"not a MoE layer name: {name!r}")


def accumulate(totals: dict[str, torch.Tensor], loads: dict[str, torch.Tensor]) -> None:
    """Add one step's per-expert loads (any device) into fp64 CPU totals."""
    for name, load in loads.items():
        step = load.detach().to("cpu", torch.float64)
        total = totals.get(name)
        totals[name] = step if total is None else total + step


def gather(totals: dict[str, torch.Tensor], num_layers: int, contribute: bool = True):
    """Every pipeline rank's layers, by layer index, on global rank 0 (a collective when a
    process group is up; other ranks get an empty dict).

    Data-parallel peers hold the same (all-reduced) counts, so only `contribute` ranks
    (data rank 0) send theirs: rank 0 receives one histogram per pipeline rank, not one
    per process.
    """
    local = {layer_index(name, num_layers): t.tolist() for name, t in totals.items()}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    rank = dist.get_rank()
    parts: list | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(local if contribute else {}, parts, dst=0)
    merged: dict[int, list[float]] = {}
    for part in parts or ():  # DualPipe copies of a layer carry the same (summed) counts
        merged.update(part)
    return merged


def add(base: dict[int, list[float]], more: dict[int, list[float]]) -> dict[int, list[float]]:
    """Per-layer sums of two histograms (a resumed run's counts on top of the checkpoint's)."""
    out = {k: list(v) for k, v in base.items()}
    for k, v in more.items():
        out[k] = [a + b for a, b in zip(out[k], v)] if k in out else list(v)
    return out


def to_record(layers: dict[int, list[float]], first_step: int) -> dict:
    """What a checkpoint keeps of the counts so far (its dsvc.json `expert_load`)."""
    return {
        "first_step": first_step,
        "layers": {str(k): [_count(v) for v in layers[k]] for k in sorted(layers)},
    }


def from_record(record) -> tuple[dict[int, list[float]], int] | None:
    """The counts a checkpoint carried, or None (older checkpoints have none)."""
    if not isinstance(record, dict) or not isinstance(record.get("layers"), dict):
        return None
    try:
        layers = {int(k): [float(x) for x in v] for k, v in record["layers"].items()}
        return layers, int(record["first_step"])
    except (TypeError, ValueError, KeyError):
        return None


def write(
    path: str, layers: dict[int, list[float]], first_step: int, last_step: int, tokens_per_step: int
) -> str | None:
    """The histogram file, replaced atomically (a reader never sees half of it).

    Returns None, or why it could not be written (a full disk, a directory in the way):
    the counts are in the checkpoints too, so the caller warns and training goes on.
    """
    record = {
        "format": FORMAT,
        "version": 1,
        "steps": [first_step, last_step],
        "tokens_per_step": tokens_per_step,
        "layers": to_record(layers, first_step)["layers"],
    }
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


def _count(value: float):
    # counts are whole numbers; keep them integers in the file
    return int(value) if float(value).is_integer() else value
