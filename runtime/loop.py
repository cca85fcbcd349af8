"""The entry point of a build directory's train.py: arguments, checks, the step loop.

Runs on every rank under torchrun (or alone for a world-size-1 plan). Before it
starts a process group or writes a file it checks everything a user can get
wrong: the data file (exists, its dtype plausible), the checkpoint to resume
(complete, readable, of this model and pipeline layout), the world size. Then
it builds the `Trainer` (the runtime's stage modules, as plan.json lays them out),
resumes, runs the steps with the console on rank 0, saves checkpoints
atomically and prints a summary. A user error ends the job with a one-line
`[dsvc] error: ...` and exit code 1, and nothing is overwritten; under
torchrun the process leaves at once so that torchrun stops its peers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

EXIT_USER = 1
_QUIET_EXIT_DELAY_S = 2.0


class LaunchError(Exception):
    """The job was launched in a way that cannot run this plan."""


class DivergedError(Exception):
    """The loss or the gradient norm stopped being finite; the run cannot go on from here."""


def parse_args(argv):
    from .plan import PROGRAM_CHOICES

    p = argparse.ArgumentParser(description="Train the compiled model (see README.md here).")
    p.add_argument("--run-dir", default="run", help="metrics.jsonl and checkpoints/")
    p.add_argument("--steps", type=_positive, help="train until this step (default: the plan's)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--data", help="token file (overrides the plan's data)")
    p.add_argument("--data-dtype", choices=("uint16", "uint32"),
                   help="dtype of the --data file (default: the plan's)")
    p.add_argument("--fp32", action="store_true", help="every linear and state in fp32")
    p.add_argument("--checkpoint-every", type=_non_negative,
                   help="steps between checkpoints (0: none; default: the spec's)")
    p.add_argument("--init-hf", metavar="DIR",
                   help="start from a Hugging Face DeepSeek-V3 checkpoint (safetensors, FP8 with "
                   "weight_scale_inv included) instead of random weights; every rank loads its "
                   "own stages and experts (ignored when --resume finds a checkpoint)")
    p.add_argument("--program", choices=PROGRAM_CHOICES, default=PROGRAM_CHOICES[0],
                   help="decoder blocks: this build's generated stage program (program.py, "
                   "fused kernels) or the runtime's eager modules (the reference)")
    p.add_argument("--backend", choices=("torch", "triton"),
                   help="FP8 GEMMs: torch emulation or this build's generated Triton kernels "
                   "(default: triton with CUDA, torch on CPU)")
    return p.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def fp32_precision() -> dict:
    return {"default": "fp32", "linear": "fp32", "master_weights": "fp32", "grads": "fp32",
            "optimizer_states": "fp32", "dispatch": "fp32", "combine": "fp32"}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(msg: str) -> None:
    if _rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def main(build_dir: str, argv=None, checkpoint_every: int = 0) -> int:
    """Run training from `build_dir/plan.json`; `checkpoint_every` is the spec's default."""
    args = parse_args(argv)
    if args.checkpoint_every is None:
        args.checkpoint_every = checkpoint_every
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .launch import run_guarded

        # an unexpected error on one rank must not leave the others waiting in a collective
        return run_guarded(_main_checked, build_dir, args, True)
    return _main_checked(build_dir, args, False)


def _main_checked(build_dir: str, args, distributed: bool) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .hf import HFCheckpointError, HFFormatError
    from .plan import PlanError

    try:
        return _run(build_dir, args)
    except (DataError, CheckpointError, PlanError, LaunchError, DivergedError,
            HFCheckpointError, HFFormatError) as err:
        head, *rest = str(err).split("\n")  # one line, whatever the message holds
        text = " ".join([head, "; ".join(line.strip() for line in rest)]).strip()
        # before the process group exists every rank finds the same problem: rank 0 says it;
        # a data error met while training can be one rank's own (its slice of the file)
        if _rank() == 0 or (isinstance(err, DataError) and _group_started()):
            who = "" if _rank() == 0 else f" (rank {_rank()})"
            print(f"[dsvc] error{who}: {text}", file=sys.stderr, flush=True)
        if distributed:
            sys.stdout.flush()
            if _rank() != 0:
                # errors found before the first collective are found by every rank: let
                # rank 0 print its line before torchrun stops the job on the first exit
                time.sleep(_QUIET_EXIT_DELAY_S)
            os._exit(EXIT_USER)  # torchrun then stops the other ranks at once
        _shutdown()
        return EXIT_USER


def _group_started() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def load_raw_plan(build_dir: str, args) -> dict:
    """plan.json with the command line's overrides applied (precision, backend, data)."""
    from .inputs import InputError, load_json

    path = os.path.join(build_dir, "plan.json")
    if not os.path.lexists(path):
        raise LaunchError(f"{build_dir} is not a dsvc build directory (no plan.json)")
    try:
        raw = load_json(path)
    except InputError as err:
        raise LaunchError(f"{err}; recompile the spec") from None
    if not isinstance(raw, dict):
        raise LaunchError(f"{path} is not a dsvc plan (a JSON object); recompile the spec")
    if args.fp32:
        raw["precision"] = fp32_precision()
    if linear_format(raw).startswith("fp8"):
        raw["precision"]["fp8_backend"] = args.backend or _default_backend(raw)
    if args.data:
        raw["train"]["data"] = {"kind": "tokens", "path": os.path.abspath(args.data),
                                "dtype": args.data_dtype or raw["train"]["data"].get("dtype")
                                or "uint32"}
    elif args.data_dtype:
        raw["train"]["data"]["dtype"] = args.data_dtype
    return raw


def linear_format(raw: dict) -> str:
    """The format of the plan's linears: "fp8_e4m3", "bf16", "fp32"."""
    linear = raw["precision"].get("linear", raw["precision"].get("default", "fp32"))
    return linear.get("format", "fp32") if isinstance(linear, dict) else str(linear)


def _default_backend(raw: dict) -> str:
    """The generated Triton kernels where they can run fast, the torch emulation elsewhere."""
    import torch

    return "triton" if torch.cuda.is_available() else raw["precision"].get("fp8_backend", "torch")


def _run(build_dir: str, args) -> int:
    from . import checkpoint as ckpt
    from . import train_state
    from .console import Console
    from .plan import parse_plan

    build_dir = os.path.abspath(build_dir)
    raw = load_raw_plan(build_dir, args)
    plan = parse_plan(raw, os.path.join(build_dir, "plan.json"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = args.steps or raw["train"].get("steps") or 1
    data = raw["train"]["data"]
    if data["kind"] == "tokens":  # a missing file or a wrong dtype, before any process group
        from .data import make_data

        make_data("tokens", vocab=plan.model.vocab, seq_len=plan.train.seq_len,
                  path=data["path"], dtype=data["dtype"])
    expected = {"model_hash": train_state.model_hash(raw),
                "pipeline_layout": train_state.pipeline_layout(raw),
                "world_size": plan.mesh.world_size, "data": plan.mesh.data}
    run_dir = os.path.abspath(args.run_dir)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    _check_run_dir(run_dir, ckpt_root)
    start_path, meta = _checkpoint_to_resume(ckpt_root, args.resume, expected)
    if world != plan.mesh.world_size:
        raise LaunchError(
            f"this plan needs {plan.mesh.world_size} processes (pipeline {plan.mesh.pipeline} x "
            f"data {plan.mesh.data}), launched with {world}: run `torchrun --nproc-per-node "
            f"{plan.mesh.world_size} {os.path.join(build_dir, 'train.py')}`")
    init_hf = None
    if args.init_hf and start_path is not None:
        _say(f"[dsvc] resuming from {start_path}: --init-hf {args.init_hf} is not read")
    elif args.init_hf:
        from .hf import check_hf_checkpoint

        init_hf = os.path.abspath(args.init_hf)
        check_hf_checkpoint(init_hf, plan)  # every problem, before any process group exists
    if plan.precision.fp8_backend == "triton":
        from . import fp8

        fp8.use_kernels(os.path.join(build_dir, "kernels", "fp8_kernels.py"))
    trainer = _build_trainer(plan, init_hf)
    program_note = _attach_program(trainer, plan, build_dir, args.program)
    if start_path is not None:
        same_world = meta.get("world_size") == world
        fmt = meta.get("checkpoint_format", 1)
        state = train_state.template_for_load(trainer, with_rng=same_world, fmt=fmt)
        ckpt.load(start_path, state, expected)
        train_state.apply_loaded(trainer, state, with_rng=same_world, fmt=fmt)
        samples = meta.get("data_samples", trainer.sharder.samples_before(trainer.step_index))
        trainer.sharder.resume_at(trainer.step_index, int(samples))
        change = "" if same_world else f" (written by {meta.get('world_size')} processes)"
        _say(f"[dsvc] resumed from {start_path} at step {trainer.step_index}{change}")
    elif args.resume:
        _say(f"[dsvc] no complete checkpoint in {ckpt_root}: starting from step 0")
    if trainer.step_index >= steps:
        _say(f"[dsvc] nothing to do: at step {trainer.step_index}, asked to train until {steps}")
        _shutdown()
        return 0
    rank = _rank()
    console = Console(run_dir, steps, trainer.step_index, enabled=rank == 0)
    console.header(_describe(plan, raw, steps) + program_note)
    loads = meta.get("expert_load") if start_path is not None else None
    _train(trainer, plan, steps, console, ckpt_root, expected, args.checkpoint_every, loads, raw)
    console.summary()
    _shutdown()
    return 0


def _check_run_dir(run_dir: str, ckpt_root: str) -> None:
    """Where metrics and checkpoints go can be written: found before any process group
    starts (every rank finds it; rank 0 says it), not as a traceback after the first step."""
    from .inputs import InputError, check_writable_dir

    try:
        check_writable_dir(run_dir)
        if os.path.lexists(ckpt_root) and not os.path.isdir(ckpt_root):
            raise InputError(ckpt_root, "is a file; the run keeps its checkpoints there")
    except InputError as err:
        raise LaunchError(f"run directory {err}") from None


def _checkpoint_to_resume(ckpt_root: str, resume: bool, expected: dict):
    """(path, record) of the checkpoint to resume, checked against this plan; (None, None)
    for a fresh start, which is refused where it would overwrite another run's checkpoints."""
    from . import checkpoint as ckpt

    path = ckpt.latest(ckpt_root)
    if not resume:
        if path is not None:
            raise LaunchError(
                f"{ckpt_root} already holds checkpoints (latest: step "
                f"{ckpt.complete_steps(ckpt_root)[-1]}): pass --resume to continue that run, "
                "or choose another --run-dir to start a new one")
        return None, None
    if path is None:
        return None, None
    meta = ckpt.read_meta(path)
    ckpt.check_compatible(meta, expected, path)
    return path, meta


def _attach_program(trainer, plan, build_dir: str, which: str) -> str:
    """Run the build's generated program in this rank's blocks (`--program generated`);
    returns how the header describes the blocks. A build without program.py (compiled by
    an older dsvc) and a plan whose precision the program was not generated for (--fp32)
    keep the eager modules, and the header says why."""
    from . import program

    if which == "eager":
        return "; blocks eager (--program eager)"
    path = os.path.join(build_dir, "program.py")
    if not os.path.exists(path):
        return "; blocks eager (no program.py in the build: recompile for the generated program)"
    prog = program.load_program(path)
    why = program.program_mismatch(prog, plan)
    if why is not None:
        return f"; blocks eager ({why})"
    attached, total = program.attach_program(trainer.modules, prog, plan,
                                             plan.precision.fp8_backend)
    return f"; {attached} of {total} blocks run the generated program"


def _build_trainer(plan, init_hf: str | None = None):
    from .launch import init_distributed
    from .mesh import build_mesh
    from .trainer import Trainer

    mesh = build_mesh(plan, init_distributed())  # this rank's GPU under CUDA, else the CPU
    if init_hf is None:
        return Trainer(plan, mesh)

    def load(modules) -> None:  # this rank's stages and experts, before the optimizer copies them
        from .hf import load_hf_checkpoint

        report = load_hf_checkpoint(init_hf, modules, plan)
        fp8 = f", {len(report.dequantized)} dequantised from FP8" if report.dequantized else ""
        _say(f"[dsvc] weights from {init_hf}: {len(report.loaded)} tensors on rank 0{fp8}")

    return Trainer(plan, mesh, load_weights=load)


def _describe(plan, raw: dict, steps: int) -> str:
    m = plan.mesh
    gemms = linear_format(raw)
    if gemms.startswith("fp8"):
        gemms = {"torch": "FP8 (torch emulation)", "triton": "FP8 (generated Triton kernels)",
                 "cublas": "FP8 (cuBLAS)"}[plan.precision.fp8_backend]
    return (f"[dsvc] {plan.train.global_batch} x {plan.train.seq_len} tokens per step, "
            f"{m.world_size} process{'es' if m.world_size != 1 else ''} (pipeline {m.pipeline} "
            f"x data {m.data}, experts over {m.expert}), linears {gemms}, until step {steps}")


def _train(trainer, plan, steps: int, console, ckpt_root: str, expected: dict, every: int,
           resumed_loads=None, plan_raw: dict | None = None):
    from . import checkpoint as ckpt
    from . import expert_load, train_state

    tokens_per_step = plan.train.global_batch * plan.train.seq_len
    saved = trainer.step_index
    run_dir = os.path.dirname(ckpt_root)
    # expert-load counts of the steps before this process (from the checkpoint), if any
    base, first = expert_load.from_record(resumed_loads) or ({}, trainer.step_index + 1)

    path = os.path.join(run_dir, "expert_load.json")
    if trainer.step_index == 0 and _rank() == 0 and os.path.exists(path):
        with contextlib.suppress(OSError):  # if it cannot move, the first write says so
            os.replace(path, path + ".prev")  # a fresh run: keep the last one's, don't mix

    def loads_so_far() -> dict:  # every rank: the gather is a collective (result on rank 0)
        layers = expert_load.gather(
            trainer.load_totals, len(plan.model.layers), contribute=trainer.mesh.dp_rank == 0
        )
        return expert_load.add(base, layers)

    def record_loads(layers: dict) -> None:
        if layers and _rank() == 0:
            why = expert_load.write(path, layers, first, trainer.step_index, tokens_per_step)
            if why is not None:
                _say(f"[dsvc] warning: could not write {path} ({why}); the expert-load "
                     "counts are kept in the checkpoints")  # fmt: skip

    def save() -> None:
        layers = loads_so_far()
        # the plan goes along: `dsvc export-hf` reads a checkpoint without its build directory
        record = dict(expected, data_samples=trainer.sharder.samples_before(trainer.step_index),
                      expert_load=expert_load.to_record(layers, first),
                      checkpoint_format=train_state.FORMAT, plan=plan_raw)  # fmt: skip
        ckpt.save(ckpt_root, trainer.step_index, train_state.state_for_save(trainer), record)
        record_loads(layers)

    while trainer.step_index < steps:
        t0 = time.perf_counter()
        metrics = trainer.step()
        dt = time.perf_counter() - t0
        console.log({
            "step": trainer.step_index, "loss": metrics["loss"], "lr": metrics["lr"],
            "grad_norm": metrics["grad_norm"], "tokens_per_s": tokens_per_step / dt,
            "max_expert_load_ratio": metrics["max_expert_load_ratio"],
            "lm_loss": metrics.get("lm_loss"), "mtp_loss": metrics.get("mtp_loss"),
            "aux_loss": metrics.get("aux_loss"), "step_time_s": dt,
        })  # fmt: skip
        try:
            _check_finite(metrics, trainer.step_index, ckpt_root)
        except DivergedError:  # every rank at the same step: the gather is safe
            record_loads(loads_so_far())  # the routing up to the divergence, worth a look
            raise
        if every and trainer.step_index % every == 0:
            save()
            saved = trainer.step_index
    if every and saved != trainer.step_index:
        save()  # the last step, so that a longer run can resume where this one stopped
    elif not every:
        record_loads(loads_so_far())


def _check_finite(metrics: dict, step: int, ckpt_root: str) -> None:
    # The metrics are all-reduced, so every rank takes this branch at the same step; the
    # step's line is already in metrics.jsonl, and no checkpoint of it is written.
    loss, norm = metrics["loss"], metrics.get("grad_norm")
    if math.isfinite(loss) and (norm is None or math.isfinite(norm)):
        return
    raise DivergedError(
        f"training diverged at step {step}: loss {loss}, gradient norm {norm}; stopped without "
        f"saving this step (checkpoints already in {ckpt_root} are untouched); resume from the "
        "last one with a lower learning rate or more warmup, or look for bad data in this step"
    )
