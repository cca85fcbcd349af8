"""Dual micro-batch overlap on one GPU: one MoE layer's overlapped F&B vs the same work in sequence.

    python bench/overlap_gpu.py [--hidden 4096] [--batch 1] [--tokens 4096] [--experts 32]
                                [--top-k 8] [--repeat 1,16,64] [--iters 10]

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
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import source_tree  # noqa: E402,F401  (dsvc from this tree, installed or not)
import torch

from dsvc.runtime.overlap import CopyTransport, InFlight, OverlapSession


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


def one_pair(layer, comm, x_f, x_b, g_b, interleave: bool) -> float:
    """Seconds for one F&B pair (Y's forward first, untimed)."""
    comm.session = None
    y_b = layer(x_b)
    torch.cuda.synchronize()
    session = OverlapSession("0F1", "0B0", interleave=interleave)
    comm.session = session
    t0 = time.perf_counter()
    session.run(lambda: layer(x_f), lambda: torch.autograd.backward(y_b, g_b))
    torch.cuda.synchronize()
    comm.session = None
    return time.perf_counter() - t0


def measure(layer, comm, inputs, transport, interleave: bool, iters: int) -> float:
    comm.transport = transport
    for _ in range(2):
        one_pair(layer, comm, *inputs, interleave)
    times = [one_pair(layer, comm, *inputs, interleave) for _ in range(iters)]
    layer.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--repeat", default="1,16,64", help="copy repeats to time, comma-separated")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("overlap_gpu: no CUDA device here; nothing to time (run it on a GPU)")
        return 0
    device = torch.device("cuda")
    torch.manual_seed(0)
    layer, comm = build(args, device)
    shape = (args.batch, args.tokens, args.hidden)
    inputs = tuple(torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3))
    slot_mb = args.batch * args.tokens * args.top_k * args.hidden * 2 / 1e6
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        f"one MLA + MoE layer: hidden {args.hidden}, {args.batch} x {args.tokens} tokens, "
        f"{args.experts} experts "
        f"(top {args.top_k}, intermediate {args.intermediate}) + 1 shared, bf16; "
        f"{slot_mb:.0f} MB per dispatch or combine"
    )
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
