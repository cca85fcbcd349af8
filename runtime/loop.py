"""The entry point of a build directory's train.py: arguments, checks, the step loop.

Runs on every rank under torchrun (or alone for a world-size-1 plan):
checks the launch matches the plan before touching any file, builds the
`Trainer`, resumes from the latest complete checkpoint when asked, runs the
steps with the console on rank 0, saves checkpoints atomically, and prints a
summary. User errors (a missing data file, a wrong token dtype, a corrupt or
foreign checkpoint, a world size that does not match the plan) end the job
with a one-line message and exit code 1; nothing is overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_USER = 1


class LaunchError(Exception):
    """The job was launched in a way that cannot run this plan."""


def parse_args(argv):
    p = argparse.ArgumentParser(description="Train the compiled model (see README.md here).")
    p.add_argument("--run-dir", default="run", help="metrics.jsonl and checkpoints/")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the plan's)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--data", help="token file (overrides the plan's path)")
    p.add_argument("--fp32", action="store_true", help="every linear and state in fp32")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--backend", choices=("torch", "triton"),
                   help="FP8 GEMMs: torch emulation or the generated Triton kernels")
    return p.parse_args(argv)


def fp32_precision() -> dict:
    return {"default": "fp32", "linear": "fp32", "master_weights": "fp32", "grads": "fp32",
            "optimizer_states": "fp32", "dispatch": "fp32", "combine": "fp32"}


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def main(build_dir: str, argv=None, checkpoint_every: int = 0) -> int:
    """Run training from `build_dir/plan.json`; `checkpoint_every` is the spec's default."""
    args = parse_args(argv)
    if args.checkpoint_every is None:
        args.checkpoint_every = checkpoint_every
    from .checkpoint import CheckpointError
    from .data import DataError
    from .plan import PlanError

    try:
        return _run(build_dir, args)
    except (DataError, CheckpointError, PlanError, LaunchError) as err:
        _say(f"[dsvc] error: {err}")
        _shutdown()
        return EXIT_USER


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(build_dir: str, args) -> int:
    from . import checkpoint as ckpt
    from . import train_state
    from .console import Console
    from .launch import init_distributed
    from .plan import parse_plan
    from .trainer import Trainer

    with open(os.path.join(build_dir, "plan.json")) as f:
        raw = json.load(f)
    if args.fp32:
        raw["precision"] = fp32_precision()
    if args.backend:
        if isinstance(raw["precision"].get("linear"), dict):
            raw["precision"]["fp8_backend"] = args.backend
    if args.data:
        raw["train"]["data"]["path"] = os.path.abspath(args.data)
    steps = args.steps or raw["train"].get("steps") or 1
    plan = parse_plan(raw, os.path.join(build_dir, "plan.json"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != plan.mesh.world_size:
        raise LaunchError(
            f"this plan needs {plan.mesh.world_size} processes (pipeline {plan.mesh.pipeline} x "
            f"data {plan.mesh.data}), launched with {world}: run `torchrun --nproc-per-node "
            f"{plan.mesh.world_size} {os.path.join(build_dir, 'train.py')}`")
    if raw["train"]["data"]["kind"] == "tokens":
        from .data import make_data

        make_data("tokens", vocab=plan.model.vocab, seq_len=plan.train.seq_len,
                  path=raw["train"]["data"]["path"], dtype=raw["train"]["data"]["dtype"])
    ckpt_root = os.path.join(os.path.abspath(args.run_dir), "checkpoints")
    start_path = ckpt.latest(ckpt_root) if args.resume else None
    if start_path is not None:
        ckpt.read_meta(start_path)  # a broken record fails here, before anything runs
    if plan.precision.fp8_backend == "triton":
        from . import fp8

        fp8.use_kernels(os.path.join(build_dir, "kernels", "fp8_kernels.py"))
    init_distributed()
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer = Trainer(plan)
    expected = {"model_hash": train_state.model_hash(raw),
                "pipeline_layout": train_state.pipeline_layout(raw),
                "world_size": world, "data": plan.mesh.data}
    if start_path is not None:
        meta = ckpt.read_meta(start_path)
        same_world = meta.get("world_size") == world
        state = train_state.template_for_load(trainer, with_rng=same_world)
        ckpt.load(start_path, state, expected)
        train_state.apply_loaded(trainer, state, with_rng=same_world)
        _say(f"[dsvc] resumed from {start_path} (step {trainer.step_index})")
    elif args.resume:
        _say(f"[dsvc] no complete checkpoint in {ckpt_root}: starting from step 0")
    every = args.checkpoint_every
    console = Console(os.path.abspath(args.run_dir), steps, trainer.step_index, enabled=rank == 0)
    tokens_per_step = plan.train.global_batch * plan.train.seq_len
    while trainer.step_index < steps:
        t0 = time.perf_counter()
        metrics = trainer.step()
        dt = time.perf_counter() - t0
        record = {"step": trainer.step_index, "loss": metrics["loss"], "lr": metrics["lr"],
                  "grad_norm": metrics["grad_norm"], "tokens_per_s": tokens_per_step / dt,
                  "max_expert_load_ratio": metrics["max_expert_load_ratio"],
                  "lm_loss": metrics.get("lm_loss"), "mtp_loss": metrics.get("mtp_loss"),
                  "aux_loss": metrics.get("aux_loss"), "step_time_s": dt}
        console.log(record)
        if every and trainer.step_index % every == 0:
            ckpt.save(ckpt_root, trainer.step_index, train_state.state_for_save(trainer), expected)
    console.summary()
    _shutdown()
    return 0
