"""The candidates `dsvc plan` considers: every plan the runtime can run for a spec's cluster.

A candidate sets `parallel.pipeline`, `parallel.schedule`, `parallel.expert`,
`parallel.overlap`, `train.micro_batch` and `train.recompute`; the data degree
(world / pipeline) and the micro-batch count (global_batch / (data x micro_batch))
follow, as the spec derives them. ZeRO stays at 1: the runtime shards optimizer states
only (`zero-stage` warns for more). The generator leaves out what the rules would
refuse or warn about (a pipeline that does not divide the world, stages beyond the
layers, DualPipe on an odd rank count, experts that do not divide over EP, too few
micro-batches for the schedule, full recomputation inside overlapped pairs, overlap
with nothing to hide, more schedule chunks than `dsl.limits` allows); every candidate
that reaches the simulator is elaborated, so each rule checks it (`search.evaluate`).
"""

from __future__ import annotations

import dataclasses

from dsvc.dsl.limits import MAX_SCHEDULE_CHUNKS

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
RECOMPUTE = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8)  # sequences per micro-batch


@dataclasses.dataclass(frozen=True, order=True)
class Candidate:
    pipeline: int
    schedule: str
    expert: int
    micro_batch: int
    recompute: str
    overlap: str

    def overrides(self) -> list[str]:
        """The `--set` texts that turn the spec into this plan."""
        return [f"parallel.pipeline={self.pipeline}", f"parallel.schedule={self.schedule}",
                f"parallel.expert={self.expert}", f"parallel.overlap={self.overlap}",
                "parallel.zero=1", f"train.micro_batch={self.micro_batch}",
                f"train.recompute={self.recompute}"]

    def label(self, world: int) -> str:
        data = world // self.pipeline
        return (f"PP {self.pipeline} {self.schedule}, EP {self.expert}, DP {data}, "
                f"micro-batch {self.micro_batch}, recompute {self.recompute}"
                + (", overlap" if self.overlap == "dual_microbatch" else ""))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(spec) -> list[Candidate]:
    """Every candidate for `spec`'s model, cluster and global batch, in a fixed order."""
    world = spec.cluster.world_size
    layers = spec.model.num_layers
    routed = [f.routed for f in spec.model.ffns.values() if f.kind == "moe"]
    batch = spec.train.global_batch
    keep = spec.parallel.layers_per_stage is not None  # an explicit layout fixes the stages
    out = []
    for pp in _divisors(world):
        if keep and pp != spec.parallel.pipeline:
            continue
        data = world // pp
        eps = [e for e in _divisors(data) if all(r % e == 0 for r in routed)] if routed else [1]
        for schedule in SCHEDULES:
            if keep and schedule != spec.parallel.schedule:
                continue
            stages = 2 * pp if schedule == "dualpipev" else pp
            if stages > layers or (schedule == "dualpipe" and pp % 2):
                continue
            for mb in MICRO_BATCHES:
                if batch % (data * mb):
                    continue
                m = batch // (data * mb)
                if schedule == "dualpipe" and (m % 2 or m < 2 * pp):
                    continue
                if schedule == "dualpipev" and m < 2 * pp:
                    continue
                if schedule in ("1f1b", "zb1p") and m < pp:
                    continue
                if stages * m > MAX_SCHEDULE_CHUNKS:
                    continue
                for ep in eps:
                    overlaps = ["none"]
                    if schedule in ("dualpipe", "dualpipev") and ep > 1:
                        overlaps.append("dual_microbatch")
                    for recompute in RECOMPUTE:
                        for overlap in overlaps:
                            if recompute == "full" and overlap == "dual_microbatch":
                                continue
                            out.append(Candidate(pp, schedule, ep, mb, recompute, overlap))
    return sorted(out)
