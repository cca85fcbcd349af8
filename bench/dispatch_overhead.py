"""Host time per eager torch op on one-element tensors: the floor of what the runtime's ops cost the host.

    python bench/dispatch_overhead.py [--ops 20000] [--device cpu|cuda]

Eager PyTorch spends host time on every op (Python, the dispatcher, autograd's node,
the allocator, on a GPU the launch), whatever the op computes. On tensors of one
element that time is all there is: this runs a chain of element-wise ops with autograd
(forward and backward, as the trainer's elementwise work runs) and divides the wall
time by the ops issued, beside the same chain under `torch.no_grad()` for the bare
dispatch. On a GPU (`--device cuda`) it synchronises once at the end, so it measures
what the host can issue, not the device. The simulator's `host_s_per_op`
(compiler/costs/calibration.json) was this reading until 2026-12-07; it now comes from
bench/host_cpu.py's eager block (real ops cost more than these), and this is the floor
beside it; bench/RESULTS.md keeps both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import source_tree  # noqa: F401  (dsvc from this tree, installed or not)


def chain(x, n: int):
    for _ in range(n // 4):
        x = (x * 1.0001 + 0.5).relu() - 0.25
    return x


def measure(torch, device: str, ops: int, grad: bool) -> float:
    x = torch.ones(1, device=device, requires_grad=grad)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        y = chain(x, ops)
        if grad:
            y.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    issued = ops * (2 if grad else 1)  # each forward op has a backward op
    return statistics.median(times) / issued


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=20000)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("dispatch_overhead: no CUDA device here")
        return 0
    bare = measure(torch, args.device, args.ops, grad=False)
    with_grad = measure(torch, args.device, args.ops, grad=True)
    print(f"torch {torch.__version__}, {args.device}: {bare * 1e6:.2f} us per op without "
          f"autograd, {with_grad * 1e6:.2f} us per op with autograd (forward and backward ops "
          f"counted), one-element tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
