"""`dsvc report SPEC [SPEC2] [--json] [--symbolic] [--expert-load F] [--program P]`: what a spec costs.

One spec: parameters, FLOPs, KV cache, memory per GPU, communication, network,
decode speed limit and step time. Two specs: side by side with deltas (B - A).
Imports neither torch, pydantic nor, without --symbolic, sympy.
"""

from __future__ import annotations

import sys

from dsvc.compiler.cli import add_set_argument


def add_arguments(p) -> None:
    p.add_argument("spec", metavar="SPEC", help=".dsv spec")
    p.add_argument("spec2", metavar="SPEC2", nargs="?", help="a second spec to compare with")
    p.add_argument("--json", action="store_true", help="machine-readable output (docs/report.md)")
    p.add_argument("--symbolic", action="store_true",
                   help="show each figure's formula in the spec's symbols beside its value")
    p.add_argument("--expert-load", metavar="F",
                   help="expert load histogram (JSON); overrides parallel.expert_load")
    from dsvc.runtime.plan import PROGRAM_CHOICES

    p.add_argument("--program", choices=PROGRAM_CHOICES, default=PROGRAM_CHOICES[0],
                   help="what runs the decoder blocks, as `dsvc train --program` chooses: the "
                   "generated stage program (the default, where it covers them) or the eager "
                   "modules")
    add_set_argument(p)
    p.add_argument("--set-b", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of SPEC2 only (after --set), e.g. to compare a spec "
                        "with itself: report v3.dsv v3.dsv --set-b parallel.overlap=none")
    p.add_argument("--program-b", choices=PROGRAM_CHOICES,
                   help="what runs SPEC2's decoder blocks (default: --program's), e.g. what the "
                   "generated program buys: report v3.dsv v3.dsv --program-b eager")


def _build(path: str, args, overrides, program: str):
    from dsvc.compiler.cli import check_expert_load_flag, load_spec
    from dsvc.compiler.driver import build_report

    spec = load_spec(path, overrides)
    check_expert_load_flag(args.expert_load)
    return build_report(spec, symbolic=args.symbolic, expert_load=args.expert_load,
                        program=program)


def run(args) -> int:

    from dsvc.compiler.cli import UsageError
    from dsvc.compiler.report import compare_json, dumps, render_compare, render_text, report_json

    if (args.set_b or args.program_b) and args.spec2 is None:
        flag = "--set-b" if args.set_b else "--program-b"
        raise UsageError(f"{flag} applies to SPEC2: give a second spec")
    a = _build(args.spec, args, args.set, args.program)
    if args.spec2 is None:
        sys.stdout.write(dumps(report_json(a)) if args.json else render_text(a))
        return 0
    b = _build(args.spec2, args, args.set + args.set_b, args.program_b or args.program)
    sys.stdout.write(dumps(compare_json(a, b)) if args.json else render_compare(a, b))
    return 0
