"""Chrome / Perfetto trace JSON of a simulated schedule (load it in ui.perfetto.dev or
chrome://tracing): one process, one thread row per device, one complete ("X")
event per action, with exposed communication inside a chunk as a nested event.
"""

from __future__ import annotations

from dsvc.runtime.actions import OVERLAP_F_B, Action

# Trace timestamps are microseconds; simulated times are in `result.time_unit`.
_US_PER = {"s": 1e6, "ms": 1e3, "us": 1.0, "unit": 1.0}

_CATEGORY = {"F": "forward", "B": "backward", "I": "backward_input", "W": "backward_weight"}


def _name(action: Action) -> str:
    if action.kind == OVERLAP_F_B:
        f, b = action.sub_actions
        return f"F{f.microbatch}&{b.kind}{b.microbatch} (stages {f.stage},{b.stage})"
    return f"{action.kind}{action.microbatch} (stage {action.stage})"


def chrome_trace(result) -> dict:
    """The trace as a dict (`json.dump` it). Uniform-cost "units" are shown as microseconds."""
    scale = _US_PER.get(result.time_unit, 1.0)
    schedule = result.schedule
    events: list[dict] = [
        {
            "ph": "M",
            "name": "process_name",
            "pid": 0,
            "tid": 0,
            "args": {
                "name": f"{schedule.kind} PP={schedule.pp}, {schedule.num_microbatches} micro-batches"
            },
        },
    ]
    for d in range(schedule.num_devices):
        stages = ",".join(str(s) for s in schedule.device_stages(d))
        events.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": 0,
                "tid": d,
                "args": {"name": f"device {d} (stages {stages})"},
            }
        )
        events.append(
            {"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": d, "args": {"sort_index": d}}
        )
    for row in result.timeline:
        for t in row:
            a = t.action
            parts = a.parts()
            events.append(
                {
                    "ph": "X",
                    "name": _name(a),
                    "cat": "overlap_f_b" if a.kind == OVERLAP_F_B else _CATEGORY[a.kind],
                    "pid": 0,
                    "tid": t.device,
                    "ts": float(t.start) * scale,
                    "dur": float(t.end - t.start) * scale,
                    "args": {
                        "action": str(a),
                        "stages": [p.stage for p in parts],
                        "micro_batches": [p.microbatch for p in parts],
                    },
                }
            )
            if t.exposed_comm:
                events.append(
                    {
                        "ph": "X",
                        "name": "exposed all-to-all",
                        "cat": "communication",
                        "pid": 0,
                        "tid": t.device,
                        "ts": float(t.end - t.exposed_comm) * scale,
                        "dur": float(t.exposed_comm) * scale,
                        "args": {"action": str(a)},
                    }
                )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"makespan": float(result.makespan), "time_unit": result.time_unit},
    }
