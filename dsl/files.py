"""Reading a spec-like text file and writing one atomically, with diagnostics instead of tracebacks.

Used by `dsvc fmt` and `dsvc import-hf`: a file is replaced only by a complete
new file (written beside it, then renamed over it), never left half-written.
"""

from __future__ import annotations

import os

from dsvc.dsl.diagnostics import ERROR, Diagnostic, Span, SpecError
from dsvc.dsl.lexer import decode_source


def read_text(path: str) -> str:
    """The UTF-8 text of `path`; a `SpecError` if it is missing, a directory or not text."""
    where = Span(path, 0, 0)
    if os.path.isdir(path):
        raise SpecError([Diagnostic(ERROR, f"'{path}' is a directory, not a file", where)])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SpecError([Diagnostic(ERROR, f"file not found: '{path}'", where)]) from None
    except OSError as err:
        raise SpecError([Diagnostic(ERROR, f"cannot read '{path}': {err.strerror or err}",
                                    where)]) from None
    return decode_source(path, data)


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
