"""Units of the .dsv language: each converts to a base unit of one dimension.

Base units: bytes, bytes/s, FLOP/s, seconds, USD. Bits per second (Gb/s, the
way NICs are sold) convert to bytes per second. A word that is no unit
(`400 Gbps`, `989 TFLOP/s`) is reported by the field that reads it, which knows
its dimension: `unknown_unit_hint` suggests the unit meant and lists the field's.
"""

from __future__ import annotations

import re

BYTES = "size"  # in bytes
BANDWIDTH = "bandwidth"
RATE = "compute rate"
TIME = "time"
MONEY = "money"
NUMBER = "number"

# unit -> (dimension, factor to the base unit)
UNITS: dict[str, tuple[str, float]] = {
    "B": (BYTES, 1.0),
    "KB": (BYTES, 1e3), "MB": (BYTES, 1e6), "GB": (BYTES, 1e9), "TB": (BYTES, 1e12),
    "PB": (BYTES, 1e15),
    "KiB": (BYTES, 2.0**10), "MiB": (BYTES, 2.0**20), "GiB": (BYTES, 2.0**30),
    "TiB": (BYTES, 2.0**40), "PiB": (BYTES, 2.0**50),
    "B/s": (BANDWIDTH, 1.0),
    "KB/s": (BANDWIDTH, 1e3), "MB/s": (BANDWIDTH, 1e6), "GB/s": (BANDWIDTH, 1e9),
    "TB/s": (BANDWIDTH, 1e12), "PB/s": (BANDWIDTH, 1e15),
    "KiB/s": (BANDWIDTH, 2.0**10), "MiB/s": (BANDWIDTH, 2.0**20),
    "GiB/s": (BANDWIDTH, 2.0**30), "TiB/s": (BANDWIDTH, 2.0**40), "PiB/s": (BANDWIDTH, 2.0**50),
    "Kb/s": (BANDWIDTH, 1e3 / 8), "Mb/s": (BANDWIDTH, 1e6 / 8), "Gb/s": (BANDWIDTH, 1e9 / 8),
    "Tb/s": (BANDWIDTH, 1e12 / 8), "Pb/s": (BANDWIDTH, 1e15 / 8),
    "FLOPS": (RATE, 1.0), "GFLOPS": (RATE, 1e9), "TFLOPS": (RATE, 1e12), "PFLOPS": (RATE, 1e15),
    "s": (TIME, 1.0), "ms": (TIME, 1e-3), "us": (TIME, 1e-6), "ns": (TIME, 1e-9),
    "USD": (MONEY, 1.0),
}

# The unit a value of each dimension is shown in by `dsvc fmt`-independent
# messages ("expected a bandwidth such as 400 GB/s").
EXAMPLE = {
    BYTES: "80 GB",
    BANDWIDTH: "400 GB/s",
    RATE: "989 TFLOPS",
    TIME: "2.8 us",
    MONEY: "30000 USD",
    NUMBER: "a plain number",
}


def units_of(dimension: str) -> list[str]:
    return [u for u, (d, _) in UNITS.items() if d == dimension]


def listing(dimension: str) -> str:
    """Every unit of a dimension, for a hint: `units of a bandwidth: B/s, ..., Gb/s, ...`."""
    return f"units of a {dimension}: {', '.join(units_of(dimension))}"


_SPELLED = (  # how units get written -> the spelling .dsv uses (matched case-insensitively)
    (r"flop/s$", "FLOPS"), (r"flops?$", "FLOPS"), (r"bits?", "b"), (r"bytes?", "B"),
    (r"(?<=b)ps$", "/s"), (r"(secs?|seconds?)$", "s"), (r"µs$", "us"), (r"dollars?|\$", "USD"),
)


def suggest_unit(word: str, dimension: str | None = None) -> list[str]:
    """The units `word` most likely means (`Gbps` -> Gb/s, `gb/s` -> GB/s or Gb/s,
    `TFLOP/s` -> TFLOPS), of `dimension` when given; empty when nothing is close."""
    bits = re.search(r"(?i)bit", word) is not None or word.endswith("bps")
    written_bytes = re.search(r"(?i)byte", word) is not None
    text = word
    for pattern, spelling in _SPELLED:
        text = re.sub("(?i)" + pattern, spelling, text)
    found = [u for u, (d, _) in UNITS.items()
             if u.lower() == text.lower() and (dimension is None or d == dimension)]
    if bits:
        found = [u for u in found if "b/s" in u] or found
    elif written_bytes or text != text.lower() and "B" in text:
        found = [u for u in found if "b/s" not in u] or found
    return found


def unknown_unit_hint(word: str, dimension: str | None) -> str:
    """`did you mean ...?` (when a unit is close) and the units `dimension` takes (all of
    them when the field takes no unit or is not known)."""
    guesses = suggest_unit(word, dimension)
    said = {"b/s": "bits per second", "B/s": "bytes per second"}
    shown = [f"`{g}`" + (f" ({said[g[-3:]]})" if len(guesses) > 1 and g[-3:] in said else "")
             for g in guesses]
    lead = f"did you mean {' or '.join(shown)}? " if shown else ""
    if dimension is None:  # no field: the dimensions of the guesses, else every one
        dims = dict.fromkeys(UNITS[g][0] for g in guesses) or dict.fromkeys(
            d for d, _ in UNITS.values())
        return lead + "; ".join(listing(d) for d in dims)
    return lead + listing(dimension)
