"""Pipeline execution of a plan's stages with `torch.distributed.pipelining`.

Each local stage module is wrapped in a `PipelineStage` with its input and
output shapes given up front (static metadata: no shape-inference forward, which
would run the MoE all-to-alls on garbage). The schedule is:

- the plan's action lists (torch `_Action` strings: "0F1", "1B0", "0I0", "0W0",
  "(0F1;3B0)OVERLAP_F_B") run by `_PipelineScheduleRuntime`, which inserts the
  SEND/RECV actions itself when the lists are compute-only; or
- torch's own schedule class for the plan's kind (`Schedule1F1B`,
  `ScheduleDualPipeV`, `ScheduleInterleavedZeroBubble`) when the plan has no lists.

`register_action(kind, fn)` registers a custom function for an action kind on
the runtime schedule. DualPipe (two model copies) and overlapped F&B pairs do
not run here but in `runtime.dualpipe.ActionExecutor`, which the Trainer picks
for them.

With one pipeline rank there is no pipeline: micro-batches run one after the
other in this process (`LocalExecutor`), with the same loss scaling.

Gradients are not scaled by torch (`scale_grads=False`): the loss function
multiplies each micro-batch's loss by 1/num_microbatches, and the MoE
auxiliary losses use the same factor, so accumulated gradients are those of
the mean loss.
"""

from __future__ import annotations

import torch

from .model import StageModule
from .plan import Plan


def _stage_shapes(plan: Plan, module: StageModule, micro_batch: int, device):
    seq, hidden = plan.train.seq_len, plan.model.hidden
    act = module.act_dtype
    # requires_grad matters: torch derives the gradient buffers between stages from it
    if module.stage.embedding:
        x = torch.empty(micro_batch, seq, dtype=torch.long, device="meta")
    else:
        x = torch.empty(micro_batch, seq, hidden, dtype=act, device="meta", requires_grad=True)
    if module.stage.head:
        y = torch.empty(1, dtype=torch.float32, device="meta", requires_grad=True)
    else:
        y = torch.empty(micro_batch, seq, hidden, dtype=act, device="meta", requires_grad=True)
    return x, y


class LocalExecutor:
    """All stages on this process (pipeline degree 1): micro-batches in sequence."""

    def __init__(self, modules: list[StageModule], num_microbatches: int):
        self.modules = modules
        self.num_microbatches = num_microbatches

    def run(self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> None:
        n = self.num_microbatches
        for tok, lab in zip(tokens_BS.chunk(n), labels_BS.chunk(n)):
            h = tok
            for mod in self.modules:
                h = mod(h, labels=lab)
            (h.sum() / n).backward()


class PipelineExecutor:
    """This rank's stages inside a torch.distributed.pipelining schedule."""

    def __init__(self, plan: Plan, modules: list[StageModule], pp_group, device):
        from torch.distributed.pipelining import PipelineStage

        self.plan = plan
        self.modules = modules
        n = plan.schedule.num_microbatches
        self.num_microbatches = n
        self.stages = []
        for mod in modules:
            x, y = _stage_shapes(plan, mod, plan.train.micro_batch, device)
            self.stages.append(
                PipelineStage(
                    mod,
                    mod.stage.index,
                    plan.num_stages,
                    device,
                    input_args=(x,),
                    output_args=(y,),
                    group=pp_group,
                )
            )
        self.schedule = self._build_schedule()
        self.holds_first = any(m.stage.embedding for m in modules)

    def _loss_fn(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return out.sum() / self.num_microbatches

    def _build_schedule(self):
        from torch.distributed.pipelining import schedules as S

        sch = self.plan.schedule
        n = sch.num_microbatches
        if sch.kind == "dualpipe":
            raise NotImplementedError(
                "dualpipe (two model copies) runs in runtime.dualpipe.ActionExecutor (the Trainer "
                "picks it); torch's schedules have one stage per index and one copy"
            )
        if sch.actions:
            runtime = S._PipelineScheduleRuntime(
                self.stages, n, loss_fn=self._loss_fn, scale_grads=False
            )
            actions = {
                rank: [S._Action.from_str(a) for a in acts] for rank, acts in enumerate(sch.actions)
            }
            fmt = "compute_comms" if _has_comms(actions) else "compute_only"
            runtime._prepare_schedule_with_comms(actions, format=fmt)
            return runtime
        if sch.kind == "1f1b":
            return S.Schedule1F1B(self.stages[0], n, loss_fn=self._loss_fn, scale_grads=False)
        if sch.kind == "dualpipev":
            return S.ScheduleDualPipeV(self.stages, n, loss_fn=self._loss_fn, scale_grads=False)
        raise NotImplementedError(
            f"schedule {sch.kind!r} without action lists: compile the plan with them"
        )

    def register_action(self, kind: str, fn) -> None:
        """Run `fn(action, ctx)` for actions of `kind` (e.g. "OVERLAP_F_B") instead of torch's default."""
        from torch.distributed.pipelining import schedules as S

        if not isinstance(self.schedule, S._PipelineScheduleRuntime):
            raise TypeError("custom actions need a plan with action lists (the runtime schedule)")
        self.schedule.register_custom_function(S._ComputationType.from_str(kind), fn)

    def run(self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> None:
        args = (tokens_BS,) if self.holds_first else ()
        self.schedule.step(*args, target=labels_BS, labels=labels_BS)


def _has_comms(actions) -> bool:
    from torch.distributed.pipelining import schedules as S

    t = S._ComputationType
    comm = {t.SEND_F, t.RECV_F, t.SEND_B, t.RECV_B}
    return any(
        a is not None and a.computation_type in comm for acts in actions.values() for a in acts
    )
