"""Process setup and failure handling: no rank waits forever for a dead peer.

- `init_distributed()` joins the job torchrun (or `spawn`) started: gloo on CPU,
  NCCL with CUDA, with a bounded collective timeout.
- `run_guarded(fn)` runs a rank's work; if it raises, the rank prints
  `[dsvc] rank R failed: <error>` with the traceback and exits 1 at once
  (`os._exit`: no atexit handlers that could block on peers), so torchrun
  sees the failure and stops the other ranks.
- `spawn(fn, world_size)` is the in-process launcher tests use: it starts the
  ranks, returns their results, and on the first failing rank kills the rest
  and raises `WorkerFailure` naming that rank and its error; a job that runs past
  `timeout_s` is killed too.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pathlib
import queue
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist


class WorkerFailure(RuntimeError):
    """A rank of a spawned job failed (or the job timed out)."""

    def __init__(self, rank: int | None, message: str):
        self.rank = rank
        who = f"rank {rank}" if rank is not None else "the job"
        super().__init__(f"{who} failed: {message}")


def init_distributed(timeout_s: float = 300.0) -> torch.device:
    """Join the process group described by torchrun's environment; returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return device


def run_guarded(fn, *args, **kwargs):
    """fn(*args, **kwargs); a raise prints the rank and error and ends the process with 1."""
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 -- report anything, then leave
        rank = os.environ.get("RANK", "0")
        text = "".join(traceback.format_exception(exc))
        sys.stderr.write(f"[dsvc] rank {rank} failed: {type(exc).__name__}: {exc}\n{text}")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, fn, args, out_dir, errors, collective_timeout_s):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        if world > 1:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world,
                timeout=datetime.timedelta(seconds=collective_timeout_s),
            )  # fmt: skip
        result = fn(rank, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if world > 1:
            dist.barrier()
    except BaseException as exc:  # noqa: BLE001
        errors.put((rank, f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc))))
        sys.stderr.write(f"[dsvc] rank {rank} failed: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        time.sleep(0.2)  # let the queue's feeder thread hand the report over
        os._exit(1)
    os._exit(0)


def spawn(
    fn,
    world_size: int,
    args: tuple = (),
    timeout_s: float = 300.0,
    collective_timeout_s: float = 120.0,
):
    """Run fn(rank, *args) on `world_size` CPU processes (gloo); returns [result per rank].

    fn must be importable (a module-level function). Raises WorkerFailure on the
    first failing rank (the rest are killed) or when the job outlives `timeout_s`."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dsvc-spawn-") as out_dir:
        procs = [
            ctx.Process(
                target=_child, args=(r, world_size, port, fn, args, out_dir, errors, collective_timeout_s),
                daemon=True,
            )
            for r in range(world_size)
        ]  # fmt: skip
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        failure = None
        try:
            while any(p.is_alive() for p in procs):
                try:
                    rank, msg, tb = errors.get(timeout=0.1)
                    failure = WorkerFailure(rank, f"{msg}\n{tb}")
                    break
                except queue.Empty:
                    pass
                bad = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if bad:
                    failure = WorkerFailure(bad[0], f"exited with code {procs[bad[0]].exitcode}")
                    break
                if time.monotonic() > deadline:
                    failure = WorkerFailure(None, f"timed out after {timeout_s:.0f} s")
                    break
            if failure is None:
                for p in procs:
                    p.join()
                bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
                if bad:
                    try:
                        rank, msg, tb = errors.get(timeout=1.0)
                        failure = WorkerFailure(rank, f"{msg}\n{tb}")
                    except queue.Empty:
                        failure = WorkerFailure(
                            bad[0], f"exited with code {procs[bad[0]].exitcode}"
                        )
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)
        if failure is not None:
            raise failure
        return [
            torch.load(pathlib.Path(out_dir) / f"rank{r}.pt", weights_only=False)
            for r in range(world_size)
        ]
