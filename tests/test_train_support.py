"""Helpers shared by the training tests (tests/test_train_*.py); no tests of its own.

Builds are compiled in-process (`compile_spec`); a world-size-1 build is trained
in-process through `runtime.loop.main` (`train_here`), larger ones under
torchrun semantics in a subprocess (`torchrun`, through `dsvc train`'s own
launcher). Every process runs one intra-op thread, so losses are reproducible
to the bit on a given machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPECS = ROOT / "tests" / "train_specs"
EXAMPLES = ROOT / "examples"


def compile_spec(spec_path, out_dir) -> pathlib.Path:
    """`dsvc compile spec_path -o out_dir`, in this process."""
    from dsvc import dsl
    from dsvc.compiler.codegen.build import build

    build(dsl.load(str(spec_path)), str(out_dir))
    return pathlib.Path(out_dir)


def losses(run_dir) -> dict[int, float]:
    """step -> loss from RUN_DIR/metrics.jsonl."""
    out = {}
    with open(pathlib.Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["loss"]
    return out


def child_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(build_dir, nproc: int, *args: str, timeout: float = 240.0, cwd=None):
    """Launch build_dir/train.py on `nproc` processes; the CompletedProcess, output captured."""
    cmd = [
        sys.executable,
        "-m",
        "dsvc.compiler.cli.cmd_train",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(pathlib.Path(build_dir) / "train.py"),
        *args,
    ]
    return subprocess.run(
        cmd,
        check=False,
        env=child_env(),
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_here(build_dir, *args: str) -> int:
    """`python build_dir/train.py args` of a world-size-1 build, in this process: its exit code."""
    import torch

    from dsvc.runtime.loop import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(str(build_dir), list(args))
    finally:
        torch.set_num_threads(threads)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line]


def snapshot(root) -> dict[str, bytes]:
    """Every file under `root` with its bytes: to assert a failed run changed nothing."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out
