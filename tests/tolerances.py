"""The one table of numeric tolerances used by every numerics test.

Keyed by what is compared; each entry is (rtol, atol). Add entries here rather
than writing tolerances into tests.
"""

from __future__ import annotations

TOLERANCES: dict[str, tuple[float, float]] = {
    # distributed runtime vs one process, everything in fp32
    "fp32_equivalence": (1e-5, 1e-6),
}


def tol(name: str) -> tuple[float, float]:
    return TOLERANCES[name]
