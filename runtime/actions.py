"""Pipeline actions in torch.distributed.pipelining's vocabulary and string form.

An action is what one device does next: run a forward (`F`), a full backward
(`B`), the input-gradient half of a backward (`I`), the weight-gradient half
(`W`), an overlapped forward and backward of two micro-batches
(`OVERLAP_F_B`), or post a point-to-point send/receive (`SEND_F`, `RECV_F`,
`SEND_B`, `RECV_B`). The plan stores actions as strings in torch's `_Action`
format, so the list drawn is the list the runtime executes:

    "3F5"                 stage 3, forward of micro-batch 5
    "3SEND_F5"            stage 3 sends micro-batch 5's activations onward
    "(3F5;12B1)OVERLAP_F_B"  stage 3's forward of 5 overlapped with stage 12's backward of 1

Standard library only (the runtime's plan check and executors and the compiler's schedule
generators share it): `to_torch` / `from_torch` import torch only when called.
"""

from __future__ import annotations

import dataclasses
import re

# Computation kinds, spelled as torch's `_ComputationType` values.
FORWARD = "F"
FULL_BACKWARD = "B"
BACKWARD_INPUT = "I"
BACKWARD_WEIGHT = "W"
OVERLAP_F_B = "OVERLAP_F_B"
SEND_F = "SEND_F"
RECV_F = "RECV_F"
SEND_B = "SEND_B"
RECV_B = "RECV_B"

COMPUTE_KINDS = frozenset({FORWARD, FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, OVERLAP_F_B})
COMM_KINDS = frozenset({SEND_F, RECV_F, SEND_B, RECV_B})
# Kinds that consume the gradient arriving from the next stage (and free the activation).
INPUT_GRAD_KINDS = frozenset({FULL_BACKWARD, BACKWARD_INPUT})

# Longest names first, so that "SEND_F" is not read as "S" + ...; mirrors torch's regex.
_SIMPLE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


class ActionSyntaxError(ValueError):
    """A string that is not an action in torch's `_Action` format."""


@dataclasses.dataclass(frozen=True, order=True)
class Action:
    """One step of a device's schedule.

    `stage` is the global stage id and `microbatch` the micro-batch index within
    that stage's chain. An `OVERLAP_F_B` action has `stage = -1`,
    `microbatch = -1` and two `sub_actions`: the forward first, then the backward.
    """

    kind: str
    stage: int
    microbatch: int
    sub_actions: tuple[Action, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == OVERLAP_F_B:
            if len(self.sub_actions) != 2:
                raise ActionSyntaxError("OVERLAP_F_B needs exactly two sub-actions")
        elif self.kind not in COMPUTE_KINDS | COMM_KINDS:
            raise ActionSyntaxError(f"unknown action kind {self.kind!r}")
        elif self.sub_actions:
            raise ActionSyntaxError(f"only OVERLAP_F_B carries sub-actions, not {self.kind}")

    def __str__(self) -> str:
        if self.kind == OVERLAP_F_B:
            return "(" + ";".join(str(a) for a in self.sub_actions) + ")" + OVERLAP_F_B
        return f"{self.stage}{self.kind}{self.microbatch}"

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    def parts(self) -> tuple[Action, ...]:
        """The compute actions this stands for: the two halves of an overlap, else itself."""
        return self.sub_actions if self.kind == OVERLAP_F_B else (self,)


def overlap(forward: Action, backward: Action) -> Action:
    """An `OVERLAP_F_B` of a forward and a (full or input) backward."""
    return Action(OVERLAP_F_B, -1, -1, (forward, backward))


def parse_action(text: str) -> Action:
    """Read one action from torch's string form (inverse of `str(action)`)."""
    text = text.strip()
    if text.startswith("("):
        close = text.find(")")
        if close < 0 or text[close + 1 :] != OVERLAP_F_B:
            raise ActionSyntaxError(f"malformed overlapped action {text!r}")
        inner = [p for p in text[1:close].split(";") if p.strip()]
        subs = tuple(parse_action(p) for p in inner)
        if len(subs) != 2:
            raise ActionSyntaxError(f"{text!r}: OVERLAP_F_B needs exactly two sub-actions")
        return Action(OVERLAP_F_B, -1, -1, subs)
    m = _SIMPLE.match(text)
    if m is None:
        raise ActionSyntaxError(
            f"{text!r} is not an action; expected STAGE KIND MICROBATCH such as '2F0' or '3SEND_B1'"
        )
    return Action(m.group(2), int(m.group(1)), int(m.group(3)))


def to_torch(action: Action):
    """The equivalent `torch.distributed.pipelining.schedules._Action` (imports torch)."""
    from torch.distributed.pipelining.schedules import _Action, _ComputationType

    if action.kind == OVERLAP_F_B:
        subs = tuple(to_torch(a) for a in action.sub_actions)
        return _Action(-1, _ComputationType.OVERLAP_F_B, None, subs)
    return _Action(action.stage, _ComputationType(action.kind), action.microbatch)


def from_torch(torch_action) -> Action:
    """The plan-side `Action` for a torch `_Action` (duck-typed: no torch import needed)."""
    kind = torch_action.computation_type.value
    if kind == OVERLAP_F_B:
        return Action(OVERLAP_F_B, -1, -1, tuple(from_torch(a) for a in torch_action.sub_actions))
    if torch_action.microbatch_index is None:
        raise ActionSyntaxError(f"{torch_action!r} has no micro-batch; schedules here need one")
    return Action(kind, torch_action.stage_index, torch_action.microbatch_index)
