"""Pipeline schedules: generate, check, simulate and draw 1F1B, ZB1P, DualPipe, DualPipeV.

    from dsvc.compiler.schedules import build_schedule, check_schedule, simulate_uniform
    schedule = build_schedule("dualpipe", 8, 20)      # PP = 8 stages per copy, 20 micro-batches
    check_schedule(schedule)                           # raises ScheduleCheckError with every problem
    result = simulate_uniform(schedule, f=1, b=2, w=1) # makespan, bubble, activations per device
    draw_timeline(result, "dualpipe.png")

Modules: `schedule_ir` (the `Schedule` and its versioned JSON; the action vocabulary
is the runtime's, `dsvc.runtime.actions`), `generators`, `comms` (send/receive
insertion), `validate`, `timeline` (event simulator and cost models), `formulas`
(published figures), `overlap` (dual micro-batch chunk order), `summary`
(text/JSON), `trace` (Chrome/Perfetto), `draw` (matplotlib, lazy).
Pure Python: nothing here imports torch, and matplotlib only inside `draw_timeline`.
"""

from dsvc.runtime.actions import Action, ActionSyntaxError, from_torch, parse_action, to_torch

from .comms import insert_send_recv
from .draw import draw_timeline
from .formulas import formula_conditions, published_activations, published_bubble
from .generators import KINDS, ScheduleConfigError, build_schedule, validate_request
from .overlap_order import overlap_order
from .schedule_ir import SCHEDULE_FORMAT_VERSION, Chain, Schedule, ScheduleFormatError
from .summary import summary_json, summary_text
from .timeline import (
    CostModel,
    ScheduleDeadlock,
    SimResult,
    TableCosts,
    TimedAction,
    UniformCosts,
    simulate,
    simulate_uniform,
)
from .trace import chrome_trace
from .validate import ScheduleCheckError, check_schedule, schedule_problems

__all__ = [
    "KINDS",
    "SCHEDULE_FORMAT_VERSION",
    "Action",
    "ActionSyntaxError",
    "Chain",
    "CostModel",
    "Schedule",
    "ScheduleCheckError",
    "ScheduleConfigError",
    "ScheduleDeadlock",
    "ScheduleFormatError",
    "SimResult",
    "TableCosts",
    "TimedAction",
    "UniformCosts",
    "build_schedule",
    "check_schedule",
    "chrome_trace",
    "draw_timeline",
    "formula_conditions",
    "from_torch",
    "insert_send_recv",
    "overlap_order",
    "parse_action",
    "published_activations",
    "published_bubble",
    "schedule_problems",
    "simulate",
    "simulate_uniform",
    "summary_json",
    "summary_text",
    "to_torch",
    "validate_request",
]
