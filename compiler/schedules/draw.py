"""Timeline pictures of a simulated schedule, in the style of the DualPipe README figure.

One row per device; one block per action, coloured by kind (forward orange,
full backward green, input-gradient backward light green, weight-gradient
blue), darker for a second model copy (DualPipe's reverse direction) or the
second leg of a V; an overlapped F&B pair is one block split in two halves
inside a thick black border; the micro-batch number is written on each block.
matplotlib is imported only here, only when drawing.
"""

from __future__ import annotations

import errno
import os

from dsvc.runtime.actions import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
)

# (first copy / first leg, second copy / second leg) per kind
_COLOURS = {
    FORWARD: ("#fbd38d", "#ed8936"),
    FULL_BACKWARD: ("#9ae6b4", "#38a169"),
    BACKWARD_INPUT: ("#d9f99d", "#84cc16"),
    BACKWARD_WEIGHT: ("#90cdf4", "#3182ce"),
}
_LABELS = {
    FORWARD: "F forward",
    FULL_BACKWARD: "B full backward",
    BACKWARD_INPUT: "I backward for input",
    BACKWARD_WEIGHT: "W backward for weights",
}

# Micro-batch numbers: smaller than this is unreadable at the picture's 150 dpi; more than
# this many would cost matplotlib seconds to lay out (a few ms each) and crowd the picture.
_MIN_LABEL_POINTS = 4.0
_MAX_LABELS = 2000
_MAX_PIXELS = 12_000_000


def _second_legs(schedule) -> list[bool]:
    """Per stage: whether it belongs to a second copy (DualPipe) or the V's way back
    (DualPipeV); computed once, in one pass over the layout."""
    second = [False] * schedule.num_stages
    if len(schedule.chains) > 1:
        for s in schedule.chains[1].stages:
            second[s] = True
    elif schedule.num_stages > schedule.num_devices:  # V placement: the second half returns
        for s in range(schedule.num_stages // 2, schedule.num_stages):
            second[s] = True
    return second


def _corners(box: tuple[float, float, float, float]) -> tuple[tuple[float, float], ...]:
    x, y, w, h = box
    return ((x, y), (x + w, y), (x + w, y + h), (x, y + h))


def draw_timeline(result, path, *, title: str | None = None, dpi: int = 150) -> None:
    """Draw `result` (a `SimResult`) to an image file (format from the suffix, e.g. .png),
    or as PNG into a binary file object."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    schedule = result.schedule
    n = schedule.num_devices
    span = float(result.makespan) or 1.0
    handles = _legend(result)
    # Layout in inches: device labels on the left; axis label, then the legend, below.
    width_in = min(40.0, max(8.0, 0.3 * span * _unit_scale(result)))
    legend_cols = len(handles) if width_in >= 14 else min(3, len(handles))
    legend_rows = -(-len(handles) // legend_cols)
    left_in, right_in, top_in = 1.1, 0.25, 0.45
    # Rows shrink past ~95 devices so the picture stays within 40 x 40 inches (6000 pixels a
    # side at 150 dpi): hundreds of pipeline ranks otherwise ask for gigabytes of pixels.
    rows_in, bottom_in = min(40.0, 0.42 * n), 0.75 + 0.25 * legend_rows
    height_in = rows_in + top_in + bottom_in
    # at most _MAX_PIXELS: a bigger picture costs seconds to encode and shows nothing more
    dpi = min(dpi, int((_MAX_PIXELS / (width_in * height_in)) ** 0.5))
    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    axes_w = (width_in - left_in - right_in) / width_in
    ax = fig.add_axes((left_in / width_in, bottom_in / height_in, axes_w, rows_in / height_in))
    points_per_unit = 72.0 * width_in * axes_w / span

    second = _second_legs(schedule)
    boxes: list[tuple[float, float, float, float]] = []  # x0, y0, width, height
    colours: list[str] = []
    outlines: list[tuple[float, float, float, float]] = []
    labels: list[tuple[float, float, str, float]] = []

    def block(x0, x1, y0, y1, kind, stage, text):
        boxes.append((x0, y0, x1 - x0, y1 - y0))
        colours.append(_COLOURS[kind][1 if second[stage] else 0])
        size = min(8.0, (x1 - x0) * points_per_unit / (0.65 * max(1, len(text))), (y1 - y0) * 60)
        if size >= _MIN_LABEL_POINTS:
            labels.append(((x0 + x1) / 2, (y0 + y1) / 2, text, size))

    for row in result.timeline:
        for t in row:
            x0, x1 = float(t.start), float(t.end)
            top, bottom = t.device + 0.08, t.device + 0.92  # device 0 drawn at the top
            if t.action.kind == OVERLAP_F_B:
                f, b = t.action.sub_actions
                mid = (top + bottom) / 2
                block(x0, x1, top, mid, f.kind, f.stage, str(f.microbatch))
                block(x0, x1, mid, bottom, b.kind, b.stage, str(b.microbatch))
                outlines.append((x0, top, x1 - x0, bottom - top))
            else:
                a = t.action
                block(x0, x1, top, bottom, a.kind, a.stage, str(a.microbatch))
    # One collection per layer of blocks: a patch added one at a time costs matplotlib a
    # limits update each, which made large timelines take minutes.
    ax.add_collection(PolyCollection([_corners(b) for b in boxes], facecolors=colours,
                                     edgecolors="#4a5568", linewidths=0.4))
    if outlines:
        ax.add_collection(PolyCollection([_corners(b) for b in outlines], facecolors="none",
                                         edgecolors="black", linewidths=1.6))
    if len(labels) <= _MAX_LABELS:  # each label costs a font layout: a crowded picture gets none
        for x, y, text, size in labels:
            ax.text(x, y, text, ha="center", va="center", fontsize=size)

    ax.set_xlim(0, span)
    ax.set_ylim(n, 0)
    ax.set_yticks([d + 0.5 for d in range(n)])
    ax.set_yticklabels(
        [f"dev {d} ({','.join(str(s) for s in schedule.device_stages(d))})" for d in range(n)],
        fontsize=min(8.0, 0.7 * 72 * rows_in / n),
    )
    ax.set_xlabel(f"time ({result.time_unit})", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.55 / rows_in),
        ncol=legend_cols,
        fontsize=8,
        frameon=False,
    )
    if title is None:
        title = (
            f"{schedule.kind}: PP={schedule.pp}, {schedule.num_devices} devices, "
            f"{schedule.num_microbatches} micro-batches; makespan {_short(result.makespan)}, "
            f"max bubble {_short(result.max_bubble)}"
        )
    ax.set_title(title, fontsize=10)
    if hasattr(path, "write"):  # a binary file object: the caller writes the bytes where it will
        fig.savefig(path, dpi=dpi, format="png")
        return
    if os.path.isdir(path):  # matplotlib would quietly write PATH.png instead
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    fig.savefig(str(path), dpi=dpi)


def _legend(result) -> list:
    """Legend entries for what the picture actually shows."""
    from matplotlib.patches import Patch

    schedule = result.schedule
    used = sorted(
        {p.kind for row in result.timeline for t in row for p in t.action.parts()},
        key=list(_COLOURS).index,
    )
    handles = [Patch(facecolor=_COLOURS[k][0], edgecolor="#4a5568", label=_LABELS[k]) for k in used]
    if any(_second_legs(schedule)):
        second = (
            "second copy (reverse direction)" if len(schedule.chains) > 1 else "second leg of the V"
        )
        handles.append(
            Patch(facecolor=_COLOURS[FORWARD][1], edgecolor="#4a5568", label=f"darker: {second}")
        )
    if any(t.action.kind == OVERLAP_F_B for row in result.timeline for t in row):
        handles.append(
            Patch(facecolor="white", edgecolor="black", linewidth=1.6, label="overlapped F&B pair")
        )
    return handles


def _unit_scale(result) -> float:
    """Width per time unit: uniform costs are small integers; seconds need a rescale."""
    if result.time_unit == "unit":
        return 1.0
    return 60.0 / float(result.makespan or 1)


def _short(x) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() else f"{x:.4g}"
