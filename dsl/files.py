"""Reading a spec file and writing one atomically, with diagnostics instead of tracebacks.

`read_source` is how every spec and every `include` is read: under the input policy
of `dsvc.runtime.inputs` (regular files only, refused by `stat` before opening, so a
FIFO cannot block and /dev/zero cannot fill memory; at most `SPEC_BYTES`). `dsvc fmt`
and `dsvc import-hf` write through `write_atomic`: a file is replaced only by a
complete new file (written beside it, then renamed over it), never left half-written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import stat

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


def replace_file(path: str, data: bytes) -> None:
    """Write `data` as `path` all at once: into a file beside it, then renamed over it, so a
    reader sees the old file or the new one and a failure leaves the old one (or none);
    an existing file keeps its permissions, a new one gets the umask's, a symlink stays a
    link (its target is replaced). A path that exists but is not a regular file (/dev/null,
    /dev/stdout, a FIFO) is written directly: renaming over it would replace the device.
    Raises `OSError`."""
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(target, "wb") as f:
            f.write(data)
        return
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if st is not None:
            os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path: str, text: str) -> None:
    """`replace_file` with UTF-8 text; a `SpecError` (nothing changed) when it cannot."""
    try:
        replace_file(path, text.encode("utf-8"))
    except OSError as err:
        raise SpecError([Diagnostic(ERROR, f"cannot write '{path}': {err.strerror or err}",
                                    Span(path, 0, 0), "nothing was changed")]) from None
