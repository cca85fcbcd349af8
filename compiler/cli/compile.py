"""`dsvc compile SPEC -o DIR`: a self-contained, runnable build directory.

The directory holds plan.json, report.md, schedule.png, kernels/, a copy of
the runtime as dsvc_runtime/, train.py and a README saying how to launch it. Nothing is
written when the spec has errors; a recompile replaces exactly the files dsvc wrote
before (listed in .dsvc-build) and leaves a user's own files there alone, with a note.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("spec", metavar="SPEC", help=".dsv spec")
    p.add_argument("-o", "--output", metavar="DIR", required=True, help="build directory")
    p.add_argument("--expert-load", metavar="F", help="expert load histogram (JSON)")


def run(args) -> int:
    import sys

    from dsvc import dsl
    from dsvc.compiler.cli import check_expert_load_flag
    from dsvc.compiler.codegen.build import build

    spec, warnings = dsl.load_with_warnings(args.spec)
    for w in warnings:
        print(w.render(), file=sys.stderr)
    check_expert_load_flag(args.expert_load)
    result = build(spec, args.output, expert_load=args.expert_load)
    print(f"{args.output}: {result.summary}")
    report_kept(result, "dsvc compile")
    return 0


def report_kept(result, who: str) -> None:
    """Notes on what a recompile found in the build directory: files a user added (left
    alone) and generated files edited since the last compile (replaced)."""
    import sys

    if result.kept:
        shown = ", ".join(result.kept[:8]) + (f", ... ({len(result.kept)} in all)"
                                              if len(result.kept) > 8 else "")
        print(f"{who}: note: left alone in {result.out_dir}, not written by dsvc: {shown}",
              file=sys.stderr)
    if result.edited:
        print(f"{who}: note: replaced {', '.join(result.edited)} in {result.out_dir}, edited "
              "since the last compile (generated files are rewritten on every compile)",
              file=sys.stderr)
