"""The `dsvc` command line: one sub-command per module, imported only when used.

Exit codes: 0 success, 1 a spec (user input) error, 2 a usage error, 3 an
internal error (a bug: please report it; `DSVC_DEBUG=1` shows the traceback).
Command modules must not import torch or sympy at module level: `dsvc check`
imports neither.
"""

from __future__ import annotations

import argparse
import importlib
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
}

EXIT_OK, EXIT_SPEC, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(Exception):
    """A bad command line (missing file argument, conflicting flags): exit 2."""


def check_expert_load_flag(path: str | None) -> None:
    """`--expert-load F` names a file (missing: a usage error; its contents are checked by
    the graph's reader, `place_experts.read_expert_load`, as spec diagnostics)."""
    import os

    if path is not None and not os.path.isfile(path):
        raise UsageError(f"--expert-load {path}: no such file")


def add_set_argument(p) -> None:
    """`--set KEY=VALUE` (repeatable): a spec value overridden, checked like the file."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set cluster.nodes=128 --set "
                        "parallel.pipeline=32 (checked like the file; repeatable)")


def load_spec(path: str, overrides=()):
    """The checked spec at `path` with `--set` overrides; its warnings go to stderr. A
    malformed override (no `=`, a key that is not dotted names) is a usage error."""
    from dsvc import dsl
    from dsvc.dsl.overrides import OverrideSyntaxError, split_override

    for text in overrides:
        try:
            split_override(text)
        except OverrideSyntaxError as err:
            raise UsageError(str(err)) from None
    spec, warnings = dsl.load_with_warnings(path, overrides)
    for w in warnings:
        print(w.render(), file=sys.stderr)
    return spec


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
    argv = list(sys.argv[1:] if argv is None else argv)
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
    except BrokenPipeError:
        return EXIT_OK
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
