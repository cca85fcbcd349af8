"""Typed field readers: turn evaluated values into spec fields, with diagnostics.

A block's schema is a dict `key -> Field`; `read_entries` checks every entry of
a block against it (unknown keys with "did you mean", duplicates, types, units,
ranges, required keys) and returns the converted values plus their spans.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from dsvc.dsl import ast
from dsvc.dsl.diagnostics import DiagnosticSink, Span, did_you_mean
from dsvc.dsl.units import EXAMPLE, NUMBER, listing, unknown_unit_hint
from dsvc.dsl.values import BadUnit, CallValue, Evaluator, Ident, Qty

Convert = Callable[[object, Span, DiagnosticSink, str], object]
MISSING = object()


@dataclass(frozen=True, slots=True)
class Field:
    """One key of a block: its converter, whether it is required, a doc line, and
    `block`: whether it accepts `kind { ... }` (the caller then reads the raw ast.TypedBlock)."""

    convert: Convert
    required: bool = False
    doc: str = ""
    block: bool = False


def describe(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Qty):
        return f"a {v.dim} ({v.unit})"
    if isinstance(v, Ident):
        return f"`{v.id}`"
    if isinstance(v, CallValue):
        return f"`{v.func}(...)`"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (tuple, list)):
        return "a list"
    if isinstance(v, ast.TypedBlock):
        return f"`{v.kind} {{...}}`"
    return repr(v)


# ----------------------------------------------------------------------------- converters


def integer(lo: int | None = None, hi: int | None = None) -> Convert:
    def conv(v, span, sink, key):
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**62:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            hint = None
            if isinstance(v, Qty):
                hint = f"'{key}' is a plain count; drop the unit '{v.unit}'"
            sink.error(f"'{key}' must be an integer, got {describe(v)}", span, hint)
            return None
        if lo is not None and v < lo:
            sink.error(f"'{key}' must be at least {lo}, got {v}", span)
            return None
        if hi is not None and v > hi:
            sink.error(f"'{key}' must be at most {hi}, got {v}", span)
            return None
        return v

    return conv


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Convert:
    def conv(v, span, sink, key):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            hint = f"drop the unit '{v.unit}'" if isinstance(v, Qty) else None
            sink.error(f"'{key}' must be a number, got {describe(v)}", span, hint)
            return None
        if lo is not None and (v < lo or (lo_open and v == lo)):
            sink.error(f"'{key}' must be {'greater than' if lo_open else 'at least'} {lo:g}, "
                       f"got {v:g}", span)
            return None
        if hi is not None and v > hi:
            sink.error(f"'{key}' must be at most {hi:g}, got {v:g}", span)
            return None
        return float(v)

    return conv


def quantity(dim: str, positive: bool = True, example: str | None = None) -> Convert:
    example = example or EXAMPLE[dim]

    def conv(v, span, sink, key):
        if not isinstance(v, Qty):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sink.error(f"'{key}' needs a unit: a {dim} such as {example}", span, listing(dim))
            elif isinstance(v, Ident) and _GLUED_UNIT.match(v.id):
                # `400Gbps` lexes as one word (like `1f1b`): the unit starts after the digits
                digits = _GLUED_UNIT.match(v.id).group(1)
                word = v.id[len(digits):]
                at = Span(v.span.file, v.span.line, v.span.col + len(digits), v.span.end_line,
                          v.span.end_col)
                sink.error(f"unknown unit '{word}'", at, unknown_unit_hint(word, dim))
            else:
                sink.error(f"'{key}' must be a {dim} such as {example}, got {describe(v)}", span)
            return None
        if v.dim != dim:
            sink.error(f"'{key}' must be a {dim} such as {example}, got {v.unit} (a {v.dim})",
                       span, listing(dim))
            return None
        if positive and v.value <= 0:
            sink.error(f"'{key}' must be positive", span)
            return None
        if not positive and v.value < 0:
            sink.error(f"'{key}' must not be negative", span)
            return None
        return float(v.value)

    conv.dim = dim  # what `convert` lists for an unknown unit
    return conv


_GLUED_UNIT = re.compile(r"^([0-9]+)[A-Za-z]")


def convert(field: Field, v, span: Span, sink: DiagnosticSink, key: str):
    """`field`'s converter on `v`, after reporting the unknown units written in it (outside
    calls, whose arguments are converted one by one): at the unit, with the units the field
    takes (a plain number's field: none)."""
    bad = _bad_units(v)
    for b in bad:
        b.reported = True
        dim = getattr(field.convert, "dim", None)
        hint = unknown_unit_hint(b.unit, dim) if dim else f"'{key}' takes a plain number, without a unit"
        sink.error(f"unknown unit '{b.unit}'", b.span, hint)
    return None if bad else field.convert(v, span, sink, key)


def _bad_units(v) -> list[BadUnit]:
    if isinstance(v, BadUnit):
        return [v]
    if isinstance(v, (tuple, list)):
        return [b for x in v for b in _bad_units(x)]
    return []


def boolean() -> Convert:
    def conv(v, span, sink, key):
        if not isinstance(v, bool):
            sink.error(f"'{key}' must be true or false, got {describe(v)}", span)
            return None
        return v

    return conv


def choice(*options: str, aliases: dict[str, str] | None = None) -> Convert:
    aliases = aliases or {}

    def conv(v, span, sink, key):
        word = None
        if isinstance(v, Ident):
            word = v.id
        elif isinstance(v, int) and not isinstance(v, bool) and str(v) in options:
            word = str(v)
        elif isinstance(v, str) and v in options:
            word = v
        if word is not None:
            word = aliases.get(word, word)
            if word in options:
                return word
        guess = did_you_mean(word, options) if word else None
        hint = f"did you mean `{guess}`?" if guess else f"one of: {', '.join(options)}"
        sink.error(f"'{key}' must be one of {', '.join(options)}; got {describe(v)}", span, hint)
        return None

    return conv


def string() -> Convert:
    def conv(v, span, sink, key):
        if not isinstance(v, str):
            sink.error(f"'{key}' must be a string in double quotes, got {describe(v)}", span)
            return None
        return v

    return conv


def int_tuple(n: int) -> Convert:
    item = integer(lo=1)

    def conv(v, span, sink, key):
        if isinstance(v, CallValue) and not v.kwargs and len(v.args) == n:
            v = v.args  # tile(1, 128) / block(128, 128)
        if not isinstance(v, (tuple, list)) or len(v) != n:
            sink.error(f"'{key}' must be {n} integers, e.g. ({', '.join(['128'] * n)})", span)
            return None
        out = [item(x, span, sink, key) for x in v]
        return None if any(x is None for x in out) else tuple(out)

    return conv


def float_tuple(n: int, lo: float = 0.0, hi: float = 1.0) -> Convert:
    item = number(lo, hi)

    def conv(v, span, sink, key):
        if not isinstance(v, (tuple, list)) or len(v) != n:
            sink.error(f"'{key}' must be {n} numbers in parentheses, e.g. (0.9, 0.95)", span)
            return None
        out = [item(x, span, sink, key) for x in v]
        return None if any(x is None for x in out) else tuple(out)

    return conv


def int_list(lo: int = 1) -> Convert:
    item = integer(lo=lo)

    def conv(v, span, sink, key):
        if not isinstance(v, (tuple, list)):
            sink.error(f"'{key}' must be a list of integers, e.g. [4, 4, 4]", span)
            return None
        out = [item(x, span, sink, key) for x in v]
        return None if any(x is None for x in out) else tuple(out)

    return conv


def name_list(options: tuple[str, ...]) -> Convert:
    def conv(v, span, sink, key):
        if not isinstance(v, (tuple, list)):
            v = [v]
        out = []
        for x in v:
            if not isinstance(x, Ident) or x.id not in options:
                word = x.id if isinstance(x, Ident) else None
                guess = did_you_mean(word, options) if word else None
                where = x.span if isinstance(x, Ident) else span
                sink.error(f"unknown component {describe(x)} in '{key}'", where,
                           f"did you mean `{guess}`?" if guess else f"one of: {', '.join(options)}")
                continue
            out.append(x.id)
        return tuple(out)

    return conv


# ----------------------------------------------------------------------------- reading blocks


@dataclass(slots=True)
class Read:
    """What `read_entries` found: converted values and the span of each key written."""

    values: dict
    spans: dict

    def get(self, key, default=None):
        v = self.values.get(key, MISSING)
        return default if v is MISSING or v is None else v


def read_entries(
    entries: list,
    schema: dict[str, Field],
    sink: DiagnosticSink,
    ev: Evaluator,
    where: str,
    where_span: Span,
    path: str,
    spans: dict[str, Span],
    raw: dict[str, object] | None = None,
) -> Read:
    """Check a block's `key = value` entries against `schema`.

    Sub-blocks and range entries are reported as unexpected here; callers that
    accept them filter them out first. `raw`, if given, receives the unconverted
    AST values (for typed blocks and calls handled by the caller).
    """
    values: dict[str, object] = {}
    got: dict[str, Span] = {}
    for e in entries:
        if isinstance(e, ast.Const):
            ev.constants[e.name] = ev.evaluate(e.value)
            continue
        if isinstance(e, ast.Block):
            guess = did_you_mean(e.kind, schema)
            sink.error(f"unexpected block '{e.kind}' in {where}", e.kind_span,
                       f"did you mean `{guess}`?" if guess else
                       f"{where} takes: {', '.join(sorted(schema))}")
            continue
        if isinstance(e, ast.RangeAssign):
            sink.error(f"index ranges are only allowed in `layers {{ }}`, not in {where}", e.span)
            continue
        key = e.key
        if key in got:
            sink.error(f"'{key}' is set twice in {where}", e.key_span,
                       f"first set at line {got[key].line}")
            continue
        got[key] = e.key_span
        if key not in schema:
            guess = did_you_mean(key, schema)
            sink.error(f"unknown key '{key}' in {where}", e.key_span,
                       f"did you mean `{guess}`?" if guess else
                       f"{where} takes: {', '.join(sorted(schema))}")
            continue
        spans[f"{path}.{key}"] = e.span
        if raw is not None:
            raw[key] = e.value
        if isinstance(e.value, ast.TypedBlock):
            if schema[key].block:
                values[key] = e.value  # the caller reads it
            else:
                sink.error(f"'{key}' takes a value, not a block", e.value.span)
                values[key] = None
            continue
        v = ev.evaluate(e.value)
        if v is None:
            values[key] = None
            continue
        values[key] = convert(schema[key], v, e.value.span, sink, key)
    for key, f in schema.items():
        if f.required and key not in got:
            sink.error(f"{where} is missing '{key}'", where_span,
                       f"add `{key} = ...`" + (f" ({f.doc})" if f.doc else ""))
    return Read(values, got)


def call_args(
    cv: CallValue,
    schema: dict[str, Field],
    sink: DiagnosticSink,
    path: str,
    spans: dict[str, Span],
    positional: tuple[str, ...] = (),
) -> dict[str, object] | None:
    """Arguments of `name(a, k = v)` against a schema; positional ones by order."""
    out: dict[str, object] = {}
    ok = True
    if len(cv.args) > len(positional):
        sink.error(f"`{cv.func}(...)` takes {len(positional) or 'no'} positional argument"
                   f"{'s' if len(positional) != 1 else ''}", cv.span,
                   f"use names: {cv.func}({', '.join(k + ' = ...' for k in schema)})")
        return None
    items = list(zip(positional, cv.args, cv.arg_spans)) + [
        (k, v, cv.kwarg_spans[k]) for k, v in cv.kwargs.items()
    ]
    seen = set()
    for key, v, span in items:
        if key in seen:
            sink.error(f"argument '{key}' given twice", span)
            ok = False
            continue
        seen.add(key)
        if key not in schema:
            guess = did_you_mean(key, schema)
            sink.error(f"unknown argument '{key}' of `{cv.func}`", span,
                       f"did you mean `{guess}`?" if guess else
                       f"`{cv.func}` takes: {', '.join(schema)}")
            ok = False
            continue
        if v is None:
            ok = False
            continue
        spans[f"{path}.{key}"] = span
        c = convert(schema[key], v, span, sink, key)
        if c is None:
            ok = False
        out[key] = c
    for key, f in schema.items():
        if f.required and key not in seen:
            sink.error(f"`{cv.func}(...)` is missing '{key}'", cv.span)
            ok = False
    return out if ok else None


def as_call(v, span: Span, sink: DiagnosticSink, key: str,
            kinds: tuple[str, ...]) -> CallValue | None:
    """Accept `kind(...)` or a bare `kind` (no arguments) for a call-typed field."""
    if isinstance(v, Ident):
        return CallValue(v.id, v.span, (), (), {}, {}, v.span) if v.id in kinds else _bad_kind(
            v.id, v.span, sink, key, kinds)
    if isinstance(v, CallValue):
        if v.func not in kinds:
            return _bad_kind(v.func, v.func_span, sink, key, kinds)
        return v
    sink.error(f"'{key}' must be one of {', '.join(k + '(...)' for k in kinds)}, got {describe(v)}",
               span)
    return None


def _bad_kind(word, span, sink, key, kinds):
    guess = did_you_mean(word, kinds)
    sink.error(f"unknown {key} kind `{word}`", span,
               f"did you mean `{guess}`?" if guess else f"one of: {', '.join(kinds)}")
    return None


def same_dim(v) -> str:
    return v.dim if isinstance(v, Qty) else NUMBER
