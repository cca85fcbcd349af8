"""The `dsvc` command line: one sub-command per module, imported only when used.

Exit codes: 0 success, 1 a spec (user input) error, 2 a usage error, 3 an
internal error (a bug: please report it; `DSVC_DEBUG=1` shows the traceback).
Command modules must not import torch or sympy at module level: `dsvc check`
imports neither.

Output: commands print through `sys.stdout`, which `main` wraps so that a failed
write is one line, not a traceback: a closed pipe (`dsvc report ... | head`) ends
the command quietly, a full or failing device (`> /dev/full`) is exit 1. Files
named by `-o` are written by `write_output` (whole, or not at all): a wrong path
(missing parent, a file where a directory must be, a directory, no permission)
is a usage error, a full device exit 1. Both change nothing else on disk.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from dsvc import __version__

# name -> (module under compiler.cli, one-line help). Order is the help order.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("check", "parse and validate specs; every problem at once"),
    "fmt": ("fmt", "rewrite specs in canonical layout"),
    "import-hf": ("import_hf", "turn a Hugging Face config.json into a .dsv spec"),
    "report": ("report", "what a spec costs: parameters, FLOPs, memory, communication, speed"),
    "inspect": ("inspect", "the lowered graph or the simulated schedule"),
    "schedule": ("schedule", "simulate a pipeline schedule with uniform chunk costs"),
    "compile": ("compile", "write a self-contained, runnable build directory"),
    "train": ("train", "compile (cached) and launch training"),
    "export-hf": ("export_hf", "write a training checkpoint as a Hugging Face checkpoint"),
    "tokenize": ("tokenize", "turn text files into the token file a spec's train block reads"),
    "generate": ("generate", "decode from a trained run or an HF checkpoint (KV cache, MTP)"),
}

EXIT_OK, EXIT_SPEC, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(Exception):
    """A bad command line (missing file argument, conflicting flags): exit 2."""


class OutputError(Exception):
    """An output that could not be written; `code` is 2 for a wrong path, 1 for a device
    that failed (full, I/O error, quota)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# errno values of a device or file system that failed, as opposed to a path that is wrong
_DEVICE_ERRORS = {errno.ENOSPC, errno.EIO, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def output_error(what: str, err: OSError) -> OutputError:
    """`err` met while writing `what` (a path, or "standard output") as an `OutputError`."""
    reason = err.strerror or str(err)
    return OutputError(f"cannot write {what}: {reason}",
                       EXIT_SPEC if err.errno in _DEVICE_ERRORS else EXIT_USAGE)


def write_output(path: str, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) as file `path`, whole or not at all (dsl.files.replace_file);
    an `OutputError` when it cannot be."""
    from dsvc.dsl.files import replace_file

    try:
        replace_file(path, data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as err:
        raise output_error(path, err) from None


class _StdoutError(Exception):
    def __init__(self, err: OSError):
        super().__init__(str(err))
        self.error = err


class _Guarded:
    """sys.stdout (or its binary buffer) whose failed writes are told apart from every other
    OSError a command can meet: they surface as `_StdoutError`."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, data):
        try:
            return self._stream.write(data)
        except OSError as err:
            raise _StdoutError(err) from None

    def flush(self):
        try:
            self._stream.flush()
        except OSError as err:
            raise _StdoutError(err) from None

    @property
    def buffer(self):
        return _Guarded(self._stream.buffer)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _drop_stdout() -> None:
    """Point file descriptor 1 at /dev/null: Python's own flush at exit would otherwise fail
    again on the same closed pipe or full device and print a traceback-like warning."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):
        pass


def check_expert_load_flag(path: str | None) -> None:
    """`--expert-load F` names a regular file (else a usage error saying what it is: missing,
    a directory, a device, a FIFO); its contents are checked by the graph's reader,
    `place_experts.read_expert_load`, as spec diagnostics."""
    from dsvc.runtime.inputs import InputError, check_regular_file

    if path is not None:
        try:
            check_regular_file(path)
        except InputError as err:
            raise UsageError(f"--expert-load {path}: {err.reason}") from None


def _load(name: str):
    module, _ = COMMANDS[name]
    return importlib.import_module(f"dsvc.compiler.cli.{module}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsvc",
        description="Compile a .dsv spec of a DeepSeek-V3-class model into a distributed FP8 trainer.",
    )
    parser.add_argument("--version", action="version", version=f"dsvc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:  # other commands' modules are not imported at all
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `dsvc` command; returns its exit code (never raises for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = sys.stdout
    if stdout is not None and not isinstance(stdout, _Guarded):
        sys.stdout = _Guarded(stdout)
    try:
        code = _dispatch(argv)
        if sys.stdout is not None:
            sys.stdout.flush()  # here, where a failure is reported, not at interpreter exit
        return code
    except _StdoutError as err:
        _drop_stdout()
        if isinstance(err.error, BrokenPipeError):  # the reader stopped (`| head`): done
            return EXIT_OK
        command = next((a for a in argv if a in COMMANDS), None)
        print(f"dsvc{' ' + command if command else ''}: error: "
              f"{output_error('standard output', err.error)}", file=sys.stderr)
        return EXIT_SPEC
    finally:
        if isinstance(sys.stdout, _Guarded):
            sys.stdout = stdout


def _dispatch(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    only = command if command in COMMANDS else None
    parser = build_parser(only)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from dsvc.dsl.diagnostics import SpecError

    try:
        return int(_load(args.command).run(args) or 0)
    except _StdoutError:
        raise
    except OutputError as err:
        print(f"dsvc {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        n = len(err.errors)
        print(f"dsvc: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return EXIT_SPEC
    except UsageError as err:
        print(f"dsvc {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dsvc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no raw traceback
        from dsvc.compiler.debug import debug_level

        if debug_level() >= 1:
            raise
        print(
            f"dsvc: internal error: {type(exc).__name__}: {exc}\n"
            "  hint: this is a bug in dsvc; rerun with DSVC_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
