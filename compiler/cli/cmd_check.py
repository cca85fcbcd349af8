"""`dsvc check FILE...`: parse and validate specs, printing every problem at once.

Imports neither torch nor sympy: checking a spec takes a fraction of a second.
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".dsv spec files")
    p.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    p.add_argument("--werror", action="store_true", help="treat warnings as errors")


def run(args) -> int:
    from dsvc import dsl


    failed = 0
    for path in args.files:
        try:
            spec, warnings = dsl.check_file(path)
        except dsl.SpecError as err:
            failed += 1
            print(err.render(), file=sys.stderr)
            n = len(err.errors)
            print(f"{path}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
            continue
        for w in warnings:
            print(w.render(), file=sys.stderr)
        if warnings and args.werror:
            failed += 1
            print(f"{path}: {len(warnings)} warning(s) treated as errors", file=sys.stderr)
            continue
        if not args.quiet:
            n = len(warnings)
            extra = f", {n} warning{'s' if n != 1 else ''}" if warnings else ""
            print(f"{path}: ok ({_what(spec)}{extra})")
    return 1 if failed else 0


def _what(checked) -> str:
    """What a checked file holds, for its `ok` line."""
    model = getattr(checked, "model", None)
    if model is not None:
        return f"model {model.name}: {model.num_layers} layers"
    c = checked.cluster
    parts = [f"cluster {c.name}: {c.nodes} node{'s' if c.nodes != 1 else ''} x "
             f"{c.gpus_per_node} GPU{'s' if c.gpus_per_node != 1 else ''}"] if c else []
    if "precision" in checked.blocks:
        parts.append("a precision block")
    return "; ".join(parts) + ", no model: a file to include"
