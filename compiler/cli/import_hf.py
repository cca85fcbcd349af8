"""`dsvc import-hf CONFIG.json [-o OUT.dsv] [--name NAME]`: a Hugging Face config -> a .dsv spec.

Prints the spec (a formatted, checked model block) or writes it atomically to
OUT.dsv; notes on settings dsvc does not model go to stderr. See dsl/import_hf.py.
"""

from __future__ import annotations

import os
import sys


def add_arguments(p) -> None:
    p.add_argument("config", metavar="CONFIG.json", help="a Hugging Face config.json")
    p.add_argument("-o", "--output", metavar="OUT.dsv",
                   help="write the spec here (replacing the file atomically) instead of stdout")
    p.add_argument("--name", help="the model's name (default: from the config)")


def run(args) -> int:
    from dsvc.compiler.cli import UsageError, write_output
    from dsvc.dsl.files import read_text
    from dsvc.dsl.import_hf import import_config

    out_path = args.output
    if out_path is not None:
        if not out_path.endswith(".dsv"):
            raise UsageError(f"-o {out_path}: the output is a spec and must end in .dsv")
        if os.path.isdir(out_path):
            raise UsageError(f"-o {out_path}: is a directory")
        parent = os.path.dirname(out_path) or "."
        if not os.path.isdir(parent):
            raise UsageError(f"-o {out_path}: directory '{parent}' does not exist")
    text = read_text(args.config)
    spec_text, notes = import_config(text, args.config, args.name)
    for note in notes:
        print(f"dsvc import-hf: note: {note}", file=sys.stderr)
    if out_path is None:
        sys.stdout.write(spec_text)
    else:
        existed = os.path.exists(out_path)
        write_output(out_path, spec_text)
        print(f"{'replaced' if existed else 'wrote'} {out_path}", file=sys.stderr)
    return 0
