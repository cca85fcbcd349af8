"""The host's share of a decoder block: its Python and dispatch time with the GPU's work stubbed.

    python bench/host_cpu.py [--spec FILE] [--tokens 16] [--reps 12]

A step is host-bound when the host takes longer to issue a block's kernels than the GPU
takes to run them (then CUDA graphs pay). This measures the issuing side on a CPU: the
spec's first MLA + MoE block (default: the 1.1B bench spec's), forward and backward, on
the build's own kernel module loaded as for a GPU, with

- every Triton launch returning at once (`JITFunction.run` replaced: triton's own
  launcher, tens of microseconds a launch on a GPU host, is left out), and the device
  check accepting CPU tensors;
- integer outputs allocated zeroed (the router's expert ids: every token routed to
  expert 0, the same launches as any routing);
- few tokens (`--tokens`), so the torch ops the block still runs on the CPU (the
  attention core, the routing's sorts) cost little next to their dispatch.

Both the eager modules (the same stubbed kernels) and the generated program run in the
same process: it prints the median host milliseconds per forward + backward of each,
their launches, and the program / eager ratio. A GPU host's cores are faster than these:
the absolute times are an upper bound, the ratio is the figure.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the launches are stubbed, not interpreted
os.environ.setdefault("DSVC_FP8_AUTOTUNE", "0")  # the compiler's configs, no benchmarking

import argparse
import contextlib
import pathlib
import statistics
import sys
import tempfile
import time

import source_tree  # noqa: F401  (dsvc from this tree, installed or not)
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SPEC = ROOT / "tests" / "train_specs" / "bench_1b.dsv"
_INTS = (torch.int64, torch.int32, torch.int16, torch.uint8)


@contextlib.contextmanager
def stubbed_gpu(kernels, counter: dict):
    """Triton launches that return at once (counted), a device check that takes CPU
    tensors, integer tensors allocated zeroed."""
    from triton.runtime.jit import JITFunction

    real_run, real_check, real_empty = JITFunction.run, kernels._check_device, torch.empty

    def run(self, *args, grid, warmup, **kwargs):
        counter["launches"] += 1

    def check_device(**tensors):
        return next(t for t in tensors.values() if t is not None).device

    def empty(*args, **kwargs):
        if kwargs.get("dtype") in _INTS:
            return torch.zeros(*args, **kwargs)
        return real_empty(*args, **kwargs)

    JITFunction.run, kernels._check_device, torch.empty = run, check_device, empty
    try:
        yield
    finally:
        JITFunction.run, kernels._check_device, torch.empty = real_run, real_check, real_empty


def host_times(block, x, reps: int, kernels) -> tuple[list[float], int]:
    """Seconds per forward + backward of `block` (the step's end included: the FP8 weight
    copies released, the gradients dropped) and the launches of one."""
    from dsvc.runtime.program import release_weights

    counter = {"launches": 0}
    times = []
    with stubbed_gpu(kernels, counter):
        for _ in range(reps):
            counter["launches"] = 0
            xi = x.clone().requires_grad_(True)
            t0 = time.perf_counter()
            block(xi).float().sum().backward()
            release_weights([block])
            block.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return times[2:], counter["launches"]  # the first two warm the caches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=pathlib.Path, default=DEFAULT_SPEC)
    ap.add_argument("--tokens", type=int, default=16, help="tokens of the one sequence")
    ap.add_argument("--reps", type=int, default=12, help="forward + backward runs (2 warm up)")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.reps < 3:
        ap.error("--tokens must be at least 1 and --reps at least 3")
    from fusion_cpu import _first_mla_moe_layer, load_build, one_rank_block  # bench/

    from dsvc import dsl
    from dsvc.runtime import program as P

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        plan, program, kernels = load_build(dsl.load(args.spec), pathlib.Path(tmp) / "build")
        layer = _first_mla_moe_layer(plan)
        block = one_rank_block(plan, layer)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, args.tokens, plan.model.hidden, generator=gen).to(torch.bfloat16)
        eager, eager_n = host_times(block, x, args.reps, kernels)
        if not P.attach_program([block], program, plan, kernels)[0]:
            print("host_cpu: the generated program does not cover this block", file=sys.stderr)
            return 1
        prog, prog_n = host_times(block, x, args.reps, kernels)
    e, p = statistics.median(eager), statistics.median(prog)
    print(
        f"{args.spec.name} layer {layer} (MLA + MoE), forward + backward of {args.tokens} "
        f"tokens, kernels stubbed (triton's launcher left out), torch {torch.__version__}, "
        "one thread"
    )
    print("| block | host ms (median) | min | Triton launches |")
    print("|---|---|---|---|")
    print(f"| eager modules | {1e3 * e:.2f} | {1e3 * min(eager):.2f} | {eager_n} |")
    print(f"| generated program | {1e3 * p:.2f} | {1e3 * min(prog):.2f} | {prog_n} |")
    print(f"program / eager: {p / e:.2f}x the host time")
    from dsvc.compiler.costs.kernel_rates import KernelModel
    from dsvc.compiler.driver import run_until
    from dsvc.compiler.passes.simulate_program import block_host

    spec = dsl.load(args.spec)
    model = KernelModel.for_gpu_or_measured(spec.cluster.gpu)
    ops, launches = block_host(run_until(spec, "insert_comm"), model, layer)
    print(
        "the simulator's host constants (compiler/costs/calibration.json) from this run: "
        f"host_s_per_op {1e6 * e / ops:.1f} us (the {ops:.0f} eager host ops it counts for "
        f"this block; the file: {1e6 * model.host_s_per_op:.1f}), program_host_s_per_launch "
        f"{1e6 * p / launches:.1f} us (the {launches:.0f} launches it counts; the file: "
        f"{1e6 * model.program_host_s_per_launch:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
