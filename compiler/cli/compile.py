"""`dsvc compile SPEC -o DIR`: a self-contained, runnable build directory.

The directory holds plan.json, report.md, schedule.png, kernels/, a copy of
the runtime as dsvc_runtime/, train.py and a README saying how to launch it. Nothing is
written when the spec has errors; the directory is replaced atomically.
"""

from __future__ import annotations

from dsvc.compiler.cli import add_set_argument


def add_arguments(p) -> None:
    p.add_argument("spec", metavar="SPEC", help=".dsv spec")
    p.add_argument("-o", "--output", metavar="DIR", required=True, help="build directory")
    p.add_argument("--expert-load", metavar="F", help="expert load histogram (JSON)")
    add_set_argument(p)


def run(args) -> int:
    from dsvc.compiler.cli import check_expert_load_flag, load_spec
    from dsvc.compiler.codegen.build import build

    spec = load_spec(args.spec, args.set)
    check_expert_load_flag(args.expert_load)
    result = build(spec, args.output, expert_load=args.expert_load)
    print(f"{args.output}: {result.summary}")
    return 0
