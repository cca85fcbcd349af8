"""Human formatting of figure values by unit (the report's text output and its deltas)."""

from __future__ import annotations

_SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_WORDS = ((1e12, "trillion"), (1e9, "billion"), (1e6, "million"))


def _si(v: float, unit: str, digits: int = 2) -> str:
    a = abs(v)
    for scale, prefix in _SI:
        if a >= scale:
            return f"{v / scale:.{digits}f} {prefix}{unit}"
    return f"{v:.{digits}f} {unit}" if v != int(v) else f"{int(v)} {unit}"


def _words(v: float) -> str:
    for scale, word in _WORDS:
        if abs(v) >= scale:
            return f"{v / scale:.2f} {word}"
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.2f}"


def _seconds(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0 s"
    if a < 1e-3:
        return f"{v * 1e6:.2f} us"
    if a < 1:
        return f"{v * 1e3:.2f} ms"
    return f"{v:.2f} s"


def _usd(v: float) -> str:
    sign, a = ("-" if v < 0 else ""), abs(v)
    if a >= 1e6:
        return f"{sign}${a / 1e6:.2f}M"
    if a >= 1e3:
        return f"{sign}${a / 1e3:.2f}k"
    return f"{sign}${a:,.0f}"


def format_value(value, unit: str, compact: bool = False) -> str:
    """`value` in `unit` for a person: 671.03 billion, 70,272 B, 77.07 GB, 123.86 us, $72.19M.

    `compact` drops the exact digits that precede large parameter counts.
    """
    if value is None:
        return "n/a"
    if unit == "bool" or isinstance(value, bool):
        return "yes" if value else "no"
    if unit in ("text",):
        return str(value)
    if unit == "list":
        return " ".join(str(v) for v in value)
    if unit == "index":
        return str(value)
    if unit == "params":
        if compact:
            return _words(value)
        return f"{value:,} ({_words(value)})" if abs(value) >= 1e6 else f"{value:,}"
    if unit == "B":
        return f"{value:,.0f} B" if abs(value) < 1e6 else _si(value, "B")
    if unit == "FLOP":
        return _si(value, "FLOP")
    if unit == "s":
        return _seconds(value)
    if unit == "tok/s":
        return f"{value:,.1f} tok/s"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "x":
        return f"{value:.2f}"
    if unit == "USD":
        return _usd(value)
    if unit == "count":
        return _words(value) if abs(value) >= 1e6 else (
            f"{value:,}" if float(value).is_integer() else f"{value:,.2f}")
    return str(value)


def format_delta(a, b, unit: str) -> tuple[str, str]:
    """(B - A formatted in `unit`, relative change) for the side-by-side report."""
    d = b - a
    if unit == "%":
        text = f"{100 * d:+.1f} pt"
    else:
        text = format_value(d, unit, compact=True)
        if d > 0:
            text = "+" + text
    # a relative change only between two values of one sign (none across or from zero:
    # headroom going from +21 GB to -128 GB is not "-687%")
    rel = f"{100 * d / a:+.1f}%" if a * b > 0 else ""
    return text, rel
