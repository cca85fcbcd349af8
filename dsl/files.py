"""Reading a spec file and writing one atomically, with diagnostics instead of tracebacks.

`read_source` is how every spec and every `include` is read: under the input policy
of `dsvc.runtime.inputs` (regular files only, refused by `stat` before opening, so a
FIFO cannot block and /dev/zero cannot fill memory; at most `SPEC_BYTES`). `dsvc fmt`
and `dsvc import-hf` write through `write_atomic`: a file is replaced only by a
complete new file (written beside it, then renamed over it), never left half-written.
"""

from __future__ import annotations

import os
import pathlib

from dsvc.dsl.diagnostics import ERROR, Diagnostic, Span, SpecError, did_you_mean
from dsvc.dsl.lexer import decode_source
from dsvc.runtime.inputs import SPEC_BYTES, InputError, read_bytes


def read_source(path: str, span: Span | None = None) -> str:
    """The UTF-8 text of spec file `path`; a `SpecError` at `span` (the `include` naming
    it) or at the file itself when it is missing, not a regular file, too large or not text."""
    where = span or Span(path, 0, 0)
    try:
        data = read_bytes(path, SPEC_BYTES)
    except InputError as err:
        if not os.path.lexists(path):
            diag = Diagnostic(ERROR, f"file not found: '{path}'", where, _near_files(path))
        elif os.path.isdir(path):
            diag = Diagnostic(ERROR, f"'{path}' is a directory, not a .dsv file", where,
                              "name a .dsv file")
        else:
            diag = Diagnostic(ERROR, f"cannot read '{path}': {err.reason}", where,
                              "a spec is a text file of at most "
                              f"{SPEC_BYTES // (1024 * 1024)} MiB (docs/limits.md)")
        raise SpecError([diag]) from None
    return decode_source(path, data)


def read_text(path: str) -> str:
    """`read_source` of a file named on the command line (`dsvc fmt`, `dsvc import-hf`)."""
    return read_source(path)


def _near_files(path: str) -> str | None:
    p = pathlib.Path(path)
    try:
        siblings = [f.name for f in p.parent.iterdir() if f.suffix == ".dsv"]
    except OSError:
        return None
    guess = did_you_mean(p.name, siblings)
    return f"did you mean '{p.parent / guess}'?" if guess else None


def write_atomic(path: str, text: str) -> None:
    """Replace `path` by `text` (UTF-8) all at once, keeping the old file's permissions."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    try:
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else None
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SpecError([Diagnostic(ERROR, f"cannot write '{path}': {err.strerror or err}",
                                    Span(path, 0, 0), "nothing was changed")]) from None
