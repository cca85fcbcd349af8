"""Units of the .dsv language: each converts to a base unit of one dimension.

Base units: bytes, bytes/s, FLOP/s, seconds, USD. Bits per second (Gb/s, the
way NICs are sold) convert to bytes per second.
"""

from __future__ import annotations

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
