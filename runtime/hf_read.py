"""Reading a DeepSeek-V3 checkpoint's headers and checking them against a plan (for hf.py).

`Checkpoint(path)` resolves a directory (`model.safetensors`, or shards listed by
`model.safetensors.index.json`), an index file or one `.safetensors` file, and
reads every tensor's name, shape and dtype from the file headers (no data) plus
`config.json`. `validate(ck, plan)` lists every missing, wrong-shape and
unexpected tensor of the whole model, each with its file, so every rank of a
job reports the same problems before any of them copies a byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from .hf_names import SCALE_SUFFIX, is_fp8_dtype, mtp_copy_names, scale_shape, schema
from .inputs import InputError, load_json
from .plan import Plan

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SHOWN = 20  # problems listed per kind before "... and N more"


class HFCheckpointError(Exception):
    """A checkpoint that cannot be loaded or written; `problems` lists every reason."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(what + ":\n  " + "\n  ".join(self.problems))


@dataclasses.dataclass
class Entry:
    file: pathlib.Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, BF16, F8_E4M3, ...


class Checkpoint:
    """A checkpoint's tensor headers (no data read) and its config.json, if any."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        p = pathlib.Path(path)
        if not p.exists():
            raise HFCheckpointError(f"cannot load {p}", ["no such file or directory"])
        root = p if p.is_dir() else p.parent
        problems: list[str] = []
        index = p / INDEX if p.is_dir() else (p if p.name.endswith(".index.json") else None)
        if index is not None and index.exists():
            weight_map = self._read_index(index, problems)
            files = sorted({root / f for f in weight_map.values()})
        elif p.is_dir():
            files = [p / SINGLE] if (p / SINGLE).exists() else sorted(p.glob("*.safetensors"))
            weight_map = None
            if not files:
                raise HFCheckpointError(
                    f"cannot load {p}", [f"no {SINGLE}, {INDEX} or *.safetensors file"]
                )
        else:
            files, weight_map = [p], None
        self.root, self.tensors = root, {}
        for f in files:
            if not f.exists():
                problems.append(f"{f.name}: listed in {INDEX} but missing")
                continue
            try:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():  # noqa: SIM118 -- safe_open is not iterable
                        sl = h.get_slice(name)
                        self.tensors[name] = Entry(f, tuple(sl.get_shape()), sl.get_dtype())
            except (SafetensorError, OSError) as exc:
                problems.append(f"{f.name}: not a readable safetensors file ({exc})")
        for name, fname in (weight_map or {}).items():
            entry = self.tensors.get(name)
            if (root / fname).exists() and (entry is None or entry.file.name != fname):
                problems.append(f"{name}: listed in {INDEX} under {fname} but not in that file")
        if problems:
            raise HFCheckpointError(f"cannot load {p}", problems)
        self.config = None
        cfg = root / "config.json"
        if cfg.exists():
            try:
                self.config = load_json(cfg)
            except InputError as exc:
                raise HFCheckpointError(f"cannot load {p}", [exc.reason]) from None
            if not isinstance(self.config, dict):
                raise HFCheckpointError(f"cannot load {p}", ["config.json: not a JSON object"])
        q = (self.config or {}).get("quantization_config") or {}
        block = q.get("weight_block_size", (128, 128)) if isinstance(q, dict) else None
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise HFCheckpointError(f"cannot load {p}", [
                f"config.json: quantization_config.weight_block_size must be two positive "
                f"integers, got {json.dumps(block)}"])
        self.block = tuple(block)

    @staticmethod
    def _read_index(index: pathlib.Path, problems: list[str]) -> dict[str, str]:
        try:
            weight_map = load_json(index)["weight_map"]
        except InputError as exc:
            raise HFCheckpointError(f"cannot load {index}", [exc.reason]) from None
        except (KeyError, TypeError):
            raise HFCheckpointError(
                f"cannot load {index}", ["not a safetensors index (no \"weight_map\" object)"]
            ) from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise HFCheckpointError(f"cannot load {index}", [
                "not a safetensors index (\"weight_map\" must map tensor names to file names)"])
        outside = sorted({f for f in weight_map.values()
                          if "/" in f or "\\" in f or f in ("", ".", "..")})
        if outside:  # shards are files beside the index, never paths elsewhere
            raise HFCheckpointError(f"cannot load {index}", [
                f"weight_map names files outside the checkpoint directory: {', '.join(outside[:5])}"])
        return dict(weight_map)


def _listed(kind: str, items: list[str]) -> list[str]:
    out = [f"{kind}: {item}" for item in items[:_SHOWN]]
    if len(items) > _SHOWN:
        out.append(f"{kind}: ... and {len(items) - _SHOWN} more")
    return out


def validate(ck: Checkpoint, plan: Plan) -> list[str]:
    """Missing, wrong-shape and unexpected tensors of the whole model (every rank says the same)."""
    want = schema(plan)
    m = plan.model
    optional = dict(mtp_copy_names(len(m.layers), m.mtp.depth) if m.mtp.depth else [])
    missing, shapes, unexpected = [], [], []
    for name, shape in want.items():
        e = ck.tensors.get(name)
        if e is None:
            missing.append(name)
            continue
        if e.shape != shape:
            shapes.append(
                f"{name} in {e.file.name}: shape {list(e.shape)}, the plan needs {list(shape)}"
            )
        elif is_fp8_dtype(e.dtype):
            s = ck.tensors.get(name + SCALE_SUFFIX)
            if len(shape) != 2 or s is None:
                shapes.append(
                    f"{name} in {e.file.name}: {e.dtype} without a 2-D {name}{SCALE_SUFFIX}"
                )
            elif s.shape != scale_shape(shape, ck.block):
                shapes.append(
                    f"{name}{SCALE_SUFFIX} in {s.file.name}: shape {list(s.shape)}, "
                    f"{list(scale_shape(shape, ck.block))} for {ck.block[0]}x{ck.block[1]} blocks"
                )
    for name, e in ck.tensors.items():
        if name in want or name.endswith("rotary_emb.inv_freq"):
            continue
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in want:
            continue
        if name in optional:
            if e.shape != want.get(optional[name], want["model.embed_tokens.weight"]):
                shapes.append(
                    f"{name} in {e.file.name}: shape {list(e.shape)} differs from {optional[name]}"
                )
            continue
        unexpected.append(f"{name} (in {e.file.name})")
    where = f" (checkpoint {ck.root})"
    return (
        _listed("missing" + where, missing)
        + _listed("wrong shape", shapes)
        + _listed("unexpected, not part of the planned model", unexpected)
    )
