"""bf16 routed experts on one GPU: torch._grouped_mm against the per-expert loop it replaced.

    python bench/moe_gpu.py [--hidden 2048] [--tokens 8192] [--experts 64] [--top-k 6]
                            [--intermediate 1408] [--iters 10] [--cpu-smoke]

One MoE layer of the runtime (router, single-rank route, routed experts in bf16, one
shared expert), forward and backward, on one EP rank:

  1. correctness: the grouped GEMMs' output and gradients against the loop's
     (`runtime.moe._GROUPED_MM = False`), same inputs, same parameters;
  2. host synchronisation: the grouped layer's forward and backward under
     `torch.cuda.set_sync_debug_mode("error")`, which raises at the first operation
     that waits for the GPU from the host (the loop reads every expert's row count);
  3. time per forward + backward, grouped / loop, both measured in this run.

Without CUDA it says so and exits 0; `--cpu-smoke` runs steps 1 and 3 on tiny sizes
in this process (checks the script, times nothing meaningful).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import source_tree  # noqa: E402,F401  (dsvc from this tree, installed or not)
import torch


def build(args, device):
    from dsvc.runtime import moe
    from dsvc.runtime.ep import ExpertComm
    from dsvc.runtime.init import init_parameters
    from dsvc.runtime.plan import parse_plan
    from dsvc.runtime.tiny import tiny_plan

    raw = tiny_plan(pp=1, dp=1, ep=1, num_layers=2, precision="bf16")
    raw["model"]["hidden"] = args.hidden
    raw["model"]["ffn"]["moe"].update(
        routed=args.experts, top_k=args.top_k, intermediate=args.intermediate, shared=1,
        shared_intermediate=args.intermediate, groups=1, top_groups=1, seq_aux_loss=0.0,
    )  # fmt: skip
    raw["experts"]["moe"]["per_rank"] = [list(range(args.experts))]
    raw["experts"]["moe"]["group_of_expert"] = [0] * args.experts
    plan = parse_plan(raw)
    comm = ExpertComm(plan.experts["moe"], 0, None, "bf16", "bf16")
    layer = moe.MoE(plan.model, plan.model.ffn["moe"], plan.precision, comm)
    init_parameters(layer, 0, 0.02)
    layer.experts.to(torch.bfloat16)  # stored as the GEMMs read them: no cast per step
    return layer.to(device)


def fwd_bwd(layer, x, g):
    x = x.detach().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad


def timed(layer, x, g, iters: int, sync) -> float:
    for _ in range(2):
        fwd_bwd(layer, x, g)
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fwd_bwd(layer, x, g)
        sync()
        times.append(time.perf_counter() - t0)
    layer.zero_grad(set_to_none=True)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    args = p.parse_args(argv)
    from dsvc.runtime import moe

    if args.cpu_smoke:
        args.hidden, args.tokens, args.experts, args.top_k, args.intermediate = 64, 96, 8, 2, 32
        args.iters = 2
        device, sync = torch.device("cpu"), lambda: None
    elif not torch.cuda.is_available():
        print("moe_gpu: no CUDA device here; nothing to time (run it on a GPU)")
        return 0
    else:
        device, sync = torch.device("cuda"), torch.cuda.synchronize
    if not moe._GROUPED_MM:
        print(f"moe_gpu: torch {torch.__version__} has no usable torch._grouped_mm (needs 2.9+)")
        return 0
    torch.manual_seed(0)
    layer = build(args, device)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=torch.bfloat16)
    g = torch.randn_like(x)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}: one MoE layer, hidden {args.hidden}, "
          f"{args.tokens} tokens, {args.experts} experts (top {args.top_k}, intermediate "
          f"{args.intermediate}) + 1 shared, bf16, one EP rank")  # fmt: skip
    failures = []
    calls, real = [], torch._grouped_mm

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    torch._grouped_mm = counted
    try:
        y_grouped, dx_grouped = fwd_bwd(layer, x, g)
    finally:
        torch._grouped_mm = real
    print(f"grouped GEMM calls in one forward: {len(calls)} (gate, up, down)")
    if len(calls) != 3:
        failures.append("the routed experts did not run as three grouped GEMMs")
    grads = [p.grad.float().clone() for p in layer.experts.parameters()]
    layer.zero_grad(set_to_none=True)
    moe._GROUPED_MM = False
    try:
        y_loop, dx_loop = fwd_bwd(layer, x, g)
        grads_loop = [p.grad.float() for p in layer.experts.parameters()]
        layer.zero_grad(set_to_none=True)
        loop_s = timed(layer, x, g, args.iters, sync)
    finally:
        moe._GROUPED_MM = True
    pairs = [("output", y_grouped, y_loop), ("input grad", dx_grouped, dx_loop)]
    pairs += [(f"grad {n}", a, b) for n, a, b in zip(("gate", "up", "down"), grads, grads_loop)]
    for label, a, b in pairs:
        err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
        ok = err <= 1e-2  # bf16 GEMMs summed in another order (CUTLASS vs one per expert)
        print(f"correctness: {label}: relative error {err:.1e} (limit 1e-2)")
        failures += [] if ok else [label]
    if failures:
        print(f"FAILED correctness: {', '.join(failures)}; nothing timed")
        return 1
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            fwd_bwd(layer, x, g)
            print("host synchronisation: none in the grouped layer's forward and backward")
        except RuntimeError as err:
            print(f"host synchronisation: {str(err).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
            layer.zero_grad(set_to_none=True)
    grouped_s = timed(layer, x, g, args.iters, sync)
    print(f"forward + backward: grouped {grouped_s * 1e3:.2f} ms, loop {loop_s * 1e3:.2f} ms, "
          f"grouped / loop {grouped_s / loop_s:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
