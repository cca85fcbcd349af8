"""`dsvc compile`: one run of the pass list, then the build directory written to disk.

The files come from the `emit_build` pass (`emit_build.py` says what a build holds),
rendered in memory, so a failed compile changes nothing on disk; `write_tree`
(build_tree.py) then replaces exactly the files the previous compile wrote (the
`.dsvc-build` manifest), leaving a user's own files in the directory alone. A cached
build of an unchanged spec by an unchanged dsvc is kept.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from dsvc.compiler.codegen.build_tree import BUILD_MARKER, check_output_dir, digest, write_tree
from dsvc.compiler.codegen.emit_build import toolchain_hash
from dsvc.compiler.codegen.launch import launch_for
from dsvc.compiler.driver import run_until


@dataclasses.dataclass(frozen=True)
class BuildResult:
    out_dir: str
    files: tuple[str, ...]
    summary: str
    kept: tuple[str, ...] = ()  # entries in out_dir dsvc did not write, left alone
    edited: tuple[str, ...] = ()  # files of the previous build edited since, replaced


def render_files(spec, expert_load: str | None = None) -> dict[str, bytes]:
    """Every file of the build directory, in memory: relative path -> bytes."""
    return run_until(spec, "emit_build", expert_load=expert_load).files


def build(spec, out_dir: str, expert_load: str | None = None) -> BuildResult:
    check_output_dir(out_dir)
    files = render_files(spec, expert_load)
    kept, edited = write_tree(files, out_dir)
    p = spec.parallel
    world = spec.cluster.world_size
    launch = launch_for(spec.cluster, os.path.join(out_dir, "train.py"))
    summary = (f"{len(files)} files; {world} process{'es' if world != 1 else ''} "
               f"(pipeline {p.pipeline} x data {p.data}, experts over {p.expert}); launch "
               f"{launch.summary()}")
    return BuildResult(out_dir, tuple(sorted(files)), summary, kept, edited)


def build_cached(spec, out_dir: str) -> BuildResult | None:
    """Compile into `out_dir` unless it already holds an intact build of this exact spec
    by this exact dsvc; returns None when the cached build was kept."""
    if is_current_build(out_dir, spec.content_hash):
        return None
    return build(spec, out_dir)


def is_current_build(out_dir: str, spec_hash: str) -> bool:
    """True when `out_dir` is a build of `spec_hash` by this toolchain, every file intact."""
    from dsvc.runtime.inputs import InputError, load_json

    root = pathlib.Path(out_dir)
    try:
        marker = load_json(root / BUILD_MARKER)
        if marker.get("spec_hash") != spec_hash or marker.get("toolchain") != toolchain_hash():
            return False
        # edited or damaged since: rebuild
        return all(digest(root / rel) == want for rel, want in marker["files"].items())
    except (InputError, KeyError, TypeError, AttributeError):
        return False
