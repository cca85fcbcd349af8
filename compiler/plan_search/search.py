"""The plan search: estimate every candidate, prune by memory, simulate the best, pick one.

1. Every candidate of `space.candidates` gets a step-time estimate (`estimate.Estimator`,
   about a millisecond each) and they are ordered by it (ties by the candidate's own
   order: the search is deterministic).
2. Each candidate's peak memory comes from the report's formulas on an even split of
   the layers (no passes run); one that exceeds the usable memory is pruned. Full
   recomputation without overlap is the least memory a layout can take: when it does
   not fit, no variant of that layout (pipeline, schedule, EP, micro-batch) does, and
   they are pruned without their own check.
3. The estimate misses what only the event simulation sees, and by how much depends
   most on the pipeline degree and the schedule (bubble shape, P2P, how exposed
   communication falls): the best-estimated fitting candidate of each (pipeline degree,
   schedule) is simulated, each estimate of that shape scaled by its simulated /
   estimated ratio, and the `simulate` best by the scaled estimate are simulated too.
4. Simulating means: elaborated with the candidate's values as `--set` overrides (so
   every rule of the language checks them) and run through the whole pass list
   (`build_report`: partition, placement, schedule, the simulated step, memory on the
   real partition). One that no longer fits there is rejected.
5. The fastest simulated plan that fits is chosen; the table is the Pareto front of
   the simulated ones (no other is both faster and smaller); the best candidate by
   estimate that was rejected is named with the reason, in one line.
"""

from __future__ import annotations

import dataclasses
import time

from .estimate import Estimator, variant
from .space import Candidate, candidates


@dataclasses.dataclass
class Outcome:
    """One candidate as far as the search took it."""

    candidate: Candidate
    estimate_s: float
    est_peak_bytes: float | None = None  # report formulas, even split
    scaled_s: float | None = None  # the estimate scaled by its pipeline degree's probe
    step_s: float | None = None  # simulated
    mfu: float | None = None
    peak_bytes: float | None = None  # report on the real partition
    rejected: str | None = None  # why, in a few words
    spec: object = None  # the elaborated spec of a simulated candidate

    @property
    def simulated(self) -> bool:
        return self.step_s is not None


@dataclasses.dataclass
class SearchResult:
    spec: object  # the base spec (with the command line's overrides)
    overrides: list[str]
    usable_bytes: float
    outcomes: list[Outcome]  # every candidate, in estimate order
    chosen: Outcome | None
    seconds: float
    phases: dict = dataclasses.field(default_factory=dict)  # estimate/memory/simulate: seconds

    @property
    def simulated(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.simulated]

    def pareto(self) -> list[Outcome]:
        """Simulated plans that fit, none of which another is faster and smaller than."""
        fits = sorted((o for o in self.simulated if o.rejected is None),
                      key=lambda o: (o.step_s, o.peak_bytes, o.candidate))
        out, smallest = [], float("inf")
        for o in fits:
            if o.peak_bytes < smallest:
                out.append(o)
                smallest = o.peak_bytes
        return out

    def best_rejected(self) -> Outcome | None:
        """The rejected candidate with the best estimate (or simulated time, when it got so far)."""
        rejected = [o for o in self.outcomes if o.rejected is not None]
        return min(rejected, key=lambda o: (o.step_s or o.estimate_s, o.candidate), default=None)

    @property
    def pruned(self) -> int:
        """Candidates rejected by the memory formulas, before any simulation."""
        return sum(o.rejected is not None and not o.simulated for o in self.outcomes)

    @property
    def fitting_simulated(self) -> int:
        return sum(o.rejected is None for o in self.simulated)

    def chosen_spec(self):
        return self.chosen.spec if self.chosen is not None else None

    @property
    def evaluated(self) -> int:
        """Candidates the search looked at past their estimate (memory or simulation)."""
        return sum(o.est_peak_bytes is not None or o.rejected is not None
                   for o in self.outcomes)


def search(path, overrides=(), replace_from=(), max_memory: float | None = None,
           simulate: int = 6) -> SearchResult:
    """Search the plans of the spec at `path` (with `--set` `overrides` and blocks
    `replace_from` other files, e.g. a cluster) for the fastest that fits
    `max_memory` bytes per GPU (default: the GPU's usable memory)."""
    from dsvc.compiler.costs.memory import RESERVE_FRACTION

    start = time.perf_counter()
    overrides = list(overrides)
    base = load_base(path, overrides, replace_from)
    gpu_usable = base.cluster.gpu.memory * (1 - RESERVE_FRACTION)
    usable = min(max_memory, gpu_usable) if max_memory is not None else gpu_usable
    phases = {"load": time.perf_counter() - start}
    mark = time.perf_counter()
    est = Estimator(base)
    outcomes = sorted((Outcome(c, est.step_s(c)) for c in candidates(base)),
                      key=lambda o: (o.estimate_s, o.candidate))
    phases["estimate"] = time.perf_counter() - mark
    mark = time.perf_counter()
    fitting, least = [], {}
    for o in outcomes:
        c = o.candidate
        layout = (c.pipeline, c.schedule, c.expert, c.micro_batch)
        if layout not in least:
            smallest = dataclasses.replace(c, recompute="full", overlap="none")
            least[layout] = _peak_even_split(variant(base, smallest))
        if least[layout] > usable:
            o.rejected = (f"needs {least[layout] / 1e9:.1f} GB per GPU even with full "
                          "recomputation")
            continue
        o.est_peak_bytes = _peak_even_split(variant(base, c))
        if o.est_peak_bytes > usable:
            o.rejected = f"needs {o.est_peak_bytes / 1e9:.1f} GB per GPU"
            continue
        fitting.append(o)
    phases["memory"] = time.perf_counter() - mark
    mark = time.perf_counter()
    probes: dict[tuple, Outcome] = {}  # (pipeline, schedule) -> its best-estimated fitting one
    for o in fitting:
        probes.setdefault(_shape(o.candidate), o)
    for o in probes.values():
        evaluate(path, overrides, replace_from, o, usable)
    ratio = {key: o.step_s / o.estimate_s for key, o in probes.items()
             if o.step_s is not None and o.estimate_s > 0}
    default = sorted(ratio.values())[len(ratio) // 2] if ratio else 1.0
    for o in fitting:
        o.scaled_s = o.estimate_s * ratio.get(_shape(o.candidate), default)
    rest = sorted((o for o in fitting if not o.simulated),
                  key=lambda o: (o.scaled_s, o.candidate))
    for o in rest[:simulate]:
        evaluate(path, overrides, replace_from, o, usable)
    phases["simulate"] = time.perf_counter() - mark
    chosen = min((o for o in fitting if o.simulated and o.rejected is None),
                 key=lambda o: (o.step_s, o.peak_bytes, o.candidate), default=None)
    return SearchResult(base, overrides, usable, outcomes, chosen,
                        time.perf_counter() - start, phases)


def _shape(c: Candidate) -> tuple:
    """What the estimate's error depends on most: the pipeline degree and the schedule (the
    bubble's shape, P2P, where exposed communication falls). One ratio per pipeline degree
    alone let a DualPipe probe's 1.37 sink every ZB1P plan of its degree (their own: 1.05)."""
    return c.pipeline, c.schedule


# A plan every spec can be elaborated with when its own does not suit the cluster asked for
# (`--gpus`, `--cluster`): the search replaces each of these values anyway.
NEUTRAL = ("parallel.pipeline=1", "parallel.expert=1", "parallel.schedule=1f1b",
           "parallel.overlap=none", "train.micro_batch=1", "train.recompute=none")


def load_base(path, overrides=(), replace_from=()):
    """The spec to search from: as given, or, when its own plan does not suit the cluster
    (pipeline or EP that do not divide it), with the NEUTRAL plan; the original diagnostics
    when neither loads."""
    from dsvc import dsl

    try:
        return dsl.load(path, overrides, replace_from)
    except dsl.SpecError as err:
        try:
            return dsl.load(path, [*overrides, *NEUTRAL], replace_from)
        except dsl.SpecError:
            raise err from None


def _peak_even_split(spec) -> float:
    from dsvc.compiler.driver import build_report

    return build_report(spec, even_split=True).value("memory.max_gpu_bytes")


def evaluate(path, overrides, replace_from, o: Outcome, usable: float) -> None:
    """Elaborate candidate `o` (every rule checks it) and run the whole pass list: its
    simulated step time, MFU and peak memory on the real partition."""
    from dsvc import dsl
    from dsvc.compiler.driver import build_report

    try:
        spec = dsl.load(path, [*overrides, *o.candidate.overrides()], replace_from)
    except dsl.SpecError as err:
        first = err.errors[0] if err.errors else err.diagnostics[0]
        o.rejected = f"the spec refuses it: {first.message}"
        return
    o.spec = spec
    report = build_report(spec)
    o.step_s = report.value("step.time_s")
    o.mfu = report.value("step.mfu")
    o.peak_bytes = report.value("memory.max_gpu_bytes")
    if o.peak_bytes > usable:
        o.rejected = f"needs {o.peak_bytes / 1e9:.1f} GB per GPU on its partition"
