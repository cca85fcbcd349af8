"""`dsvc schedule`: a pipeline schedule simulated with uniform chunk times and no communication.

    dsvc schedule --kind dualpipe --stages 8 --micro-batches 20 --f 1 --b 2 --w 1 [--fb 2.5]
                  [--format text|json|png|chrome] [-o FILE]

PP (`--stages`) is stages per model copy, as in the published bubble formulas.
Times are exact rationals ("0.5", "1/3" are fine), in any one unit.
"""

from __future__ import annotations

import argparse
import re

from dsvc.compiler.cli import UsageError, write_output
from dsvc.dsl.limits import MAX_SCHEDULE_CHUNKS

FORMATS = ("text", "json", "png", "chrome")
KIND_CHOICES = ("1f1b", "zb1p", "dualpipe", "dualpipev")  # = compiler.schedules.KINDS
# A chunk time: a decimal (`2`, `0.5`, `1.5e-3`) or a ratio of integers (`1/3`). Checked
# before any exact arithmetic: Fraction("1e999999999") builds a billion-digit integer.
_TIME = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|[0-9]+/[0-9]+)\Z")
MAX_TIME_DIGITS = 30  # digits of a chunk time, and the magnitude of its exponent


def _time(text: str):
    from fractions import Fraction

    t = text.strip()
    if t.startswith("-") and _TIME.match(t[1:]):
        raise argparse.ArgumentTypeError(f"{text} is negative; chunk times are durations")
    if not _TIME.match(t):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 2, 0.5, 1.5e-3 or 1/3)")
    mantissa, _, exponent = t.lower().partition("e")
    digits = sum(c.isdigit() for c in mantissa)
    if digits > MAX_TIME_DIGITS or (exponent and (len(exponent.lstrip("+-")) > 3
                                                  or abs(int(exponent)) > MAX_TIME_DIGITS)):
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is out of range: at most {MAX_TIME_DIGITS} digits and an exponent "
            f"of at most {MAX_TIME_DIGITS} (times are in any one unit: pick a nearer one)")
    try:
        return Fraction(t)
    except ZeroDivisionError:
        raise argparse.ArgumentTypeError(f"{text!r} divides by zero") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", required=True, choices=KIND_CHOICES, help="schedule to build")
    parser.add_argument(
        "--stages",
        required=True,
        type=int,
        metavar="PP",
        help="pipeline stages per model copy (devices = PP, or PP/2 for dualpipev)",
    )
    parser.add_argument(
        "--micro-batches",
        required=True,
        type=int,
        metavar="N",
        help="micro-batches per step (DualPipe: half enter from each end)",
    )
    parser.add_argument(
        "--f", type=_time, default=_time("1"), metavar="F", help="forward chunk time (default 1)"
    )
    parser.add_argument(
        "--b",
        type=_time,
        default=_time("2"),
        metavar="B",
        help="full backward chunk time (default 2)",
    )
    parser.add_argument(
        "--w",
        type=_time,
        default=_time("1"),
        metavar="W",
        help="weight-gradient part of B (default 1); B - W is the input-gradient part",
    )
    parser.add_argument(
        "--fb",
        type=_time,
        default=None,
        metavar="FB",
        help="time of an overlapped F&B pair (default F + B)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="text", help="output format (default text)"
    )
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="write here instead of standard output"
    )


def run(args: argparse.Namespace) -> int:
    import io
    import json

    from dsvc.compiler.schedules import (
        ScheduleConfigError,
        UniformCosts,
        build_schedule,
        chrome_trace,
        draw_timeline,
        simulate,
        summary_json,
        summary_text,
    )

    if args.w > args.b:
        raise UsageError(
            f"--w {args.w} is larger than --b {args.b}\n"
            "  hint: W is the weight-gradient part of the full backward B, so W <= B"
        )
    if args.format == "png" and not args.output:
        raise UsageError(
            "--format png writes an image and needs -o FILE\n  hint: add -o schedule.png"
        )
    if args.stages * args.micro_batches > MAX_SCHEDULE_CHUNKS:
        raise UsageError(
            f"--stages {args.stages} x --micro-batches {args.micro_batches} is more than the "
            f"{MAX_SCHEDULE_CHUNKS:,} schedule chunks dsvc builds (docs/limits.md)\n"
            "  hint: the bubble formulas scale; try smaller numbers"
        )
    try:
        schedule = build_schedule(args.kind, args.stages, args.micro_batches)
    except ScheduleConfigError as err:
        raise UsageError(str(err) + (f"\n  hint: {err.hint}" if err.hint else "")) from None
    costs = UniformCosts(args.f, args.b, args.w, args.fb)
    result = simulate(schedule, costs)

    if args.format == "png":
        image = io.BytesIO()
        draw_timeline(result, image)
        write_output(args.output, image.getvalue())
        print(f"wrote {args.output}")
        return 0
    if args.format == "json":
        text = json.dumps(summary_json(result, costs), indent=1) + "\n"
    elif args.format == "chrome":
        text = json.dumps(chrome_trace(result)) + "\n"
    else:
        text = summary_text(result, costs)
    if args.output:
        write_output(args.output, text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0
