"""`dsvc inspect SPEC --schedule`: the simulated training step of a spec.

    dsvc inspect examples/deepseek_v3.dsv --schedule                 # figures per rank
    dsvc inspect examples/tiny.dsv --schedule --format png -o step.png
    dsvc inspect examples/deepseek_v3.dsv --schedule --format chrome -o step.json

Formats: text (step time, bubble, exposed communication, memory, tokens/day,
MFU; per pipeline rank), json (the same figures, the plan's schedule section
and the timeline), png (the timeline picture), chrome (a Chrome/Perfetto
trace). `compiler/cli/inspect.py` hands `--schedule` here (`run(args)`);
`run_schedule_view(spec, args)` is the same for an already loaded spec.
Module level imports nothing heavy.
"""

from __future__ import annotations

import sys

FORMATS = ("text", "json", "png", "chrome")


def run(args) -> int:
    """Load `args.spec` (warnings to stderr) and show its simulated step."""
    from dsvc import dsl

    spec, warnings = dsl.load_with_warnings(args.spec)
    for w in warnings:
        print(w.render(), file=sys.stderr)
    return run_schedule_view(spec, args)


def run_schedule_view(spec, args) -> int:
    """Simulate `spec` and write the view `args.format` asks for to `args.output` or stdout."""
    from dsvc.compiler.cli import UsageError, check_expert_load_flag, write_output

    fmt = getattr(args, "format", "text") or "text"
    output = getattr(args, "output", None)
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt} is not a schedule view; with --schedule use one of "
                         f"{', '.join(FORMATS)}")
    given = [f"--{name}" for name in ("stage", "rank", "layer", "after")
             if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} select(s) graph ops and does not apply to --schedule")
    if fmt == "png" and not output:
        raise UsageError("--format png writes an image and needs -o FILE\n  hint: add -o step.png")
    expert_load = getattr(args, "expert_load", None)
    check_expert_load_flag(expert_load)
    from dsvc.compiler.driver import simulate_step

    result = simulate_step(spec, expert_load=expert_load)
    if fmt == "png":
        import io

        from dsvc.compiler.schedules import draw_timeline

        image = io.BytesIO()
        draw_timeline(result.sim, image, title=_title(spec, result))
        write_output(output, image.getvalue())
        print(f"{output}: png", file=sys.stderr)
        return 0
    if fmt == "json":
        import json

        text = json.dumps(step_json(result), indent=1) + "\n"
    elif fmt == "chrome":
        import json

        from dsvc.compiler.schedules import chrome_trace

        text = json.dumps(chrome_trace(result.sim)) + "\n"
    else:
        text = step_text(spec, result)
    if output:
        write_output(output, text)
        print(f"{output}: {fmt}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def step_json(result) -> dict:
    """Figures, the plan's schedule section, and the timeline (start, end, exposed per action)."""
    doc = result.to_json()
    doc["schedule"] = result.sim.schedule.to_json()
    doc["timeline"] = [
        [{"action": str(t.action), "start": t.start, "end": t.end, "exposed_comm": t.exposed_comm}
         for t in row]
        for row in result.sim.timeline
    ]
    return doc


def _title(spec, r) -> str:
    return (f"{spec.model.name}: {r.kind}, {r.sim.schedule.num_devices} ranks, "
            f"{r.num_microbatches} micro-batches, overlap {r.overlap}; step {r.step_time_s:.4g} s, "
            f"MFU {r.mfu:.1%}")


def _time_unit(seconds: float) -> tuple[str, float]:
    for name, scale in (("s", 1.0), ("ms", 1e-3)):
        if seconds >= scale:
            return name, scale
    return "us", 1e-6


def _bytes_unit(nbytes: float) -> tuple[str, float]:
    return ("GB", 1e9) if nbytes >= 1e9 else ("MB", 1e6)


def step_text(spec, r) -> str:
    """The terminal view of a `StepResult` (times in s, ms or us by the step's size)."""
    s = r.sim.schedule
    c = spec.cluster
    tu, ts = _time_unit(r.step_time_s)
    bu, bs = _bytes_unit(max(r.peak_activation_bytes))

    def t(x: float) -> str:
        return f"{x / ts:.4f}"

    lines = [
        f"simulated step: {spec.file}",
        (f"schedule {r.kind}: {s.num_devices} pipeline ranks, {s.num_stages} stages, "
        f"{r.num_microbatches} micro-batches, overlap {r.overlap}"),
        f"cluster {c.name}: {r.world} GPUs ({c.gpu.name}); one data-parallel replica simulated",
        "",
        (f"step time           {t(r.step_time_s):>10} {tu}  (pipeline {t(r.pipeline_s)} {tu} "
        f"+ data-parallel tail {t(r.dp_exposed_s)} {tu})"),
        f"tokens per step     {r.tokens_per_step:10d}",
        f"tokens per day      {r.tokens_per_day / 1e9:10.2f} B",
        (f"MFU                 {r.mfu:10.2%}  (causal, {r.flops_per_token / 1e9:.4g} GFLOPs/token; "
        f"non-causal {r.mfu_noncausal:.2%} at {r.flops_per_token_noncausal / 1e9:.4g})"),
        (f"bubble              {t(r.bubble_max_s):>10} {tu}  max per rank; "
        f"{r.bubble_fraction:.1%} of all device time"),
        f"exposed all-to-all  {t(r.exposed_comm_max_s):>10} {tu}  max per rank",
        (f"peak activations    {max(r.peak_activation_bytes) / bs:10.2f} {bu} max per rank "
        f"({max(r.activations_in_flight)} micro-batch stages in flight)"),
        "",
        (f"{'rank':>4}  {'stages':<7}{'compute':>10}{'exposed':>10}{'idle':>10}{'dp comm':>10}"
        f"{'in flight':>11}{'act ' + bu:>9}   (times in {tu})"),
    ]
    for d in range(s.num_devices):
        stages = ",".join(str(x) for x in s.device_stages(d))
        lines.append(
            f"{d:>4}  {stages:<7}{t(r.compute_s[d]):>10}{t(r.exposed_comm_s[d]):>10}"
            f"{t(r.bubble_s[d]):>10}{t(r.dp_comm_s[d]):>10}{r.activations_in_flight[d]:11d}"
            f"{r.peak_activation_bytes[d] / bs:9.2f}")
    lines += ["", "assumptions (docs/simulate.md):"] + [f"  - {a}" for a in r.assumptions]
    return "\n".join(lines) + "\n"
