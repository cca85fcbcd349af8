"""`dsvc import-hf CONFIG.json [-o OUT.dsv] [--name NAME]`: a Hugging Face config -> a .dsv spec.

Prints the spec (a formatted, checked model block) or writes it atomically to
OUT.dsv; notes on settings dsvc does not model go to stderr. See compiler/import_hf.py.
The config is read under runtime/inputs.py's policy (a regular file, its size checked
before reading, JSON depth and number limits); a file it refuses is one line, exit 1.
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
    from dsvc.compiler.import_hf import import_config
    from dsvc.runtime.inputs import JSON_BYTES, InputError, read_text

    out_path = args.output
    if out_path is not None:
        if not out_path.endswith(".dsv"):
            raise UsageError(f"-o {out_path}: the output is a spec and must end in .dsv")
        if os.path.isdir(out_path):
            raise UsageError(f"-o {out_path}: is a directory")
        parent = os.path.dirname(out_path) or "."
        if not os.path.isdir(parent):
            raise UsageError(f"-o {out_path}: directory '{parent}' does not exist")
    try:
        text = read_text(args.config, JSON_BYTES)
    except InputError as err:
        print(f"dsvc import-hf: error: {err}", file=sys.stderr)
        return 1
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
