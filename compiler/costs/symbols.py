"""Quantities: one formula code path that yields either numbers or sympy formulas.

Every formula in `compiler.costs` is plain arithmetic over its arguments. Given
Python numbers it returns a number (the default: `dsvc report` never imports
sympy, which keeps it well under its 2 s budget); given sympy Symbols it returns
the formula that `--symbolic` prints. A `Quantities` object hands the formulas
either the spec's values or Symbols named after them, and records

- base symbols (`sym`): a spec value, its symbol name and its dotted spec path;
- derived quantities (`let`): a named sub-formula such as `P_attn`, so a total
  can be printed as `L_moe*(P_attn + P_moe)` rather than restated in full;
- figures (`figure`): what the report shows, keyed by JSON path.

In symbolic mode every derived symbol also carries its numeric value, so
`num(expr)` evaluates any formula by one substitution and callers can make
numeric decisions (which device is the most loaded) while building formulas.
"""

from __future__ import annotations

import dataclasses
from typing import Any

Number = Any  # int | float | sympy expression


def _is_sym(x) -> bool:
    return hasattr(x, "free_symbols")  # sympy.Basic without importing sympy


def ceil_div(a, b):
    """ceil(a / b) for integers or sympy expressions."""
    if _is_sym(a) or _is_sym(b):
        import sympy

        return sympy.ceiling(a / b)
    return -(-a // b)


def smax(*xs):
    """max() that also accepts sympy expressions (then a sympy Max)."""
    if any(_is_sym(x) for x in xs):
        import sympy

        return sympy.Max(*xs, evaluate=False)
    return max(xs)


def smin(*xs):
    """min() that also accepts sympy expressions (then a sympy Min)."""
    if any(_is_sym(x) for x in xs):
        import sympy

        return sympy.Min(*xs, evaluate=False)
    return min(xs)


def ssum(xs, start=0):
    """sum() that starts from a plain 0 so that numeric sums stay numeric."""
    total = start
    for x in xs:
        total = total + x
    return total


@dataclasses.dataclass(frozen=True)
class Figure:
    """One reported figure: `key` is its JSON path (`model.params_total`)."""

    key: str
    label: str
    unit: str  # params, B, FLOP, s, USD, tok/s, B/s, x (ratio), bool, count, %
    value: Any  # int | float | bool | None
    formula: Any = None  # sympy expression in symbolic mode, else None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class BaseSymbol:
    name: str
    value: Any
    path: str  # dotted spec path ("model.attention.mla.kv_lora_rank") or a description


@dataclasses.dataclass(frozen=True)
class Derived:
    name: str
    formula: Any
    value: Any
    label: str


class Quantities:
    """Spec values or symbols, derived quantities and figures (see the module docstring)."""

    def __init__(self, symbolic: bool = False):
        self.symbolic = symbolic
        self.base: dict[str, BaseSymbol] = {}
        self.derived: dict[str, Derived] = {}
        self.figures: list[Figure] = []
        self._values: dict = {}  # Symbol -> numeric value (symbolic mode)
        self._symbols: dict[str, Any] = {}

    # -------------------------------------------------------------- symbols
    def sym(self, name: str, value, path: str = ""):
        """The spec value `value` (numeric mode) or a Symbol `name` standing for it."""
        old = self.base.get(name)
        if old is not None and old.value != value:
            raise ValueError(f"symbol {name} bound twice ({old.value} and {value})")
        self.base[name] = BaseSymbol(name, value, path)
        return self._symbol(name, value)

    def let(self, name: str, expr, label: str = ""):
        """Name a sub-formula; later formulas see its Symbol (symbolic) or value (numeric)."""
        value = self.num(expr)
        self.derived[name] = Derived(name, expr if self.symbolic else None, value, label)
        return self._symbol(name, value)

    def ref(self, name: str):
        """An existing base or derived quantity: its Symbol (symbolic) or value (numeric)."""
        entry = self.base.get(name) or self.derived[name]
        return self._symbol(name, entry.value)

    def fresh(self, name: str) -> str:
        """`name`, primed until no base or derived symbol uses it."""
        while name in self.base or name in self.derived:
            name += "'"
        return name

    def _symbol(self, name: str, value):
        if not self.symbolic:
            return value
        s = self._symbols.get(name)
        if s is None:
            import sympy

            s = sympy.Symbol(name, positive=True)
            self._symbols[name] = s
        self._values[s] = value
        return s

    def num(self, expr):
        """The numeric value of a formula (identity on plain numbers)."""
        if not _is_sym(expr):
            return expr
        v = expr.xreplace(self._values)
        if not _is_sym(v):  # a bare Symbol replaced by its Python value
            return v
        if v.free_symbols:
            raise ValueError(f"unbound symbols in {expr}: {v.free_symbols}")
        if v.is_Integer:
            return int(v)
        if v in (True, False) or getattr(v, "is_Boolean", False):
            return bool(v)
        return float(v)

    # -------------------------------------------------------------- figures
    def figure(self, key: str, label: str, unit: str, expr, note: str = "") -> Any:
        """Record a figure; returns its value (numeric) or expression (symbolic) for reuse."""
        value = None if expr is None else self.num(expr)
        if isinstance(value, float) and value.is_integer() and unit in ("params", "B", "count"):
            value = int(value)
        formula = expr if (self.symbolic and _is_sym(expr)) else None
        self.figures.append(Figure(key, label, unit, value, formula, note))
        return expr

    def value(self, key: str):
        """The value of a recorded figure (KeyError if absent)."""
        for f in self.figures:
            if f.key == key:
                return f.value
        raise KeyError(key)


def formula_text(expr) -> str:
    """A formula as one line of text (the report's only sympy printer)."""
    if not _is_sym(expr):
        return repr(expr)
    import sympy

    text = sympy.sstr(expr, order="none")
    return text.replace("**", "^")

