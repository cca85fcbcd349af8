"""`dsvc train SPEC [--steps N] [--run-dir DIR] [--resume] [--init-hf DIR] [--set K=V]`: compile, launch.

The build is cached by the spec's content hash (sources and includes) and the
dsvc toolchain that compiled it, so a second run of the same spec compiles
nothing. The trainer is launched with torchrun semantics
(`torch.distributed.run --standalone`) at the world size the plan needs: gloo
on CPU, NCCL when CUDA is present. torchrun runs inside this module's own
`__main__` so that a failed job ends with the trainer's one-line message and
an exit code, not torchrun's traceback. Afterwards the loss curve is drawn from
RUN_DIR/metrics.jsonl into RUN_DIR/loss.png.
"""

from __future__ import annotations

import os

from dsvc.compiler.cli import add_set_argument, load_spec


def add_arguments(p) -> None:
    p.add_argument("spec", metavar="SPEC", help=".dsv spec")
    p.add_argument("--steps", type=int, help="train until this step (default: the spec's "
                   "train.steps)")
    p.add_argument("--run-dir", metavar="DIR", help="metrics, checkpoints, loss.png "
                   "(default: runs/MODEL)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in the run directory")
    p.add_argument("--fp32", action="store_true",
                   help="run every linear in fp32 (numerics reference mode)")
    p.add_argument("--build-dir", metavar="DIR", help="where the compiled build is cached "
                   "(default: $DSVC_CACHE or ~/.cache/dsvc, by spec hash)")
    p.add_argument("--init-hf", metavar="DIR", help="start from a Hugging Face DeepSeek-V3 "
                   "checkpoint (docs/hf.md): every rank loads its own stages and experts")
    from dsvc.runtime.plan import PROGRAM_CHOICES

    p.add_argument("--program", choices=PROGRAM_CHOICES,
                   help="decoder blocks: the build's generated stage program (the default) or "
                   "the runtime's eager modules, the reference")
    add_set_argument(p)


def cache_root() -> str:
    return os.environ.get("DSVC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsvc")


def _token_file(spec) -> str | None:
    """The spec's token file as an absolute path (relative to the spec), checked to be a
    regular file (a FIFO or a device would block or never end the trainer's reads)."""
    from dsvc.runtime.inputs import InputError, check_regular_file

    data = spec.train.data
    if data.kind != "tokens":
        return None
    path = data.path
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(spec.file)), path)
    try:
        check_regular_file(path)
    except InputError as err:
        from dsvc.dsl.diagnostics import Diagnostic, SpecError
        from dsvc.dsl.files import read_source

        span = spec.span("train.data")
        try:  # the line itself, for the caret
            source = read_source(span.file) if span else None
        except SpecError:
            source = None
        message = (f"token file not found: {path}" if not os.path.lexists(path)
                   else f"token file {path}: {err.reason}")
        raise SpecError([Diagnostic("error", message, span,
                                    "a path in tokens(...) is relative to the spec's directory",
                                    source)]) from None
    return path


def check_run_dir(run_dir: str) -> None:
    """The run directory (and its checkpoints/) can be written, checked before anything is
    compiled or launched: `--run-dir afile/run` is one line here, not a traceback from every
    worker. Whether a fresh start would overwrite checkpoints, and whether the one to resume
    fits, the trainer itself checks, before it starts a process group."""
    from dsvc.compiler.cli import UsageError
    from dsvc.runtime.inputs import InputError, check_writable_dir

    checkpoints = os.path.join(run_dir, "checkpoints")
    try:
        check_writable_dir(run_dir)
        if os.path.lexists(checkpoints) and not os.path.isdir(checkpoints):
            raise InputError(checkpoints, "is a file; the run keeps its checkpoints there")
    except InputError as err:
        raise UsageError(f"--run-dir {err}") from None


def run(args) -> int:
    import subprocess
    import sys

    from dsvc.compiler.cli import UsageError
    from dsvc.compiler.codegen.build import build_cached

    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    spec = load_spec(args.spec, args.set)
    if spec.train is None or spec.parallel is None or spec.cluster is None:
        missing = [b for b in ("cluster", "parallel", "train") if getattr(spec, b) is None]
        raise UsageError(f"{args.spec} has no {', '.join(missing)} block: nothing to train")
    if args.init_hf is not None and not os.path.exists(args.init_hf):
        raise UsageError(f"--init-hf {args.init_hf}: no such file or directory")
    data_path = _token_file(spec)
    run_dir = os.path.abspath(args.run_dir or os.path.join("runs", spec.model.name))
    check_run_dir(run_dir)
    build_dir = args.build_dir or os.path.join(cache_root(), "builds",
                                               f"{spec.model.name}-{spec.content_hash[:16]}")
    compiled = build_cached(spec, build_dir)
    if compiled is not None:
        from dsvc.compiler.cli.cmd_compile import report_kept

        report_kept(compiled, "dsvc train")
    world = spec.cluster.world_size
    cmd = [sys.executable, "-m", "dsvc.compiler.cli.cmd_train", "--standalone",
           f"--nproc-per-node={world}", os.path.join(build_dir, "train.py"),
           "--run-dir", run_dir]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.resume:
        cmd.append("--resume")
    if args.fp32:
        cmd.append("--fp32")
    if args.program is not None:
        cmd += ["--program", args.program]
    if data_path is not None:
        cmd += ["--data", data_path]
    if args.init_hf is not None:
        cmd += ["--init-hf", os.path.abspath(args.init_hf)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # world-size processes share the cores
    how = "compiled" if compiled is not None else "cached"
    print(f"dsvc train: {world} process{'es' if world != 1 else ''}, build {build_dir} ({how}), "
          f"run {run_dir}", file=sys.stderr)
    proc = subprocess.run(cmd, check=False, env=env)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if proc.returncode == 0 and os.path.exists(metrics):
        from dsvc.compiler.plots import draw_loss

        try:
            out = draw_loss(metrics, os.path.join(run_dir, "loss.png"), title=spec.model.name)
            print(f"dsvc train: loss curve in {out}", file=sys.stderr)
        except ValueError as err:
            print(f"dsvc train: no loss curve ({err})", file=sys.stderr)
    elif proc.returncode != 0:
        print(f"dsvc train: training failed (exit code {proc.returncode})", file=sys.stderr)
    return proc.returncode if proc.returncode > 0 else 1 if proc.returncode else 0


def launch_torchrun(argv: list[str]) -> int:
    """`torch.distributed.run` with `argv`; a failed worker gives its exit code, not a traceback.

    The workers print their own errors (one line for a user error, the traceback for a
    bug); torchrun's report of the same failure would only bury them."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    if not os.environ.get("DSVC_DEBUG"):
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        main(argv)
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        first = min(err.failures.values(), key=lambda f: f.timestamp)
        return first.exitcode if first.exitcode > 0 else max(max(codes), 1)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(launch_torchrun(sys.argv[1:]))
