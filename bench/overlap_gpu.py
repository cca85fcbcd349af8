"""Dual micro-batch overlap on one GPU: one MoE layer's overlapped F&B vs the same work in sequence.

    python bench/overlap_gpu.py [--hidden 4096] [--batch 1] [--tokens 4096] [--experts 32]
                                [--top-k 8] [--repeat 1,16,64] [--iters 10]
    python bench/overlap_gpu.py --build .gpu_build/overlap_layer [--repeat 1,16]
    python bench/overlap_gpu.py --cpu-smoke      (checks the --build path on a CPU: a tiny
                                                  build, the kernels under TRITON_INTERPRET=1)

One GPU has no peers, so every all-to-all of the layer (dispatch, combine and
their backwards, and the small per-expert count exchange) is replaced by a
device-to-device copy of the same bytes on its own CUDA stream
(`runtime.overlap.CopyTransport`). One F&B pair is the forward of micro-batch
X and the backward of micro-batch Y through one MLA + MoE layer (the runtime's
`StageModule`, bf16), timed three ways per iteration (wall clock between
device synchronisations; Y's forward runs untimed before each):

  sequential, no comm     exchanges hand back their input (nothing moves)
  sequential              forward, then backward; each copy waited for at once
  overlapped              `OverlapSession`: the halves alternate at the exchanges

exposed comm = sequential - no comm; hidden fraction = (sequential -
overlapped) / exposed comm. `--repeat R` copies each exchange's bytes R times,
a link R times slower than HBM (an H800's 40 GB/s IB is ~100x slower than a
device copy). Without CUDA it says so and exits 0.

Without `--build` the layer is the runtime's eager modules in bf16 (routed experts one
GEMM each in a Python loop, with host synchronisations: CPU-bound at one sequence).
`--build DIR` (a compiled bench/specs/overlap_layer.dsv: `dsvc compile
bench/specs/overlap_layer.dsv -o DIR`, done where the compiler is installed) runs the
build's MoE layer as its generated stage program in FP8 (docs/program.md): fused
kernels, grouped expert GEMMs, one host read of the row counts per route, the dispatch in
FP8 and the combine in bf16 as the build's precision says; the shapes and the batch are
the build's (its train.micro_batch x train.seq_len tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import source_tree  # noqa: E402,F401  (dsvc from this tree, installed or not)
import torch
from trainer_gpu import SMOKE_SPEC, compile_build

from dsvc.runtime.overlap import CopyTransport, InFlight, OverlapSession
from dsvc.runtime.program import release_weights


class NullTransport:
    """Exchanges that move nothing: the compute-only baseline."""

    def active(self, group, num_dest):
        return True

    def start(self, tensors, out_splits, in_splits, group):
        return InFlight([t.view_as(t) for t in tensors])


class RepeatedCopy(CopyTransport):
    """The same bytes copied `repeat` times: a link that many times slower than a copy."""

    def __init__(self, device, repeat: int):
        super().__init__(device)
        self.repeat = repeat

    def start(self, tensors, out_splits, in_splits, group):
        handle = None
        for _ in range(self.repeat):
            handle = super().start(tensors, out_splits, in_splits, group)
        return handle


def layer_plan(args) -> dict:
    from dsvc.runtime.tiny import tiny_plan

    raw = tiny_plan(pp=1, dp=1, ep=1, num_layers=2, seq_len=args.tokens, precision="bf16")
    m = raw["model"]
    m.update(hidden=args.hidden, max_seq_len=args.tokens)
    m["attention"]["mla"].update(
        heads=args.hidden // 128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128,
        qk_rope_dim=64, v_dim=128,
    )  # fmt: skip
    m["ffn"]["moe"].update(
        routed=args.experts, top_k=args.top_k, intermediate=args.intermediate, shared=1,
        shared_intermediate=args.intermediate, groups=1, top_groups=1, seq_aux_loss=0.0,
    )  # fmt: skip
    m["mtp"]["depth"] = 0
    raw["experts"]["moe"]["per_rank"] = [list(range(args.experts))]
    raw["experts"]["moe"]["group_of_expert"] = [0] * args.experts
    raw["stages"][0].update(mtp=False)
    return raw


def build(args, device):
    from dsvc.runtime.ep import ExpertComm
    from dsvc.runtime.init import init_parameters
    from dsvc.runtime.model import StageModule
    from dsvc.runtime.plan import Stage, parse_plan

    plan = parse_plan(layer_plan(args))
    comm = ExpertComm(plan.experts["moe"], 0, None, "bf16", "bf16")
    layer = StageModule(plan, Stage(0, 0, "A", (1,), False, False, False), {"moe": comm})
    init_parameters(layer, 0, 0.02)
    return layer.to(device), comm


def build_program(build: str, device):
    """(layer, comm, shape): the build's first MoE layer as one stage module whose block runs
    the build's generated program on its kernel module (FP8), its expert exchange, and the
    (batch, tokens, hidden) of one micro-batch."""
    from dsvc.runtime import fp8, program
    from dsvc.runtime.ep import ExpertComm
    from dsvc.runtime.init import init_parameters
    from dsvc.runtime.model import StageModule
    from dsvc.runtime.plan import Stage, parse_plan

    path = os.path.join(build, "plan.json")
    with open(path) as f:
        raw = json.load(f)
    raw["precision"]["fp8_backend"] = "triton"
    fp8.use_kernels(os.path.join(build, "kernels", "fp8_kernels.py"))
    plan = parse_plan(raw, path)
    m = plan.model
    index = next((i for i, lay in enumerate(m.layers) if m.ffn[lay.ffn].kind == "moe"), None)
    if index is None:
        raise SystemExit(f"overlap_gpu: {build} has no MoE layer")
    ffn = m.layers[index].ffn
    comm = ExpertComm(plan.experts[ffn], 0, None, plan.precision.dispatch,
                      plan.precision.combine)
    layer = StageModule(plan, Stage(0, 0, "A", (index,), False, False, False), {ffn: comm})
    init_parameters(layer, 0, 0.02)
    layer = layer.to(device)
    prog = program.load_program(os.path.join(build, "program.py"))
    attached, total = program.attach_program([layer], prog, plan, "triton")
    if not attached:
        raise SystemExit(f"overlap_gpu: the program runs none of {total} blocks: "
                         f"{program.program_mismatch(prog, plan)}")
    return layer, comm, (plan.train.micro_batch, plan.train.seq_len, m.hidden)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_pair(layer, comm, x_f, x_b, g_b, interleave: bool) -> float:
    """Seconds for one F&B pair (Y's forward first, untimed)."""
    comm.session = None
    y_b = layer(x_b)
    _sync(x_b.device)
    session = OverlapSession("0F1", "0B0", interleave=interleave)
    comm.session = session
    t0 = time.perf_counter()
    session.run(lambda: layer(x_f), lambda: torch.autograd.backward(y_b, g_b))
    _sync(x_b.device)
    comm.session = None
    release_weights([layer])  # the step's end: the next pair quantises its weights anew
    return time.perf_counter() - t0


def measure(layer, comm, inputs, transport, interleave: bool, iters: int) -> float:
    comm.transport = transport
    for _ in range(2):
        one_pair(layer, comm, *inputs, interleave)
    times = [one_pair(layer, comm, *inputs, interleave) for _ in range(iters)]
    layer.zero_grad(set_to_none=True)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--repeat", default="1,16,64", help="copy repeats to time, comma-separated")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--build", help="a compiled bench/specs/overlap_layer.dsv: time its MoE layer "
                   "as the generated program (FP8) instead of the eager bf16 modules")
    p.add_argument("--cpu-smoke", action="store_true", help="check --build on a CPU")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
        if args.build is None:
            args.build = compile_build(str(SMOKE_SPEC), tempfile.mkdtemp(prefix="dsvc-ovl"))
        args.iters, args.repeat = 1, "1,2"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("overlap_gpu: no CUDA device here; nothing to time (run it on a GPU)")
        return 0
    else:
        device = torch.device("cuda")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}")
    if args.build:
        # the compiler's launch configs, as bench/trainer_gpu.py launches them (autotuning
        # every kernel of the layer would take most of the step's time limit)
        os.environ.setdefault("DSVC_FP8_AUTOTUNE", "0")
        layer, comm, shape = build_program(os.path.abspath(args.build), device)
        blk = next(b for b in layer.modules() if getattr(b, "program", None) is not None)
        ffn = blk.mlp.ffn
        print(
            f"one MLA + MoE layer of {args.build}, the generated program (FP8): hidden "
            f"{shape[2]}, {shape[0]} x {shape[1]} tokens, {ffn.routed} experts (top "
            f"{ffn.top_k}, intermediate {ffn.intermediate}) + {ffn.shared} shared"
        )
    else:
        layer, comm = build(args, device)
        shape = (args.batch, args.tokens, args.hidden)
        slot_mb = args.batch * args.tokens * args.top_k * args.hidden * 2 / 1e6
        print(
            f"one MLA + MoE layer: hidden {args.hidden}, {args.batch} x {args.tokens} tokens, "
            f"{args.experts} experts "
            f"(top {args.top_k}, intermediate {args.intermediate}) + 1 shared, bf16; "
            f"{slot_mb:.0f} MB per dispatch or combine"
        )
    inputs = tuple(torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3))
    base = measure(layer, comm, inputs, NullTransport(), False, args.iters)
    base_ovl = measure(layer, comm, inputs, NullTransport(), True, args.iters)
    print(f"no comm: sequential {base * 1e3:.3f} ms, overlapped {base_ovl * 1e3:.3f} ms "
          "(the cost of alternating the halves on two threads)")  # fmt: skip
    print(f"{'repeat':>6} {'no comm ms':>11} {'sequential':>11} {'overlapped':>11} "
          f"{'exposed':>8} {'hidden':>7}")  # fmt: skip
    for repeat in (int(r) for r in args.repeat.split(",")):
        transport = RepeatedCopy(device, repeat)
        seq = measure(layer, comm, inputs, transport, False, args.iters)
        ovl = measure(layer, comm, inputs, transport, True, args.iters)
        exposed = seq - base
        hidden = (seq - ovl) / exposed if exposed > 0 else float("nan")
        print(f"{repeat:>6} {base * 1e3:>11.3f} {seq * 1e3:>11.3f} {ovl * 1e3:>11.3f} "
              f"{exposed * 1e3:>8.3f} {hidden:>7.1%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
