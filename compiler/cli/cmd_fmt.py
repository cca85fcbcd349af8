"""`dsvc fmt [--check] FILE...`: rewrite specs in the canonical layout (dsl/formatter.py).

Without --check, a file that would change is replaced atomically; files already
canonical are not touched. With --check nothing is written: the files that
would change are named and the exit status is 1.
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".dsv spec files")
    p.add_argument("--check", action="store_true",
                   help="write nothing; name the files that would change and exit 1 if any would")


def run(args) -> int:
    from dsvc.dsl.diagnostics import SpecError
    from dsvc.dsl.files import read_text, write_atomic
    from dsvc.dsl.formatter import format_source

    failed = would_change = 0
    for path in args.files:
        try:
            text = read_text(path)
            new = format_source(text, path)
            if new == text:
                continue
            if args.check:
                would_change += 1
                print(f"would reformat {path}")
            else:
                write_atomic(path, new)
                print(f"reformatted {path}")
        except SpecError as err:
            failed += 1
            print(err.render(), file=sys.stderr)
    if args.check and not failed:
        n = len(args.files)
        print(f"{would_change} of {n} file{'s' if n != 1 else ''} would be reformatted"
              if would_change else f"{n} file{'s' if n != 1 else ''} already formatted",
              file=sys.stderr)
    return 1 if failed or would_change else 0
