"""`dsvc train SPEC [--steps N] [--run-dir DIR] [--resume]`: compile (cached) and launch.

The build is cached by the spec's content hash (sources and includes), so a
second run of the same spec compiles nothing. The trainer is launched with
torchrun semantics (`torch.distributed.run --standalone`) at the world size
the plan needs: gloo on CPU, NCCL when CUDA is present. Afterwards the loss
curve is drawn from RUN_DIR/metrics.jsonl into RUN_DIR/loss.png.
"""

from __future__ import annotations

import os


def add_arguments(p) -> None:
    p.add_argument("spec", metavar="SPEC", help=".dsv spec")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the spec's train.steps)")
    p.add_argument("--run-dir", metavar="DIR", help="metrics, checkpoints, loss.png "
                   "(default: runs/MODEL)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in the run directory")
    p.add_argument("--fp32", action="store_true",
                   help="run every linear in fp32 (numerics reference mode)")
    p.add_argument("--build-dir", metavar="DIR", help="where the compiled build is cached "
                   "(default: $DSVC_CACHE or ~/.cache/dsvc, by spec hash)")


def cache_root() -> str:
    return os.environ.get("DSVC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsvc")


def run(args) -> int:
    import subprocess
    import sys

    import dsl
    from compiler.cli import UsageError
    from compiler.codegen.build import build_cached

    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    spec, warnings = dsl.load_with_warnings(args.spec)
    for w in warnings:
        print(w.render(), file=sys.stderr)
    if spec.train is None or spec.parallel is None or spec.cluster is None:
        missing = [b for b in ("cluster", "parallel", "train") if getattr(spec, b) is None]
        raise UsageError(f"{args.spec} has no {', '.join(missing)} block: nothing to train")
    build_dir = args.build_dir or os.path.join(cache_root(), "builds",
                                               f"{spec.model.name}-{spec.content_hash[:16]}")
    build_cached(spec, build_dir)
    run_dir = os.path.abspath(args.run_dir or os.path.join("runs", spec.model.name))
    world = spec.cluster.world_size
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", os.path.join(build_dir, "train.py"),
           "--run-dir", run_dir]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.resume:
        cmd.append("--resume")
    if args.fp32:
        cmd.append("--fp32")
    if spec.train.data.kind == "tokens":
        path = spec.train.data.path
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(spec.file)), path)
        cmd += ["--data", path]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # world-size processes share the cores
    print(f"dsvc train: {world} processes, build {build_dir}, run {run_dir}", file=sys.stderr)
    proc = subprocess.run(cmd, env=env)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        from compiler.plots import draw_loss

        try:
            out = draw_loss(metrics, os.path.join(run_dir, "loss.png"), title=spec.model.name)
            print(f"dsvc train: loss curve in {out}", file=sys.stderr)
        except ValueError as err:
            print(f"dsvc train: no loss curve ({err})", file=sys.stderr)
    return proc.returncode if proc.returncode >= 0 else 1
