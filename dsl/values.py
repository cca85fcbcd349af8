"""Evaluation of .dsv expressions: constants, integer arithmetic and units.

`evaluate` turns an `ast.Expr` into a plain value: int, float, `Qty` (a number
with a dimension, in base units), str, `Ident` (a bare name that is not a
constant: an enum word or a reference), `CallValue`, tuple or list. Problems
are reported to the sink and evaluate to `None`.
"""

from __future__ import annotations

import math

from dsvc.dsl import ast
from dsvc.dsl.diagnostics import DiagnosticSink, Span, did_you_mean
from dsvc.dsl.limits import MAX_INTEGER
from dsvc.dsl.struct import Frozen, Struct
from dsvc.dsl.units import NUMBER, UNITS, unknown_unit_hint


class Qty(Frozen):
    """A number with a dimension, in base units; `unit` is as written (for messages)."""

    _fields = ("value", "dim", "unit")
    __slots__ = _fields


class Ident(Frozen):
    """A bare name that is not a constant: an enum word or a reference."""

    _fields = ("id", "span")
    __slots__ = _fields


class BadUnit(Struct):
    """A number followed by a word that is no unit (`400 Gbps`), and where the word is. The
    field given it reports it (it knows which units it takes); `reported` then is true."""

    _fields = ("unit", "span", "reported")
    _defaults = {"reported": False}
    __slots__ = _fields


class CallValue(Frozen):
    """`func(args, k = v)` evaluated: args and kwargs (name -> value) with their spans."""

    _fields = ("func", "func_span", "args", "arg_spans", "kwargs", "kwarg_spans", "span")
    __slots__ = _fields


_INTEGER_DIGITS = len(str(MAX_INTEGER))


def _dim(v) -> str:
    return v.dim if isinstance(v, Qty) else NUMBER


def _num(v):
    return v.value if isinstance(v, Qty) else v


def _isnum(v) -> bool:
    return isinstance(v, (int, float, Qty)) and not isinstance(v, bool)


class Evaluator:
    def __init__(self, sink: DiagnosticSink, constants: dict[str, object] | None = None):
        self.sink = sink
        self.constants: dict[str, object] = constants if constants is not None else {}
        self.bad_units: list[BadUnit] = []

    def report_unread_units(self) -> None:
        """Unknown units no field has reported (in a constant nothing uses, say)."""
        for b in self.bad_units:
            if not b.reported:
                b.reported = True
                self.sink.error(f"unknown unit '{b.unit}'", b.span, unknown_unit_hint(b.unit, None))

    def evaluate(self, e: ast.Expr):
        try:
            return self._eval(e)
        except RecursionError:
            self.sink.error("expression too deeply nested", e.span)
            return None

    def _eval(self, e):
        if isinstance(e, ast.Num):
            return self._literal(e)
        if isinstance(e, ast.Str):
            return e.value
        if isinstance(e, ast.Name):
            if e.id in self.constants:
                return self.constants[e.id]
            if e.id in ("true", "false"):
                return e.id == "true"
            return Ident(e.id, e.span)
        if isinstance(e, ast.Quantity):
            inner = self._eval(e.expr)
            if inner is None:
                return None
            if e.unit not in UNITS:  # the parser's `400 Gbps`: the unit's own span
                sp = e.span
                bad = BadUnit(e.unit, Span(sp.file, sp.end_line, sp.end_col - len(e.unit),
                                           sp.end_line, sp.end_col))
                self.bad_units.append(bad)
                return bad
            dim, factor = UNITS[e.unit]
            if isinstance(inner, Qty) or not _isnum(inner):
                what = f"'{inner.unit}'" if isinstance(inner, Qty) else "a non-number"
                self.sink.error(f"unit '{e.unit}' applied to {what}", e.span,
                                "a unit follows a plain number, e.g. 400 GB/s")
                return None
            value = inner * factor
            if not self._finite(value, e.span):
                return None
            return Qty(value, dim, e.unit)
        if isinstance(e, ast.Neg):
            v = self._eval(e.operand)
            if v is None or isinstance(v, BadUnit):
                return v
            if not _isnum(v):
                self.sink.error("'-' needs a number", e.span)
                return None
            return Qty(-v.value, v.dim, v.unit) if isinstance(v, Qty) else -v
        if isinstance(e, ast.BinOp):
            return self._binop(e)
        if isinstance(e, ast.Call):
            args, arg_spans = [], []
            for a in e.args:
                args.append(self._eval(a))
                arg_spans.append(a.span)
            kwargs, kwarg_spans = {}, {}
            for kw in e.kwargs:
                if kw.name in kwargs:
                    self.sink.error(f"argument '{kw.name}' given twice", kw.name_span)
                    continue
                kwargs[kw.name] = self._eval(kw.value)
                kwarg_spans[kw.name] = kw.name_span
            return CallValue(e.func, e.func_span, tuple(args), tuple(arg_spans), kwargs,
                             kwarg_spans, e.span)
        if isinstance(e, ast.Tuple):
            return tuple(self._eval(i) for i in e.items)
        if isinstance(e, ast.List):
            return [self._eval(i) for i in e.items]
        raise AssertionError(f"unknown expression node {type(e).__name__}")

    def _literal(self, e: ast.Num):
        """A number as written, refused (not converted) when it is beyond what any field
        takes: an integer longer than MAX_INTEGER's digits, a real that is not finite."""
        digits = e.text.replace("_", "")
        if not any(c in digits for c in ".eE") and len(digits.lstrip("0")) > _INTEGER_DIGITS:
            self.sink.error(f"integer of {len(digits.lstrip('0'))} digits is too large",
                            e.span, f"integers in a spec are at most 10^{_INTEGER_DIGITS - 1} "
                            "(docs/limits.md)")
            return None
        value = e.value
        if isinstance(value, int):
            return self._integer(value, e.span)
        return value if self._finite(value, e.span) else None

    def _integer(self, value: int, span):
        if abs(value) > MAX_INTEGER:
            self.sink.error("number too large", span,
                            f"integers in a spec are at most 10^{_INTEGER_DIGITS - 1} (docs/limits.md)")
            return None
        return value

    def _finite(self, value, span) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            self.sink.error("number out of range: not a finite real number", span,
                            "real numbers in a spec are at most ~1.8e308 in magnitude, "
                            "with their unit applied")
            return False
        return True

    def _binop(self, e: ast.BinOp):
        left, right = self._eval(e.left), self._eval(e.right)
        if left is None or right is None:
            return None
        if isinstance(left, BadUnit) or isinstance(right, BadUnit):
            return left if isinstance(left, BadUnit) else right  # reported where it is read
        for v in (left, right):
            if not _isnum(v):
                shown = v.id if isinstance(v, Ident) else repr(v)
                hint = None
                if isinstance(v, Ident):
                    guess = did_you_mean(v.id, self.constants)
                    hint = (f"did you mean the constant `{guess}`?" if guess
                            else "arithmetic works on numbers and constants; "
                            "define a constant with `const NAME = value`")
                self.sink.error(f"'{e.op}' needs numbers, got `{shown}`", e.span, hint)
                return None
        ld, rd = _dim(left), _dim(right)
        a, b = _num(left), _num(right)
        op = e.op
        if op in "+-" and ld != rd:
            self.sink.error(f"cannot {'add' if op == '+' else 'subtract'} a {rd} "
                            f"{'to' if op == '+' else 'from'} a {ld}", e.span)
            return None
        if op in ("*",) and ld != NUMBER and rd != NUMBER:
            self.sink.error(f"cannot multiply a {ld} by a {rd}", e.span)
            return None
        if op in ("/", "//", "%") and rd != NUMBER and ld != rd:
            self.sink.error(f"cannot divide a {ld} by a {rd}", e.span)
            return None
        if op in ("/", "//", "%") and b == 0:
            self.sink.error("division by zero", e.span)
            return None
        if op == "+":
            r = a + b
        elif op == "-":
            r = a - b
        elif op == "*":
            r = a * b
        elif op == "/":
            r = a / b
            if isinstance(a, int) and isinstance(b, int) and a % b == 0:
                r = a // b
        elif op == "//":
            r = a // b
        else:
            r = a % b
        if isinstance(r, float) and not math.isfinite(r):
            self.sink.error("arithmetic overflow", e.span)
            return None
        if isinstance(r, int) and self._integer(r, e.span) is None:
            return None
        dim = ld if ld != NUMBER else rd
        if op in ("/", "//", "%") and ld == rd:
            dim = NUMBER
        if dim == NUMBER:
            return r
        unit = left.unit if isinstance(left, Qty) else right.unit
        return Qty(r, dim, unit)
