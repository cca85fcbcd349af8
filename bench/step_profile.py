"""Where one training step's time goes on a GPU: its kernels by kind, and the GPU's idle time.

`profile_step(step, kernel_module)` runs `step()` once under torch.profiler and reads
the trace it exports (Chrome trace JSON, the format torch has kept across releases).
`summarise(trace, wall_s, generated)` turns the trace's device events into:

- the step's wall time (the caller's clock, the step synchronised), the GPU's busy
  time (the union of its kernels', copies' and fills' intervals) and the rest, idle:
  time the GPU waited for the host (a launch-bound step) or for a synchronisation;
- kernels and host launch calls per step;
- GPU time by kind of kernel (`KINDS`), the kernels taking the most, and every kernel's
  calls and time by name.

Kernel kinds come from the kernel's name: the build's generated Triton kernels are
known by name (`generated_kernels(module)`: its GEMMs apart from its fused and
quantisation kernels); the rest by the names torch's and NVIDIA's libraries give
theirs. bench/trainer_gpu.py `--profile` prints this for each mode it times; the
simulator's breakdown (bench/simulate_vs_measured.py) is what it is held against.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time

# kinds of GPU work, in the order the summary lists them
KINDS = (
    "FP8 GEMMs (generated)",
    "fused and quantisation kernels (generated)",
    "BF16 GEMMs (cuBLAS)",
    "attention core (SDPA)",
    "torch.compile kernels",
    "torch element-wise and reductions",
    "copies and fills",
    "communication (NCCL)",
)
_ATTENTION = ("flash", "fmha", "attention", "sdpa", "attn")
_LIBRARY_GEMM = ("gemm", "xmma", "nvjet", "cutlass", "cublas", "wgmma")
_DEVICE_CATS = {"kernel": None, "gpu_memcpy": "copies and fills", "gpu_memset": "copies and fills"}


def generated_kernels(module) -> set[str]:
    """Names of the Triton kernels a generated kernel module defines (autotuned ones
    included: an autotuner wraps its JIT function as `.fn`)."""
    from sm90_compile import jit_function  # this script's neighbour in bench/

    fns = (jit_function(value) for value in vars(module).values())
    return {fn.__name__ for fn in fns if fn is not None}


def kernel_kind(name: str, generated: set[str]) -> str:
    """The kind (one of `KINDS`) of a kernel called `name`."""
    low = name.lower()
    base = name.split("(")[0].strip()
    if base in generated or any(base.startswith(g + "_") for g in generated):
        gemm = "gemm" in low or "wgrad" in low
        return KINDS[0] if gemm else KINDS[1]
    if base.startswith("triton_"):  # inductor's names: triton_poi_fused_..., triton_red_...
        return "torch.compile kernels"  # (before attention: one may fuse around SDPA's name)
    if "nccl" in low:
        return "communication (NCCL)"
    if any(a in low for a in _ATTENTION):
        return "attention core (SDPA)"
    if any(g in low for g in _LIBRARY_GEMM):
        return "BF16 GEMMs (cuBLAS)"
    return "torch element-wise and reductions"


def _union(intervals) -> float:
    """Total length covered by (start, end) intervals."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summarise(trace: dict, wall_s: float, generated: set[str], top: int = 10) -> dict:
    """The step's breakdown from a Chrome trace (microsecond timestamps)."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    device, launches = [], 0
    for ev in events:
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        cat = ev.get("cat", "")
        if cat in _DEVICE_CATS:
            kind = _DEVICE_CATS[cat] or kernel_kind(ev.get("name", ""), generated)
            start, dur = float(ev.get("ts", 0.0)), float(ev.get("dur", 0.0))
            device.append((ev.get("name", ""), kind, start, start + dur))
        elif cat in ("cuda_runtime", "cuda_driver") and "launch" in ev.get("name", "").lower():
            launches += 1
    busy = _union((s, e) for _, _, s, e in device) / 1e6
    by_kind = {k: [0, 0.0] for k in KINDS}
    by_name: dict[str, list] = {}
    for name, kind, s, e in device:
        by_kind[kind][0] += 1
        by_kind[kind][1] += (e - s) / 1e6
        row = by_name.setdefault(name, [kind, 0, 0.0])
        row[1] += 1
        row[2] += (e - s) / 1e6
    heaviest = sorted(by_name.items(), key=lambda kv: -kv[1][2])[:top]
    return {
        "wall_s": wall_s,
        "gpu_busy_s": busy,
        "gpu_idle_s": max(0.0, wall_s - busy),
        "kernels": sum(1 for _, kind, _, _ in device if kind != "copies and fills"),
        "device_events": len(device),
        "host_launch_calls": launches,
        "by_kind": {k: {"events": n, "gpu_s": t} for k, (n, t) in by_kind.items() if n},
        "top": [{"name": n, "kind": k, "calls": c, "gpu_s": t} for n, (k, c, t) in heaviest],
        # every kernel by name (bench/simulate_vs_measured.py sets the fused ones beside
        # the simulator's bytes for them)
        "by_name": {n: {"kind": k, "calls": c, "gpu_s": t} for n, (k, c, t) in by_name.items()},
    }


def profile_step(step, generated: set[str], keep: str | None = None) -> dict:
    """Run `step()` once under torch.profiler (CPU and, where there is one, CUDA
    activity), synchronised, and summarise it; `keep`: also write the trace there
    (gzipped JSON, for chrome://tracing or Perfetto)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    if keep:
        with gzip.open(keep, "wt", encoding="utf-8") as f:
            json.dump(trace, f)
    summary = summarise(trace, wall, generated)
    summary["cuda"] = cuda
    return summary


def format_summary(mode: str, s: dict) -> str:
    """A few lines and a table for one mode's profiled step."""
    wall, busy = s["wall_s"], s["gpu_busy_s"]
    lines = [f"\n{mode}: one step under the profiler"]
    if not s["device_events"]:
        why = ("the profiler recorded no GPU activity (CUPTI unavailable?)" if s.get("cuda")
               else "no GPU activity recorded (host-only run)")  # fmt: skip
        lines.append(f"  {wall:.3f} s; {why}")
        return "\n".join(lines)
    lines.append(
        f"  wall {wall:.3f} s (the profiler's overhead included); GPU busy {busy:.3f} s "
        f"({100 * busy / wall:.0f}%), idle {s['gpu_idle_s']:.3f} s; {s['kernels']} kernels, "
        f"{s['host_launch_calls']} host launch calls"
    )
    # kernels of one kind may overlap (streams): a kind's share can pass 100%
    lines.append("\n| kind | events | GPU ms | share of busy |\n|---|---|---|---|")
    for kind, row in s["by_kind"].items():
        share = 100 * row["gpu_s"] / busy if busy else 0.0
        lines.append(f"| {kind} | {row['events']} | {1e3 * row['gpu_s']:.1f} | {share:.1f}% |")
    lines.append("\n| heaviest kernels | kind | calls | GPU ms |\n|---|---|---|---|")
    for row in s["top"]:
        name = row["name"] if len(row["name"]) <= 60 else row["name"][:57] + "..."
        lines.append(f"| {name} | {row['kind']} | {row['calls']} | {1e3 * row['gpu_s']:.1f} |")
    return "\n".join(lines)
