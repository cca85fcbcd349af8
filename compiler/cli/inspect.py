"""`dsvc inspect SPEC`: the lowered graph after any pass, as text, JSON, DOT, SVG or PNG.

    dsvc inspect examples/deepseek_v3.dsv --format json --stage 0
    dsvc inspect examples/tiny.dsv --after assign_precision --layer 1
    dsvc inspect examples/tiny.dsv --format svg -o graph.svg     # needs graphviz's `dot`

`--stage N` keeps the ops of per-copy stage N, `--rank R` those of the stages
pipeline rank R holds (two under DualPipe/DualPipeV), `--layer L` those of
decoder layer L (MTP module k is layer num_layers + k). `--schedule` shows the
simulated pipeline schedule instead (see `_run_schedule`). Module level
imports nothing heavy.
"""

from __future__ import annotations

import sys

FORMATS = ("text", "json", "dot", "svg", "png", "chrome")
GRAPHVIZ_HINT = ("install graphviz (Debian/Ubuntu: `apt-get install graphviz`, macOS: "
                 "`brew install graphviz`, conda: `conda install -c conda-forge graphviz`), "
                 "or write `--format dot` and render it elsewhere")


def add_arguments(p) -> None:
    p.add_argument("spec", metavar="SPEC", help=".dsv spec")
    p.add_argument("--format", default="text", choices=FORMATS,
                   help="output format (svg/png through graphviz; chrome only with --schedule)")
    p.add_argument("--stage", type=int, metavar="N", help="only per-copy pipeline stage N")
    p.add_argument("--rank", type=int, metavar="R", help="only the stages pipeline rank R holds")
    p.add_argument("--layer", type=int, metavar="L", help="only decoder layer L")
    p.add_argument("--after", metavar="PASS", default=None,
                   help="show the IR after this pass (default: the last graph pass)")
    p.add_argument("--expert-load", metavar="F", help="expert load histogram (JSON; docs/ir.md)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--schedule", action="store_true", help="the simulated pipeline schedule")


def run(args) -> int:
    if args.schedule:
        return _run_schedule(args)
    from dsvc.compiler.cli import UsageError, check_expert_load_flag

    if args.format == "chrome":
        raise UsageError("--format chrome is a schedule trace: use it with --schedule")
    from dsvc import dsl
    from dsvc.compiler.driver import GRAPH_PASSES, run_until

    after = args.after or GRAPH_PASSES[-1]
    if after not in GRAPH_PASSES:
        raise UsageError(f"--after {after}: no such graph pass; one of {', '.join(GRAPH_PASSES)}")
    spec, warnings = dsl.load_with_warnings(args.spec)
    for w in warnings:
        print(w.render(), file=sys.stderr)
    check_expert_load_flag(args.expert_load)
    graph = run_until(spec, after, expert_load=args.expert_load)
    keep = _filters(args, graph, spec)
    data = _render(args.format, graph, keep)
    _write(args, data)
    return 0


def _filters(args, graph, spec):
    from dsvc.compiler.cli import UsageError
    from dsvc.compiler.printer import select

    if args.stage is None and args.rank is None and args.layer is None:
        return None
    pipe = graph.pipeline
    if (args.stage is not None or args.rank is not None) and pipe is None:
        raise UsageError("--stage and --rank need the partition: use --after partition_stages or later")
    if args.stage is not None and not 0 <= args.stage < pipe.parts:
        raise UsageError(f"--stage {args.stage}: the plan has {pipe.parts} stage(s) per model copy "
                         f"(0..{pipe.parts - 1})")
    if args.rank is not None and not 0 <= args.rank < pipe.ranks:
        raise UsageError(f"--rank {args.rank}: the pipeline has {pipe.ranks} rank(s) (0..{pipe.ranks - 1})")
    last = spec.model.num_layers + spec.model.mtp.depth - 1
    if args.layer is not None and not 0 <= args.layer <= last:
        mtp = f" (MTP modules from layer {spec.model.num_layers})" if spec.model.mtp.depth else ""
        raise UsageError(f"--layer {args.layer}: layers are 0..{last}{mtp}")
    return select(graph, stage=args.stage, rank=args.rank, layer=args.layer)


def _render(fmt: str, graph, keep) -> str | bytes:
    from dsvc.compiler import printer

    if fmt == "text":
        return printer.format_text(graph, keep)
    if fmt == "json":
        from dsvc.compiler.printer_json import format_json

        return format_json(graph, keep)
    dot = printer.format_dot(graph, keep)
    if fmt == "dot":
        return dot
    return render_dot(dot, fmt)


def render_dot(dot: str, fmt: str) -> str | bytes:
    """DOT -> SVG (text) or PNG (bytes) through graphviz's `dot` program."""
    import shutil
    import subprocess

    from dsvc.compiler.cli import UsageError

    exe = shutil.which("dot")
    if exe is None:
        raise UsageError(f"--format {fmt} needs graphviz's `dot` program, which is not installed: "
                         + GRAPHVIZ_HINT)
    proc = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True, timeout=600,
                          check=False)
    if proc.returncode != 0:
        raise UsageError(f"graphviz `dot` failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode() if fmt == "svg" else proc.stdout


def _write(args, data: str | bytes) -> None:
    from dsvc.compiler.cli import UsageError, write_output

    if args.output:
        write_output(args.output, data)
        print(f"{args.output}: {args.format}", file=sys.stderr)
        return
    if isinstance(data, bytes):
        if sys.stdout.isatty():
            raise UsageError("PNG is binary: give -o FILE (or redirect stdout)")
        sys.stdout.buffer.write(data)
        return
    sys.stdout.write(data)


# ----------------------------------------------------------------------------- the --schedule hook
# The schedule pass owns this view: it lives in `compiler/cli/inspect_schedule.py`
# (`run(args) -> int`, using args.spec, args.format, args.output, args.expert_load).
# Until that module exists, --schedule says so.


def _run_schedule(args) -> int:
    import importlib

    from dsvc.compiler.cli import UsageError

    try:
        module = importlib.import_module("dsvc.compiler.cli.inspect_schedule")
    except ModuleNotFoundError as exc:
        if exc.name != "dsvc.compiler.cli.inspect_schedule":
            raise
        raise UsageError("--schedule is not available in this build yet (the schedule pass "
                         "provides compiler/cli/inspect_schedule.py)") from None
    return module.run(args)
