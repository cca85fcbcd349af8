"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout under a checkpoint directory:

    step_00000020/            a complete checkpoint (DCP files + dsvc.json)
    step_00000040.partial/    a save in progress, or one a crash interrupted: ignored

Every rank writes its shard of the state with `dcp.save` into the `.partial`
directory; after a barrier rank 0 writes `dsvc.json` (step, hashes, layout)
and renames the directory. A rename is atomic, so a checkpoint is visible
only when complete, and a process killed mid-save leaves the previous one
untouched. State keys are global names (parameters by their model name, the
ZeRO-1 optimizer state as flat vectors sharded over the data-parallel ranks:
runtime/train_state.py), so a run can resume with another data-parallel degree:
DCP reads each rank the pieces it now owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist

META = "dsvc.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, corrupt, or from another model or layout."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def save(root: str, step: int, state: dict, meta: dict) -> str:
    """Save `state` (this rank's tensors and objects) as checkpoint `step`; collective."""
    import torch.distributed.checkpoint as dcp

    final = step_dir(root, step)
    partial = final + ".partial"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(partial):
            shutil.rmtree(partial)  # left by an interrupted save
    _barrier()
    with _one_process_quiet():
        dcp.save(state, checkpoint_id=partial)
    _barrier()
    if _rank() == 0:
        record = dict(meta, step=step)
        tmp = os.path.join(partial, META + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(partial, META))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
    _barrier()
    return final


@contextlib.contextmanager
def _one_process_quiet():
    """DCP warns that it assumes one process when no process group exists: here it is
    meant (a world-size-1 plan), so the warning would only be noise on the console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def complete_steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under `root`, ascending."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, META)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest(root: str) -> str | None:
    steps = complete_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def read_meta(path: str) -> dict:
    """A checkpoint's record, read under the input policy (inputs.py: a regular file of
    bounded size, JSON of bounded depth and digits)."""
    from .inputs import InputError, load_json

    record = os.path.join(path, META)
    if not os.path.lexists(record):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META})")
    try:
        meta = load_json(record)
    except InputError as err:
        raise CheckpointError(f"{path}: {META} is unreadable ({err.reason})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{path}: {META} is not a dsvc checkpoint record")
    return meta


KNOWN_FORMATS = (1, 2, 3)  # train_state.FORMAT and the formats before it that still load


def check_compatible(meta: dict, expected: dict, path: str) -> None:
    """Refuse a checkpoint of another model or another pipeline layout (DP may differ)."""
    fmt = meta.get("checkpoint_format", 1)
    if fmt not in KNOWN_FORMATS:
        raise CheckpointError(f"{path} has checkpoint format {fmt!r}, which this dsvc does not "
                              f"read (it reads {', '.join(map(str, KNOWN_FORMATS))}): resume it "
                              "with the dsvc that wrote it")
    if meta.get("model_hash") != expected.get("model_hash"):
        raise CheckpointError(f"{path} is a checkpoint of a different model "
                              f"(model hash {str(meta.get('model_hash'))[:12]}, this plan "
                              f"{str(expected.get('model_hash'))[:12]}); refusing to load it")
    have, want = meta.get("pipeline_layout"), expected.get("pipeline_layout")
    if have != want:
        what = f"{have}, this plan has {want}"
        if isinstance(have, dict) and isinstance(want, dict):
            parts = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
            what = "; ".join(f"{k}: checkpoint {have.get(k)}, this plan {want.get(k)}"
                             for k in parts)
        raise CheckpointError(f"{path} was written with another pipeline layout ({what}); "
                              "a checkpoint can change its data-parallel degree but not its "
                              "pipeline stages or expert placement")


def load(path: str, state: dict, expected: dict) -> dict:
    """Load checkpoint `path` into `state` in place (collective); returns its record."""
    import torch.distributed.checkpoint as dcp

    meta = read_meta(path)
    check_compatible(meta, expected, path)
    try:
        with _one_process_quiet():
            dcp.load(state, checkpoint_id=path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{path} is corrupt or incomplete ({_cause(err)}); remove it to "
                              "resume from the checkpoint before it") from None
    return meta


def read_entries(path: str, prefix: str):
    """(key, tensor) of every tensor entry of checkpoint `path` whose key starts with
    `prefix`, read one at a time by this process alone (no process group): for tools that
    read a checkpoint offline (`dsvc export-hf`) in the memory of one tensor."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        with _one_process_quiet():
            entries = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - DCP's own errors are BaseExceptions
        raise CheckpointError(f"{path} is corrupt or incomplete ({_cause(err)})") from None
    for key in sorted(entries):
        meta = entries[key]
        if not key.startswith(prefix) or not isinstance(meta, TensorStorageMetadata):
            continue
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        try:
            with _one_process_quiet():
                dcp.load({key: tensor}, checkpoint_id=path)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001
            raise CheckpointError(f"{path} is corrupt or incomplete: cannot read {key} "
                                  f"({_cause(err)})") from None
        yield key, tensor


def load_tensors(path: str, state: dict) -> None:
    """Fill `state` (tensors by checkpoint key, a subset of what it holds) from checkpoint
    `path` in this process alone, whatever layout wrote it and whether or not a process
    group exists (`no_dist`): the reader of `dsvc generate` and `runtime.trained`."""
    import torch.distributed.checkpoint as dcp

    try:
        with _one_process_quiet():
            dcp.load(state, checkpoint_id=path, no_dist=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{path}: cannot read the model's weights ({_cause(err)})") from None


def _cause(err: BaseException) -> str:
    """One line naming what went wrong: the first failing rank's error inside DCP's wrapper."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        inner = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        return f"rank {rank}: {_cause(inner)}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def rng_state() -> dict:
    """This rank's RNG states, as tensors DCP can store."""
    return {"torch": torch.get_rng_state()}


def set_rng_state(saved: dict) -> None:
    torch.set_rng_state(saved["torch"])
