"""Which fused SDPA kernel MLA's head dimensions get, and what each backend costs.

    python bench/attention_gpu.py [--seq 2048] [--batch 4]

The generated program (docs/program.md) runs the attention core through
`F.scaled_dot_product_attention`, causal, in bf16. MLA's q/k head dimension differs from
v's (DeepSeek-V3: 192 = 128 + 64 rope against 128; the bench spec: 96 against 64), which
torch's flash backend does not take. For each shape this times forward + backward with
torch's default choice and with each backend alone (flash, memory-efficient, cuDNN,
math), skipping those that refuse the shape, and the flash backend on v zero-padded to
the qk width (the output cut back: more FLOPs, the flash kernel), checks each output
against the math backend's, and names the backend whose time the default matches. Without CUDA it says
so and exits 0.
"""

from __future__ import annotations

import argparse
import sys

# (name, heads, qk head dim, v head dim)
SHAPES = (("deepseek_v3", 128, 192, 128), ("bench_1b", 16, 96, 64), ("equal dims", 16, 128, 128))


def _time(fn, reps: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _choice(q, k, v, backends, times, default) -> str:
    """The backend torch picks for these inputs (its dispatcher's own choice, a private
    function that may move: then the backend alone whose time is closest to the
    default's)."""
    import torch

    try:
        value = int(torch._fused_sdp_choice(q, k, v, is_causal=True))
        return next(n for n, b in backends.items() if int(b.value) == value)
    except (AttributeError, RuntimeError, StopIteration, TypeError):
        if not times:
            return "?"
        return min(times, key=lambda n: abs(times[n] - default)) + " (by time)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        print("attention_gpu: no CUDA device here; nothing to measure")
        return 0
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    print(
        f"attention_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"batch {args.batch} x seq {args.seq}, causal, bf16, forward + backward"
    )
    print(
        "\n| shape | heads | qk / v dim | default (ms) | "
        + " | ".join(f"{n} (ms)" for n in backends)
        + " | flash, v padded to the qk dim (ms) | default is |"
    )
    print("|---|---|---|---|" + "---|" * len(backends) + "---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, h, dqk, dv in SHAPES:
        b, s = args.batch, args.seq
        q, k = (
            torch.randn(b, h, s, dqk, device="cuda", generator=gen, dtype=torch.bfloat16)
            for _ in range(2)
        )
        v = torch.randn(b, h, s, dv, device="cuda", generator=gen, dtype=torch.bfloat16)
        do = torch.randn(b, h, s, dv, device="cuda", generator=gen, dtype=torch.bfloat16)
        leaves = [t.requires_grad_(True) for t in (q, k, v)]

        def step(leaves=leaves, do=do):
            out = F.scaled_dot_product_attention(*leaves, is_causal=True)
            torch.autograd.grad(out, leaves, do)
            return out

        with sdpa_kernel([SDPBackend.MATH]):
            ref_out = F.scaled_dot_product_attention(*leaves, is_causal=True)
            ref_grads = [g.float() for g in torch.autograd.grad(ref_out, leaves, do)]
            ref = ref_out.detach().float()
        cells, times = [], {}
        default = _time(step)
        for label, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    out = step().float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    times[label] = _time(step)
                cells.append(f"{times[label]:.2f} (err {err:.1e})")
            except RuntimeError as e:
                cells.append(f"refused ({str(e).splitlines()[0][:40]})")
        # the flash kernel takes equal head dims only: v zero-padded to the qk width and
        # the output cut back (the padded columns' gradient is dropped), at (2 qk) / (qk +
        # v) of the attention FLOPs
        def padded(leaves=leaves, do=do, dv=dv, dqk=dqk):
            qq, kk, vv = leaves
            out = F.scaled_dot_product_attention(qq, kk, F.pad(vv, (0, dqk - dv)),
                                                 is_causal=True)[..., :dv]  # fmt: skip
            return out, torch.autograd.grad(out, leaves, do)

        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                out, grads = padded()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                for g, r in zip(grads, ref_grads):  # the gradients too: the pad's are dropped
                    err = max(err, ((g.float() - r).norm() / r.norm()).item())
                pad_cell = f"{_time(padded):.2f} (err {err:.1e})"
        except RuntimeError as e:
            pad_cell = f"refused ({str(e).splitlines()[0][:40]})"
        match = _choice(q, k, v, backends, times, default)
        print(
            f"| {name} | {h} | {dqk} / {dv} | {default:.2f} | "
            + " | ".join(cells)
            + f" | {pad_cell} | {match} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
