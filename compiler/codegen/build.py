"""`dsvc compile`: one run of the pass list, then the build directory written to disk.

The files come from the `emit_build` pass (`emit_build.py` says what a build holds);
here they are written into a sibling temporary directory that replaces the target
in one rename, so a failed compile changes nothing on disk, and a cached build of
an unchanged spec by an unchanged dsvc is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

from dsvc.compiler.codegen.emit_build import BUILD_MARKER, toolchain_hash
from dsvc.compiler.codegen.launch import launch_for
from dsvc.compiler.driver import run_until


@dataclasses.dataclass(frozen=True)
class BuildResult:
    out_dir: str
    files: tuple[str, ...]
    summary: str


def render_files(spec, expert_load: str | None = None) -> dict[str, bytes]:
    """Every file of the build directory, in memory: relative path -> bytes."""
    return run_until(spec, "emit_build", expert_load=expert_load).files


def write_tree(files: dict[str, bytes], out_dir: str) -> None:
    """Write `files` as `out_dir`, replacing it in one rename; nothing changes on failure."""
    out = pathlib.Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        from dsvc.compiler.cli import UsageError

        raise UsageError(f"{out_dir} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / BUILD_MARKER).exists():
        from dsvc.compiler.cli import UsageError

        raise UsageError(f"{out_dir} is a non-empty directory that is not a dsvc build; "
                         "refusing to replace it (choose another -o or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, data in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(spec, out_dir: str, expert_load: str | None = None) -> BuildResult:
    files = render_files(spec, expert_load)
    write_tree(files, out_dir)
    p = spec.parallel
    world = spec.cluster.world_size
    launch = launch_for(spec.cluster, os.path.join(out_dir, "train.py"))
    summary = (f"{len(files)} files; {world} process{'es' if world != 1 else ''} "
               f"(pipeline {p.pipeline} x data {p.data}, experts over {p.expert}); launch "
               f"{launch.summary()}")
    return BuildResult(out_dir, tuple(sorted(files)), summary)


def build_cached(spec, out_dir: str) -> BuildResult | None:
    """Compile into `out_dir` unless it already holds an intact build of this exact spec
    by this exact dsvc; returns None when the cached build was kept."""
    if is_current_build(out_dir, spec.content_hash):
        return None
    return build(spec, out_dir)


def is_current_build(out_dir: str, spec_hash: str) -> bool:
    """True when `out_dir` is a build of `spec_hash` by this toolchain, every file intact."""
    root = pathlib.Path(out_dir)
    try:
        marker = json.loads((root / BUILD_MARKER).read_text())
        if marker.get("spec_hash") != spec_hash or marker.get("toolchain") != toolchain_hash():
            return False
        for rel, digest in marker["files"].items():
            if hashlib.sha256((root / rel).read_bytes()).hexdigest() != digest:
                return False  # edited or damaged since: rebuild
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True
