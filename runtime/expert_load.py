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

`read_histogram` is the one reader of the format (the compiler's `place_experts`
and report use it), under the input policy of `inputs.py`. Reading needs only the
standard library, so torch is imported by the functions that count, not here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re

from .inputs import InputError, load_json

FORMAT = "dsvc-expert-load"
VERSION = 1
# "layers.3", or a parameter-name prefix such as "layers.3.mlp" (the runtime's MoE names)
_LAYER_KEY = re.compile(r"layers\.(\d+)(?:\.[A-Za-z_][\w.]*)?\Z")


def layer_index(name: str, num_layers: int) -> int:
    """The compiler's layer index of a MoE module: "layers.3.mlp" -> 3, "mtp.0..." -> L + 0."""
    parts = name.split(".")
    if parts[0] == "layers":
        return int(parts[1])
    if parts[0] == "mtp":
        return num_layers + int(parts[1])
    raise ValueError(f"not a MoE layer name: {name!r}")


def accumulate(totals: dict, loads: dict) -> None:
    """Add one step's per-expert loads (tensors on any device) into fp64 CPU totals."""
    import torch

    for name, load in loads.items():
        step = load.detach().to("cpu", torch.float64)
        total = totals.get(name)
        totals[name] = step if total is None else total + step


def gather(totals: dict, num_layers: int, contribute: bool = True):
    """Every pipeline rank's layers, by layer index, on global rank 0 (a collective when a
    process group is up; other ranks get an empty dict).

    Data-parallel peers hold the same (all-reduced) counts, so only `contribute` ranks
    (data rank 0) send theirs: rank 0 receives one histogram per pipeline rank, not one
    per process.
    """
    import torch.distributed as dist

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
        "version": VERSION,
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


# ----------------------------------------------------------------------------- reading


class HistogramError(InputError):
    """A readable JSON file that is not a histogram for this model (`str()`: one line)."""


def read_histogram(path: str, routed: dict[int, int]) -> dict[int, tuple[float, ...]]:
    """Per-expert loads of each MoE layer from a histogram file (docs/ir.md).

    `routed` maps every MoE layer index (MTP modules as `num_layers + k`) to its number
    of routed experts. The canonical form is `{"format": "dsvc-expert-load", "version":
    1, "layers": {"3": [...], ...}, "default": [...]}`; shorthands: one list (every
    layer), a list of lists (the MoE layers in order), or `{"layers.3": [...]}` (also
    with a parameter-name suffix: `{"layers.3.mlp": [...]}`). Layers without an entry
    are absent from the result. Raises `InputError` when the file cannot be read as
    JSON under the input policy, `HistogramError` when it is not a histogram of this
    model (a layer that is not a MoE layer, a wrong number of experts, a negative load).
    """
    raw = load_json(path)
    layers = sorted(routed)
    out = _layers_of(raw, path, layers)
    stray = sorted(set(out) - set(routed))
    if stray:
        raise HistogramError(path, f"gives layer {stray[0]}, which is not a MoE layer of this "
                                   f"model (its MoE layers, MTP modules last: {_ranges(layers)}); "
                                   "is the file from another model?")
    return {layer: _loads(out[layer], layer, routed[layer], path) for layer in sorted(out)}


def _layers_of(raw, path: str, layers: list[int]) -> dict[int, object]:
    if isinstance(raw, list) and raw and all(_is_load(v) for v in raw):
        return {layer: raw for layer in layers}
    if isinstance(raw, list) and raw and all(isinstance(h, list) for h in raw):
        if len(raw) != len(layers):
            raise HistogramError(path, f"lists {len(raw)} histograms; the model has "
                                       f"{len(layers)} MoE layers (MTP included)")
        return dict(zip(layers, raw))
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        if raw.get("version") != VERSION:
            raise HistogramError(path, f"has format version {raw.get('version')!r}, which "
                                       f"this dsvc does not read (it reads {VERSION})")
        given = raw.get("layers", {})
        if not isinstance(given, dict) or not all(k.isdigit() and len(k) <= 6 for k in given):
            raise HistogramError(path, 'has a `layers` that does not map layer indices ("3") '
                                       "to per-expert loads")
        out = {int(k): v for k, v in given.items()}
        if "default" in raw:
            out = {layer: out.get(layer, raw["default"]) for layer in layers} | out
        return out
    if isinstance(raw, dict) and raw and all(_LAYER_KEY.match(k) for k in raw):
        out = {}
        for key, v in raw.items():
            digits = _LAYER_KEY.match(key).group(1)
            layer = int(digits) if len(digits) <= 6 else -1  # no model has a millionth layer
            if layer in out:
                raise HistogramError(path, f"gives layer {layer} twice ('{key}')")
            out[layer] = v
        return out
    raise HistogramError(path, f'is not an expert load histogram (expected {{"format": '
                               f'"{FORMAT}", "version": {VERSION}, "layers": {{"3": [...]}}}})')


def _is_load(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf


def _loads(values, layer: int, routed: int, path: str) -> tuple[float, ...]:
    if not (isinstance(values, list) and all(_is_load(v) for v in values)) \
            or len(values) != routed:
        got = f"{len(values)} entries" if isinstance(values, list) else repr(values)[:40]
        raise HistogramError(path, f"gives layer {layer} as {got}; it must list {routed} "
                                   "non-negative numbers (one per routed expert)")
    return tuple(float(v) for v in values)


def _ranges(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    parts, start = [], None
    for i, v in enumerate(layers):
        start = v if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            parts.append(str(v) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts) or "none"
