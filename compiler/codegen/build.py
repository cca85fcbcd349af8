"""`dsvc compile`: the whole pass pipeline, then every file of a build directory.

A build directory is self-contained: plan.json (the runtime's only input
besides weights), train.py (generated from a template), the generated FP8
kernel module, a copy of dsvc's runtime as `dsvc_runtime/` (a
name that collides with no other package), report.md, schedule.png and a
README. All files are rendered in memory first, so a failed compile changes
nothing on disk; `write_tree` (build_tree.py) then replaces exactly the files
the previous compile wrote (the `.dsvc-build` manifest), leaving a user's own
files in the directory alone. Same spec, same bytes: everything is sorted and
no clock or absolute path reaches a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import keyword
import os
import pathlib
import tempfile

from dsvc import runtime as _runtime_pkg
from dsvc.compiler.codegen.build_tree import BUILD_MARKER, check_output_dir, digest, write_tree

BUILD_RUNTIME = "dsvc_runtime"  # the runtime's package name inside a build directory
RUNTIME_DIR = pathlib.Path(_runtime_pkg.__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class BuildResult:
    out_dir: str
    files: tuple[str, ...]
    summary: str
    kept: tuple[str, ...] = ()  # entries in out_dir dsvc did not write, left alone
    edited: tuple[str, ...] = ()  # files of the previous build edited since, replaced


def _spec_file(spec) -> str:
    """The spec's path as recorded in generated files: relative, never absolute."""
    return os.path.basename(spec.file)


def _gemm_shapes(graph):
    from dsvc.compiler.codegen.kernels import GemmShape

    seen = {}
    for op in graph.ops():
        fp8 = op.attr("fp8")
        if not fp8 or op.attr("in_features") is None:
            continue
        role, n, k = op.attr("role") or op.kind, op.attr("out_features"), op.attr("in_features")
        seen.setdefault((role, n, k), GemmShape(role, n, k))
    return tuple(seen[key] for key in sorted(seen))


def _kernel_config(spec, graph):
    from dsvc.compiler.codegen.kernels import KernelConfig

    lin = spec.precision.linear
    return KernelConfig(
        act_tile=lin.act_tile[1], weight_block=tuple(lin.weight_block),
        promote_every=lin.promote_every, scale_format=lin.scales,
        out_dtype="fp32" if spec.precision.default == "fp32" else "bf16",
        gemms=_gemm_shapes(graph), title=f"model {spec.model.name}",
        spec_file=_spec_file(spec), span=_line_span(spec, "precision"),
        passes=tuple(graph.passes),
    )


def _line_span(spec, path: str):
    """First and last line of block `path` in its file: the block's own span and every
    field span recorded under it (the parser records a block by its header line)."""
    span = spec.span(path)
    if span is None or span.line <= 0:
        return None
    last = max(span.end_line, span.line)
    for key, sub in spec.spans.items():
        if key.startswith(path + ".") and sub.file == span.file:
            last = max(last, sub.line, sub.end_line)
    return (span.line, last)


def _check_names(spec) -> None:
    """Refuse, before anything is rendered, a name that would not be a plain identifier.

    The parser already rejects such names; this is the compiler's own guard, because
    names are the only user text that reaches generated code outside a string literal
    or an escaped comment."""
    from dsvc.dsl.diagnostics import Diagnostic, SpecError

    m = spec.model
    names = [("model", m.name)]
    names += [(f"model.attention.{a}", a) for a in sorted(m.attentions)]
    names += [(f"model.ffn.{f}", f) for f in sorted(m.ffns)]
    bad = [Diagnostic("error", f"{name!r} cannot become a Python identifier in generated code",
                      spec.span(path), "use letters, digits and underscores, not a keyword")
           for path, name in names
           if not (name.isascii() and name.isidentifier() and not keyword.iskeyword(name))]
    if bad:
        raise SpecError(bad)


def _check_python(files: dict[str, bytes]) -> None:
    """Every generated Python file must parse: a failure here is a compiler bug."""
    import ast

    for rel, data in files.items():
        if rel.endswith(".py") and not rel.startswith(f"{BUILD_RUNTIME}/"):
            try:
                ast.parse(data.decode("utf-8"), filename=rel)
            except SyntaxError as err:
                raise AssertionError(f"dsvc generated invalid Python in {rel}: {err}") from None


def _schedule_section(spec, plan: dict) -> tuple[dict, object]:
    """The plan's schedule section with the generated action lists, and the Schedule."""
    from dsvc.compiler.schedules import SCHEDULE_FORMAT_VERSION, build_schedule

    p = spec.parallel
    # build_schedule takes PP as the published formulas do: stages of one model copy
    sched = build_schedule(p.schedule, p.stages_per_copy, spec.micro_batches)
    section = dict(plan["schedule"])
    section["version"] = SCHEDULE_FORMAT_VERSION
    section["actions"] = [[str(a) for a in acts] for acts in sched.actions]
    return section, sched


def render_files(spec, expert_load: str | None = None) -> dict[str, bytes]:
    """Every file of the build directory, in memory: relative path -> bytes."""
    from dsvc.compiler.codegen.kernels import render_kernels
    from dsvc.compiler.codegen.render import render_generated
    from dsvc.compiler.pipeline import run_until
    from dsvc.compiler.plan import emit_plan

    if spec.train is None or spec.parallel is None or spec.cluster is None:
        from dsvc.dsl.diagnostics import Diagnostic, SpecError

        missing = [b for b in ("cluster", "parallel", "train") if getattr(spec, b) is None]
        raise SpecError([Diagnostic("error", f"cannot compile a trainer: no {', '.join(missing)} "
                                    "block", spec.span("model"),
                                    "a trainer needs a cluster, a parallel plan and a train block")])
    _check_names(spec)
    graph = run_until(spec, "insert_comm", expert_load=expert_load)
    plan = emit_plan(graph)
    plan["schedule"], sched = _schedule_section(spec, plan)
    plan["source"]["spec"] = _spec_file(spec)
    passes = tuple(graph.passes) + ("schedule", "codegen")
    plan["source"]["passes"] = list(passes)
    files: dict[str, bytes] = {}
    files["plan.json"] = (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode()
    files["kernels/fp8_kernels.py"] = render_kernels(_kernel_config(spec, graph)).encode()
    files["kernels/__init__.py"] = b""
    common = {"spec_file": _spec_file(spec), "passes": passes, "tile_config": None}
    p, t = spec.parallel, spec.train
    files["train.py"] = render_generated(
        "train.py.jinja", span=_line_span(spec, "train"), model_name=spec.model.name,
        world=spec.cluster.world_size, pipeline=p.pipeline, data=p.data,
        checkpoint_every=t.checkpoint.every, **common).encode()
    from dsvc import __version__
    from dsvc.compiler.codegen.render import comment_safe

    files["README.md"] = _render_plain("build_readme.md.jinja", model_name=spec.model.name,
                                       version=__version__,
                                       spec_file=comment_safe(_spec_file(spec)),
                                       spec_hash=spec.content_hash[:16],
                                       world=spec.cluster.world_size, pipeline=p.pipeline,
                                       data=p.data, expert=p.expert, schedule=p.schedule,
                                       micro_batches=spec.micro_batches).encode()
    files["report.md"] = _report(spec).encode()
    files["schedule.png"] = _schedule_png(sched)
    for path in sorted(RUNTIME_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(RUNTIME_DIR).as_posix()
        files[f"{BUILD_RUNTIME}/{rel}"] = path.read_bytes()
    _check_python(files)
    manifest = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    marker = {"spec_hash": spec.content_hash, "toolchain": toolchain_hash(), "files": manifest}
    files[BUILD_MARKER] = (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode()
    return files


def toolchain_hash() -> str:
    """What else a build depends on: dsvc's version, its compiler, templates and runtime.

    A cached build of an unchanged spec is stale once any of them changes."""
    from dsvc import __version__

    compiler_dir = pathlib.Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(__version__.encode() + b"\0")
    for root in (compiler_dir, RUNTIME_DIR):
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".jinja") and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root.parent).as_posix().encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _render_plain(name: str, **context) -> str:
    from dsvc.compiler.codegen.render import render_template

    return render_template(name, **context)


def _report(spec) -> str:
    from dsvc.compiler.report import build_report, render_text

    text = render_text(build_report(spec))
    return f"# Report: {spec.model.name}\n\n```\n{text.rstrip()}\n```\n"


def _schedule_png(sched) -> bytes:
    from dsvc.compiler.schedules import draw_timeline, simulate_uniform

    result = simulate_uniform(sched, 1.0, 2.0, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "schedule.png")
        draw_timeline(result, path)
        return pathlib.Path(path).read_bytes()


def build(spec, out_dir: str, expert_load: str | None = None) -> BuildResult:
    check_output_dir(out_dir)
    files = render_files(spec, expert_load)
    kept, edited = write_tree(files, out_dir)
    p = spec.parallel
    world = spec.cluster.world_size
    summary = (f"{len(files)} files; {world} process{'es' if world != 1 else ''} "
               f"(pipeline {p.pipeline} x data {p.data}, experts over {p.expert}); launch: "
               f"torchrun --nproc-per-node {world} {os.path.join(out_dir, 'train.py')}")
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
