"""The .dsv language: parse, check and elaborate specs.

Python API:

    from dsvc import dsl
    spec = dsl.load("examples/deepseek_v3.dsv")       # -> dsl.spec.Spec
    spec = dsl.loads(text, filename="inline.dsv")

Both raise `dsl.SpecError` (its `.diagnostics` lists every problem, each with a
file:line:col span and a hint) and never any other exception for bad input.
Warnings are available through `load_with_warnings` / `loads_with_warnings`.
docs/language.md describes the language, every rule and this API.

Module map: lexer + parser (text -> `ast`), values + fields + blocks* (AST ->
checked values), elaborate (includes, constants, the whole spec), rules* (cross-
field checks), spec (the Spec's frozen dataclasses), fmt (canonical layout), files
(reading and atomic writing). The Hugging Face import is the compiler's
(compiler/import_hf.py).
"""

from __future__ import annotations

import os

from dsvc.dsl.diagnostics import Diagnostic, Span, SpecError

__all__ = ["load", "loads", "load_with_warnings", "loads_with_warnings", "check_file",
           "SpecError", "Diagnostic", "Span"]

def _guard(file: str, fn, *args):
    from dsvc.dsl.elaborate import internal_error

    try:
        return fn(*args)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError([Diagnostic("error", "spec too deeply nested", Span(file, 1, 1))]) from None
    except Exception as err:  # noqa: BLE001 - never a raw traceback for user input
        if os.environ.get("DSVC_DEBUG", "0") not in ("", "0"):
            raise
        raise internal_error(file, err) from None


def load_with_warnings(path: str | os.PathLike, overrides=(), replace_from=()):
    """(Spec, warnings) of a .dsv file and its includes; `replace_from`: files (a cluster file)
    whose blocks replace the spec's blocks of the same kind; `overrides` are `key=value`
    texts (`--set`, dsl/overrides.py) applied after that, before the spec is checked."""
    from dsvc.dsl.elaborate import load_with_warnings as impl

    return _guard(str(path), impl, path, False, tuple(overrides), tuple(replace_from))


def loads_with_warnings(text: str, filename: str = "<string>", overrides=()):
    """(Spec, warnings) of .dsv text; includes resolve relative to `filename`."""
    from dsvc.dsl.elaborate import loads_with_warnings as impl

    return _guard(filename, impl, text, filename, tuple(overrides))


def check_file(path: str | os.PathLike):
    """(Spec, warnings) of a .dsv file, or (`elaborate.Fragment`, warnings) of a file of shared
    blocks without a model (a cluster file meant for `include`), each checked on its own."""
    from dsvc.dsl.elaborate import load_with_warnings as impl

    return _guard(str(path), impl, path, True)


def load(path: str | os.PathLike, overrides=(), replace_from=()):
    """The checked `Spec` of a .dsv file (with `key=value` overrides, blocks replaced from
    other files). Raises `SpecError` with every problem found."""
    return load_with_warnings(path, overrides, replace_from)[0]


def loads(text: str, filename: str = "<string>", overrides=()):
    """The checked `Spec` of .dsv text (with `key=value` overrides). Raises `SpecError` with
    every problem found."""
    return loads_with_warnings(text, filename, overrides)[0]
