"""The published bubble and activation figures (the DualPipe README), and
when the simulated schedules meet them exactly.

PP = stages per model copy; F forward chunk, B full backward chunk, W its
weight part, F&B an overlapped pair. The simulator's bubble (makespan minus a
device's busy time, maximised over devices) equals these formulas exactly
under the conditions `formula_conditions` states; outside them the schedules
still run, and the simulated figure is the true one for those costs.
"""

from __future__ import annotations

FORMULAS = {
    "1f1b": "(PP-1)(F+B)",
    "zb1p": "(PP-1)(F+B-2W)",
    "dualpipe": "(PP/2-1)(F&B+B-3W)",
    "dualpipev": "(PP/2-1)(F&B+B-3W)",
}

ACTIVATION_FORMULAS = {"1f1b": "PP", "zb1p": "PP", "dualpipe": "PP+1", "dualpipev": "PP+1"}


def published_bubble(kind: str, pp: int, f, b, w, fb=None):
    """The table's bubble for `kind` with these chunk times (F&B defaults to F + B)."""
    pair = f + b if fb is None else fb
    if kind == "1f1b":
        return (pp - 1) * (f + b)
    if kind == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if kind in ("dualpipe", "dualpipev"):
        return (pp // 2 - 1) * (pair + b - 3 * w)
    raise ValueError(f"unknown schedule kind {kind!r}")


def published_activations(kind: str, pp: int) -> int:
    """The table's activations per device (the maximum over devices)."""
    return pp if kind in ("1f1b", "zb1p") else pp + 1


def formula_conditions(kind: str, pp: int, num_microbatches: int, f, b, w, fb=None) -> str | None:
    """None when the published bubble is exact for these inputs, else why it is not.

    Found by simulation over PP in {2..16} and many cost ratios (tests pin it):
    1F1B is exact for any costs; ZB1P needs W <= F and W <= B - W (the deferred
    weight passes must fit the gaps they fill) and N >= PP; the DualPipe family
    needs the input-gradient pass as long as the forward (B - W = F, the
    construction's slots assume it) and W <= F.
    """
    pair = f + b if fb is None else fb
    if kind == "1f1b":
        return None
    if kind == "zb1p":
        reasons = []
        if num_microbatches < pp:
            reasons.append("fewer micro-batches than stages")
        if w > f or w > b - w:
            reasons.append("W longer than F or than B - W")
        return "; ".join(reasons) or None
    reasons = []
    if b - w != f:
        reasons.append("the input-gradient pass B - W differs from F")
    if w > f:
        reasons.append("W longer than F")
    if pair < max(f, b) or pair > f + b:
        reasons.append("F&B outside [max(F, B), F + B]")
    return "; ".join(reasons) or None
