"""Step time (a roofline first version), tokens per day and MFU.

Per pipeline stage and micro-batch (forward + backward):

* compute = tokens x (FP8 matmul FLOPs / (FP8 peak x gemm_efficiency_fp8)
  + other FLOPs / (BF16 peak x gemm_efficiency_bf16)); FP8 FLOPs are the linears
  the policy runs in FP8; BF16 FLOPs are kept linears (router, head, ...) and the
  attention core at its causal cost; elementwise and memory-bound kernels are
  not modelled, so this is optimistic;
* EP all-to-all (`comm`): hidden behind the other micro-batch's compute under
  dual micro-batch overlap with a schedule that has F&B pairs (DualPipe, DualPipeV;
  only max(0, comm - compute) is exposed), fully exposed otherwise;
* per device: the micro-batches through its stages times their chunk time, plus
  the schedule's bubble from the published formula (F = a third of the slowest
  chunk, B = 2F, W = F, F&B = F + B), plus the DP collectives at the end of the
  step (not overlapped); PP send/recv is taken as overlapped.

The step takes the busiest device. MFU = training FLOPs per step (the model's
convention, causal or not) / (step time x GPUs x dense BF16 peak), the
accounting of the DeepSeek-V3 report. The schedule issue's simulator refines this.
"""

from __future__ import annotations

from .comm import CommModel
from .layout import ParallelDims, StageContents
from .memory import stage_pieces, storage_dtype
from .model_costs import ModelCosts, train_flops
from .symbols import Quantities, smax, ssum


def piece_flops(piece, precision, imbalance=1) -> tuple:
    """(FP8 FLOPs, other FLOPs) per token of one piece, training (fwd + dgrad + wgrad)."""
    fp8 = other = 0
    for lin in piece.linears:
        flops = train_flops(lin.active_params, 0) * (imbalance if lin.expert else 1)
        if storage_dtype(lin.component, precision).startswith("fp8"):
            fp8 = fp8 + flops
        else:
            other = other + flops
    return fp8, other + train_flops(0, piece.core_flops)


class StepModel:
    """Chunk times per stage and the step time of a layout."""

    def __init__(self, spec, q: Quantities, costs: ModelCosts, pd: ParallelDims,
                 comm: CommModel | None, imbalance=1):
        self.spec, self.q, self.costs, self.pd, self.comm, self.f = (spec, q, costs, pd, comm,
                                                                     imbalance)
        gpu = spec.cluster.gpu
        self.r8 = q.sym("R_fp8", gpu.fp8_flops * gpu.gemm_efficiency_fp8,
                        "cluster.gpu.fp8 x gemm_efficiency_fp8")
        self.r16 = q.sym("R_bf16", gpu.bf16_flops * gpu.gemm_efficiency_bf16,
                         "cluster.gpu.bf16 x gemm_efficiency_bf16")

    def stage_flops(self, stage: StageContents) -> tuple:
        pr, fp8, other = self.spec.precision, 0, 0
        pieces = stage_pieces(stage, self.costs, self.spec.model.tie_embeddings)
        for piece, n in pieces.values():
            a, b = piece_flops(piece, pr, self.f)
            fp8, other = fp8 + n * a, other + n * b
        if stage.mtp and self.costs.mtp is not None:  # each MTP module runs the shared head
            a, b = piece_flops(self.costs.head, pr)
            fp8, other = fp8 + stage.mtp * a, other + stage.mtp * b
        return fp8, other

    def chunk(self, stage: StageContents) -> dict:
        """Times of one micro-batch (forward + backward) through `stage`."""
        fp8, other = self.stage_flops(stage)
        compute = self.pd.T * (fp8 / self.r8 + other / self.r16)
        ep = self.comm.stage_ep(stage)["time"] if self.comm is not None else 0
        p = self.spec.parallel  # only F&B pairs (DualPipe, DualPipeV) overlap anything
        overlap = p.overlap == "dual_microbatch" and p.schedule in ("dualpipe", "dualpipev")
        exposed = smax(0, ep - compute) if overlap and ep != 0 else ep
        return {"compute": compute, "ep": ep, "exposed": exposed, "time": compute + exposed}

    def figures(self, layout) -> None:
        from dsvc.compiler.schedules.formulas import published_bubble

        q, pd, p = self.q, self.pd, self.spec.parallel
        chunks = [[self.chunk(st) for st in stages] for stages in layout]
        busy = [ssum(st.micro_batches * c["time"] for st, c in zip(stages, cs))
                for stages, cs in zip(layout, chunks)]
        worst = max(range(len(layout)), key=lambda i: q.num(busy[i]))
        all_chunks = [c for cs in chunks for c in cs]
        slow = max(all_chunks, key=lambda c: q.num(c["time"]))
        f_time = q.let("t_F", slow["time"] / 3, "forward chunk time of the slowest stage")
        bubble = published_bubble(p.schedule, pd.stages_per_copy, f_time, 2 * f_time, f_time)
        dp = self.comm.device(layout[worst])["dp_time_s"] if self.comm is not None else 0
        stages = layout[worst]
        compute = ssum(st.micro_batches * c["compute"] for st, c in zip(stages, chunks[worst]))
        exposed = ssum(st.micro_batches * c["exposed"] for st, c in zip(stages, chunks[worst]))
        q.figure("step.device", "busiest device", "index", worst)
        q.figure("step.compute_s", "compute on the busiest device", "s", compute)
        q.figure("step.ep_exposed_s", "EP all-to-all not hidden", "s", exposed)
        q.figure("step.roofline_bubble_s", f"pipeline bubble ({p.schedule}, formula)", "s", bubble)
        q.figure("step.dp_s", "DP collectives (end of step)", "s", dp)
        time = q.figure("step.roofline_time_s", "step time (roofline)", "s",
                        busy[worst] + bubble + dp)
        time = q.let("t_step", time, "roofline step time")
        tokens = q.figure("step.tokens_per_step", "tokens per step", "count",
                          q.ref("B_g") * self.costs.S)
        q.figure("step.roofline_tokens_per_day", "tokens per day (roofline)", "count",
                 tokens / time * 86400)
        world = pd.world
        peak = q.sym("R_peak", self.spec.cluster.gpu.bf16_flops, "cluster.gpu.bf16 (MFU reference)")
        q.figure("step.roofline_mfu", "MFU (roofline; causal FLOPs, BF16 peak)", "%",
                 tokens * q.ref("F_token") / (time * world * peak))
        q.figure("step.roofline_mfu_noncausal", "MFU (roofline; non-causal FLOPs)", "%",
                 tokens * q.ref("F_token_nc") / (time * world * peak))
