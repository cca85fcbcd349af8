"""Text and JSON views of a simulated schedule (what `dsvc schedule` prints).

`summary_json` is the documented JSON (keys `makespan`, `bubble`,
`activations_in_flight`, `actions` per device in order, ...); `summary_text`
the same for a terminal. Both are deterministic, so goldens can pin them.
"""

from __future__ import annotations

from fractions import Fraction

from .formulas import (
    ACTIVATION_FORMULAS,
    FORMULAS,
    formula_conditions,
    published_activations,
    published_bubble,
)
from .timeline import SimResult, UniformCosts

SUMMARY_VERSION = 1


def number(x):
    """A JSON number: an int when integral, else a float."""
    if isinstance(x, (int, Fraction)) and Fraction(x).denominator == 1:
        return int(x)
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return float(x)


def fmt(x) -> str:
    n = number(x)
    return str(n) if isinstance(n, int) else f"{n:.6g}"


def _published(result: SimResult, costs: UniformCosts) -> dict:
    s = result.schedule
    pub = published_bubble(s.kind, s.pp, costs.f, costs.b, costs.w, costs.fb)
    why = formula_conditions(s.kind, s.pp, s.num_microbatches, costs.f, costs.b, costs.w, costs.fb)
    return {
        "bubble_formula": FORMULAS[s.kind],
        "bubble": number(pub),
        "bubble_matches": result.max_bubble == pub,
        "formula_conditions_unmet": why,
        "activations_formula": ACTIVATION_FORMULAS[s.kind],
        "activations": published_activations(s.kind, s.pp),
    }


def summary_json(result: SimResult, costs: UniformCosts) -> dict:
    """The `dsvc schedule --format json` document."""
    s = result.schedule
    return {
        "format": "dsvc-schedule-simulation",
        "version": SUMMARY_VERSION,
        "kind": s.kind,
        "pp": s.pp,
        "num_devices": s.num_devices,
        "num_stages": s.num_stages,
        "micro_batches": s.num_microbatches,
        "costs": {
            "f": number(costs.f),
            "b": number(costs.b),
            "w": number(costs.w),
            "fb": number(costs.pair),
        },
        "time_unit": result.time_unit,
        "makespan": number(result.makespan),
        "bubble": [number(x) for x in result.bubble],
        "bubble_max": number(result.max_bubble),
        "busy": [number(x) for x in result.busy],
        "activations_in_flight": list(result.activations_in_flight),
        "published": _published(result, costs),
        "stage_device": list(s.stage_device),
        "chains": [
            {
                "name": c.name,
                "stages": list(c.stages),
                "micro_batches": c.num_microbatches,
                "microbatch_offset": c.microbatch_offset,
            }
            for c in s.chains
        ],
        "actions": [[str(a) for a in acts] for acts in s.actions],
        "timeline": [
            [{"action": str(t.action), "start": number(t.start), "end": number(t.end)} for t in row]
            for row in result.timeline
        ],
    }


def summary_text(result: SimResult, costs: UniformCosts, *, show_actions: bool = True) -> str:
    """A terminal summary: per-device bubble and activations beside the published figures."""
    s = result.schedule
    pub = _published(result, costs)
    per_chain = "" if len(s.chains) == 1 else f" ({s.chains[0].num_microbatches} per copy)"
    overlaps = any(a.kind == "OVERLAP_F_B" for acts in s.actions for a in acts)
    pair = f" F&B={fmt(costs.pair)}" if overlaps else ""
    lines = [
        (
            f"schedule {s.kind}: PP={s.pp}, {s.num_devices} devices, {s.num_stages} stages, "
            f"{s.num_microbatches} micro-batches{per_chain}"
        ),
        (
            f"chunk times: F={fmt(costs.f)} B={fmt(costs.b)} W={fmt(costs.w)}{pair}"
            f" (I = B-W = {fmt(costs.b - costs.w)})"
        ),
        f"makespan: {fmt(result.makespan)}",
        "",
        f"{'device':>6}  {'stages':<8}{'busy':>10}{'bubble':>10}{'activations':>13}",
    ]
    for d in range(s.num_devices):
        stages = ",".join(str(x) for x in s.device_stages(d))
        lines.append(
            f"{d:>6}  {stages:<8}{fmt(result.busy[d]):>10}{fmt(result.bubble[d]):>10}"
            f"{result.activations_in_flight[d]:>13}"
        )
    verdict = "exact" if pub["bubble_matches"] else "differs"
    lines += [
        "",
        (
            f"bubble: max {fmt(result.max_bubble)}; published {pub['bubble_formula']} = "
            f"{fmt(pub['bubble'])} ({verdict})"
        ),
    ]
    if pub["formula_conditions_unmet"]:
        lines.append(
            f"  note: the formula assumes otherwise here: {pub['formula_conditions_unmet']}"
        )
    lines.append(
        f"activations in flight: max {max(result.activations_in_flight)}; published "
        f"{pub['activations_formula']} = {pub['activations']}"
    )
    if show_actions:
        lines += ["", "actions per device (compute only; --format json lists sends and receives):"]
        for d in range(s.num_devices):
            lines.append(f"  {d:>3}: " + " ".join(str(a) for a in s.compute_actions(d)))
    return "\n".join(lines) + "\n"
