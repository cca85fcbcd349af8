"""How dsvc reads what a user hands it: the resource policy, stated once.

Every reader of user input goes through here: specs and their includes, Hugging
Face configs and index files, expert-load histograms, plan.json, a checkpoint's
record. The policy, and why (docs/limits.md lists each limit):

- Only regular files are read. The path is resolved (symlinks followed) and
  `stat`-ed before it is opened: a FIFO would block the reader forever, a device
  such as /dev/zero never ends, a directory or socket is not a file. The file is
  opened non-blocking and checked again on the open descriptor, so a path swapped
  between the two checks is caught too.
- The size is checked before reading, and at most `limit + 1` bytes are read, so
  a file that grows while it is read cannot exhaust memory either.
- JSON is refused, before it is parsed, when it nests deeper than `MAX_JSON_DEPTH`
  (the parser would recurse once per level); integers longer than
  `MAX_INT_DIGITS` digits and non-finite numbers (`NaN`, `Infinity`, `1e999`) are
  refused while it is parsed, before any exact arithmetic sees them.

Directories dsvc will write into (a run directory) are checked the same way before
any work starts: `check_writable_dir` (a file in the way, no permission, a read-only
or pseudo file system such as /proc are found by creating and removing a probe).

Errors are `InputError`, one line naming the file; the callers turn it into their
own diagnostic (dsl), usage error (CLI) or launch error (runtime). Standard library
only: a build directory's copy of the runtime reads its plan with it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import stat
import tempfile

# A spec file or one of its includes (the language's own limit; specs are a few KB).
SPEC_BYTES = 2 * 1024 * 1024
# A JSON file: HF configs are a few KB, DeepSeek-V3's safetensors index ~9 MB,
# plan.json of a 2048-GPU plan a few MB.
JSON_BYTES = 64 * 1024 * 1024
# Nesting of a JSON document (HF configs nest 3 deep, plan.json 5).
MAX_JSON_DEPTH = 64
# Digits of a JSON integer: the largest count dsvc reads (bytes of a cluster) has 20.
MAX_INT_DIGITS = 64

__all__ = [
    "JSON_BYTES", "MAX_INT_DIGITS", "MAX_JSON_DEPTH", "SPEC_BYTES", "InputError",
    "check_regular_file", "check_writable_dir", "load_json", "parse_json", "read_bytes",
    "read_text",
]  # fmt: skip


class InputError(ValueError):
    """A user-supplied file or text that dsvc will not read; `str()` is one line.

    `line` and `col` (1-based) locate a JSON syntax error in the file, for callers that
    point a diagnostic at it; None otherwise."""

    def __init__(self, path: str, message: str, line: int | None = None,
                 col: int | None = None):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message
        self.line, self.col = line, col


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: str | os.PathLike) -> os.stat_result:
    """The `stat` of `path` (symlinks followed) if it is a regular file, else `InputError`."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        target = os.path.realpath(name)
        if os.path.islink(name) and target != os.path.abspath(name):
            raise InputError(name, f"a symlink to '{target}', which does not exist") from None
        raise InputError(name, "no such file") from None
    except OSError as err:
        raise InputError(name, f"cannot read: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(name, f"is {_kind(st.st_mode)}; dsvc reads regular files only")
    return st


def read_bytes(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file `path`, refused (`InputError`) beyond `limit` bytes."""
    name = os.fspath(path)
    st = check_regular_file(name)
    if st.st_size > limit:
        raise InputError(name, f"{st.st_size} bytes, over the {limit}-byte limit for this input")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags)
    except OSError as err:
        raise InputError(name, f"cannot read: {err.strerror or err}") from None
    try:
        again = os.fstat(fd)
        if not stat.S_ISREG(again.st_mode):  # swapped since the stat above
            raise InputError(name, f"is {_kind(again.st_mode)}; dsvc reads regular files only")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise InputError(name, f"cannot read: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise InputError(name, f"grew past the {limit}-byte limit for this input while read")
    return b"".join(chunks)


def read_text(path: str | os.PathLike, limit: int) -> str:
    """`read_bytes` decoded as UTF-8 (a BOM dropped); `InputError` where it is not text."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(os.fspath(path), f"not UTF-8 text (byte {err.start})") from None


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def _excess_depth(data: bytes) -> int:
    """The bracket nesting of a JSON text where it exceeds MAX_JSON_DEPTH, else 0; strings
    skipped, linear time. A document with few opening brackets in all (HF configs and
    index files) cannot exceed it and is not scanned."""
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    brackets = _STRING.sub(b'""', data).translate(None, _NOT_BRACKETS)
    depth = max(itertools.accumulate(_DEPTH_STEP[b] for b in brackets), default=0)
    return depth if depth > MAX_JSON_DEPTH else 0


def parse_json(text: str | bytes, source: str) -> object:
    """Parse JSON under the limits above; `InputError` (naming `source`) for anything else,
    syntax errors included (with their line and column)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    depth = _excess_depth(data)
    if depth:
        raise InputError(source, f"JSON nested {depth} deep, over the limit of {MAX_JSON_DEPTH}")

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise InputError(source, f"a JSON integer of {len(digits.lstrip('-'))} digits, over "
                                     f"the limit of {MAX_INT_DIGITS}")
        return int(digits)

    def parse_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise InputError(source, f"JSON number {literal[:40]} is not finite")
        return value

    def parse_constant(name: str):
        raise InputError(source, f"JSON {name} is not a number dsvc accepts (not finite)")

    try:
        return json.loads(data, parse_int=parse_int, parse_float=parse_float,
                          parse_constant=parse_constant)
    except json.JSONDecodeError as err:
        raise InputError(source, f"not valid JSON at line {err.lineno}, column {err.colno}: "
                                 f"{err.msg}", err.lineno, err.colno) from None
    except UnicodeDecodeError as err:
        raise InputError(source, f"not UTF-8 text (byte {err.start})") from None
    except RecursionError:  # unreachable under MAX_JSON_DEPTH; kept for a lowered recursion limit
        raise InputError(source, "JSON nested too deeply") from None


def load_json(path: str | os.PathLike, limit: int = JSON_BYTES) -> object:
    """A JSON file read and parsed under the policy."""
    return parse_json(read_bytes(path, limit), os.fspath(path))


def check_writable_dir(path: str | os.PathLike) -> None:
    """`InputError` unless `path` is a directory dsvc can create files in, or can be created:
    the nearest existing ancestor must be a directory, and a probe directory made and
    removed there proves it writable. Changes nothing on disk."""
    name = os.fspath(path)
    here = os.path.abspath(name)
    while not os.path.lexists(here):
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    if os.path.lexists(here) and not os.path.isdir(here):
        what = "it" if here == os.path.abspath(name) else f"'{here}'"
        raise InputError(name, f"{what} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dsvc-probe-", dir=here))
    except OSError as err:
        raise InputError(name, f"cannot create files in '{here}': {err.strerror or err}") from None
