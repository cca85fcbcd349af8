"""Pass `emit_build`: every file of a build directory, rendered from the graph.

A build directory is self-contained: plan.json (the runtime's only input besides
weights, `graph.plan`), train.py (from a template), the FP8 kernel module
specialised to the spec's GEMM shapes and tiles, a copy of dsvc's runtime as
`dsvc_runtime/` (a name that collides with no other package), report.md (the
report of this very graph), schedule.png (the simulated step's timeline) and a
README. The files are rendered in memory (`graph.files`, relative path -> bytes);
`build.py` writes them. Same spec, same bytes: everything is sorted and no clock
or absolute path reaches a file.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import os
import pathlib
import tempfile

from dsvc import __version__
from dsvc import runtime as runtime_package
from dsvc.compiler.codegen.build_tree import BUILD_MARKER
from dsvc.compiler.codegen.kernels import FUSED_KINDS, GemmShape, KernelConfig, render_kernels
from dsvc.compiler.codegen.launch_lines import launch_for
from dsvc.compiler.codegen.render import comment_safe, render_generated, render_template
from dsvc.compiler.codegen.stage_program import render_program
from dsvc.compiler.report import render_text, report_of
from dsvc.compiler.schedules import draw_timeline
from dsvc.dsl.diagnostics import Diagnostic, SpecError
from dsvc.runtime.plan import dump_plan

BUILD_RUNTIME = "dsvc_runtime"  # the runtime's package name inside a build directory
RUNTIME_DIR = pathlib.Path(runtime_package.__file__).resolve().parent


def emit_build(graph):
    """A copy of `graph` with `files` set (after emit_plan)."""
    assert graph.plan is not None, "emit_build runs after emit_plan"
    spec = graph.spec
    _check_names(spec)
    passes = (*graph.passes, "emit_build")
    files: dict[str, bytes] = {}
    files["plan.json"] = (json.dumps(dump_plan(graph.plan), indent=1, sort_keys=True) + "\n").encode()
    files["kernels/fp8_kernels.py"] = render_kernels(_kernel_config(spec, graph, passes)).encode()
    files["kernels/__init__.py"] = b""
    files["program.py"] = render_program(graph, spec_file=_spec_file(spec),
                                         span=_line_span(spec, "model"), passes=passes).encode()
    p, t = spec.parallel, spec.train
    files["train.py"] = render_generated(
        "train.py.jinja", span=_line_span(spec, "train"), model_name=spec.model.name,
        world=spec.cluster.world_size, pipeline=p.pipeline, data=p.data,
        checkpoint_every=t.checkpoint.every, spec_file=_spec_file(spec), passes=passes,
        tile_config=None).encode()
    files["README.md"] = render_template(
        "build_readme.md.jinja", model_name=spec.model.name, version=__version__,
        spec_file=comment_safe(_spec_file(spec)), spec_hash=spec.content_hash[:16],
        world=spec.cluster.world_size, pipeline=p.pipeline, data=p.data, expert=p.expert,
        schedule=p.schedule, micro_batches=spec.micro_batches,
        launch=launch_for(spec.cluster)).encode()
    report = render_text(report_of(spec, graph))
    files["report.md"] = f"# Report: {spec.model.name}\n\n```\n{report.rstrip()}\n```\n".encode()
    files["schedule.png"] = _schedule_png(graph)
    for path in sorted(RUNTIME_DIR.rglob("*.py")):
        if "__pycache__" not in path.parts:
            files[f"{BUILD_RUNTIME}/{path.relative_to(RUNTIME_DIR).as_posix()}"] = path.read_bytes()
    _check_python(files)
    manifest = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    marker = {"spec_hash": spec.content_hash, "toolchain": toolchain_hash(), "files": manifest}
    files[BUILD_MARKER] = (json.dumps(marker, indent=1, sort_keys=True) + "\n").encode()
    out = graph.derive("emit_build")
    out.files = dict(sorted(files.items()))
    return out


def _spec_file(spec) -> str:
    """The spec's path as recorded in generated files: relative, never absolute."""
    return os.path.basename(spec.file)


def _gemm_shapes(graph):
    seen = {}
    for op in graph.ops():
        fp8 = op.attr("fp8")
        if not fp8 or op.attr("in_features") is None:
            continue
        role, n, k = op.attr("role") or op.kind, op.attr("out_features"), op.attr("in_features")
        seen.setdefault((role, n, k), GemmShape(role, n, k))
    return tuple(seen[key] for key in sorted(seen))


def _kernel_config(spec, graph, passes) -> KernelConfig:
    lin = spec.precision.linear
    return KernelConfig(
        act_tile=lin.act_tile[1], weight_block=tuple(lin.weight_block),
        promote_every=lin.promote_every, scale_format=lin.scales,
        out_dtype="fp32" if spec.precision.default == "fp32" else "bf16",
        gemms=_gemm_shapes(graph), title=f"model {spec.model.name}",
        fused=tuple(sorted({g.kind for g in graph.fusion or ()} & set(FUSED_KINDS))),
        spec_file=_spec_file(spec), span=_line_span(spec, "precision"), passes=passes,
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


def _schedule_png(graph) -> bytes:
    """The simulated step's timeline (what `dsvc inspect --schedule --format png` draws)."""
    sim = graph.simulation
    title = (f"{graph.spec.model.name}: {sim.kind}, {sim.sim.schedule.num_devices} ranks, "
             f"{sim.num_microbatches} micro-batches; simulated step {sim.step_time_s:.4g} s")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "schedule.png")
        draw_timeline(sim.sim, path, title=title)
        return pathlib.Path(path).read_bytes()


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


