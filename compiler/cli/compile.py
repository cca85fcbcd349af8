"""`dsvc compile SPEC -o DIR`: a self-contained, runnable build directory.

The directory holds plan.json, report.md, schedule.png, kernels/, a copy of
the runtime as dsvc_runtime/, train.py and a README saying how to launch it. Nothing is
written when the spec has errors; the directory is replaced atomically.
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
    return 0
