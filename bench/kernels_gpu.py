"""Benchmark of the generated FP8 Triton kernels on one GPU (target: under 5 minutes on an H200).

Checks correctness first (kernels against the torch reference on the same device,
cuBLAS block-scaled against it too), then prints markdown tables of
  * TFLOP/s of the six DeepSeek-V3 training GEMM shapes at M = 4096 and M = 128 for
    the generated kernels (specialised to those shapes), cuBLAS block-scaled FP8
    (torch._scaled_mm) and cuBLAS BF16, with ratios, and against DeepSeek's reference
    Triton fp8_gemm as measured in bench/RESULTS.md's reference table (target: >= 1.3x at M = 4096;
    stretch: >= 0.8x cuBLAS block-scaled, geometric mean);
  * TB/s of the quantisers against a device-to-device copy (target: >= 80%), beside
    the same kernels with the interpreter's integer rounding before the cast (the path
    the first H200 run measured);
  * grouped GEMM over 8 and 32 experts with uneven token counts against a loop of
    cuBLAS block-scaled GEMMs (target: >= 0.8x);
  * the configs triton.autotune chose (persistent and 3-CTA-per-SM candidates included)
    and, at M = 128, how many ways K was split;
  * torch's scaled_dot_product_attention (causal, bf16) on MLA's head widths (query and
    key 192 or 96, value 128 or 64: the runtime's attention core), forward and backward
    TFLOP/s and their share of the BF16 peak: what compiler/costs/calibration.json's
    `attention_*_fraction` should become (they are cited assumptions until this runs).

Usage: python bench/kernels_gpu.py [--no-autotune] [--backward]
       python bench/kernels_gpu.py --cpu-smoke   (tiny shapes under TRITON_INTERPRET=1:
                                                   checks this script, measures nothing real)
Without CUDA (and without --cpu-smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Hopper's FP8 MMA keeps ~14 bits inside each 128-wide K-step before the FP32
# promotion, so on a GPU the kernels agree with an FP32 reference to ~2^-13, not 1e-5.
GPU_REL = 1e-3
GPU_BF16_REL = 1e-2  # the same with the output rounded to bf16 (8 bits)
import source_tree  # noqa: E402,F401  (dsvc from this tree, installed or not)

# DeepSeek-V3 GEMMs (N, K) -> the reference H200 TFLOP/s at M = 4096 (bench/RESULTS.md):
# (bf16 cuBLAS, FP8 cuBLAS block-scaled, DeepSeek reference Triton fp8_gemm)
V3_SHAPES = {
    (2112, 7168): (697, 1056, 516),
    (24576, 1536): (676, 999, 553),
    (32768, 512): (578, 774, 407),
    (7168, 16384): (699, 1128, 586),
    (4096, 7168): (686, 1112, 640),
    (7168, 2048): (679, 1060, 600),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    device: str
    shapes: dict
    tokens: tuple
    quant: tuple  # (M, K) of the activation quantisers
    weight: tuple  # (N, K) of the weight quantiser
    grouped_tokens: int
    grouped_shapes: tuple  # (N, K): gate+up and down of a DeepSeek-V3 expert


GPU = Sizes("cuda", V3_SHAPES, (4096, 128), (16384, 7168), (7168, 18432), 4096,
            ((4096, 7168), (7168, 2048)))  # fmt: skip
SMOKE = Sizes("cpu", {(160, 256): (1, 1, 1)}, (64,), (64, 256), (160, 256), 256, ((128, 256),))


def import_kernel_module(path, name: str, soft_round: bool = False):
    """Import a generated kernel module from `path` as `name`.

    soft_round: the module rounds to e4m3 in integer arithmetic before the cast (the
    interpreter's path; DSVC_FP8_SOFT_ROUND is read at import, set for it and restored).
    """
    import importlib.util

    before = os.environ.get("DSVC_FP8_SOFT_ROUND")
    os.environ["DSVC_FP8_SOFT_ROUND"] = "1" if soft_round else "0"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        if before is None:
            os.environ.pop("DSVC_FP8_SOFT_ROUND", None)
        else:
            os.environ["DSVC_FP8_SOFT_ROUND"] = before
    return module


def load_kernels(shapes, soft_round=False):
    """The kernel module rendered for `shapes` (jinja2 alone renders it: the GPU image has it).

    soft_round: the twin module with the integer rounding, timed beside the cast path as
    the same-run reference.
    """
    from dsvc.compiler.codegen.kernels import GemmShape, KernelConfig, render_kernels

    gemms = tuple(GemmShape(f"g{n}x{k}", n, k) for n, k in shapes)
    text = render_kernels(KernelConfig(gemms=gemms, title="DeepSeek-V3 bench shapes"))
    path = pathlib.Path(tempfile.mkdtemp(prefix="dsvc_bench_")) / "fp8_kernels.py"
    path.write_text(text, encoding="utf-8")
    return import_kernel_module(path, f"dsvc_bench_fp8_kernels_{int(soft_round)}", soft_round)


def bench_ms(fn):
    """Median milliseconds of fn (triton's do_bench on a GPU, one timed call on a CPU)."""
    import torch

    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def geomean(values):
    values = [v for v in values if v and v > 0 and not math.isnan(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def cublas_call(a, a_s, w, w_s):
    """torch._scaled_mm on the operands `runtime.fp8_cublas.gemm` uses (padded, scales laid
    out as cuBLAS needs them), built once, outside the timed region: the bench times the
    runtime's own layout, not one of its own."""
    import torch

    from dsvc.runtime.fp8_cublas import scaled_mm_operands

    mat1, mat2, scale_a, scale_b = scaled_mm_operands(a, a_s, w, w_s)
    return functools.partial(
        torch._scaled_mm, mat1, mat2, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16
    )


def _run_all(calls):
    for call in calls:
        call()


def _rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _same_bits(got, want):
    import torch

    if got.dtype == torch.float8_e4m3fn:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    return torch.equal(got, want)


def check_correctness(kernels, ref, cublas, torch, sizes):
    """Kernels against the reference on the device; exits non-zero on a mismatch."""
    dev = sizes.device
    (n, k), m = next(iter(sizes.shapes)), sizes.tokens[-1] + 3  # ragged M
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    w = torch.randn(n, k, device=dev)
    failures = []
    for name, got, want in (
        ("quantize_act", kernels.quantize_act(x), ref.quantize_act(x)),
        ("quantize_act_both", kernels.quantize_act_both(x), ref.quantize_act_both(x)),
        ("quantize_weight", kernels.quantize_weight(w), ref.quantize_weight(w)),
    ):
        same = all(_same_bits(g, r) for g, r in zip(got, want))
        print(f"correctness: {name}: {'bitwise equal' if same else 'DIFFERENT'} to the reference")
        failures += [] if same else [name]
    a, a_s = ref.quantize_act(x)
    wq, ws = ref.quantize_weight(w)
    dy_full = torch.randn(m, n, device=dev)
    dy, dy_s = ref.quantize_act(dy_full)
    # wgrad: dY^T X over the tokens, 1x128 (token-axis) scales on both operands
    dyt, dyt_s = ref.quantize_act_t(dy_full)
    xt, xt_s = ref.quantize_act_t(x)
    checks = [
        ("generated gemm", kernels.gemm(a, a_s, wq, ws, torch.float32), (a, a_s, wq, ws), GPU_REL),
        ("generated dgrad", kernels.gemm(dy, dy_s, wq.t(), ws.t(), torch.float32),
         (dy, dy_s, wq.t(), ws.t()), GPU_REL),
        ("generated wgrad", kernels.gemm(dyt, dyt_s, xt, xt_s, torch.float32),
         (dyt, dyt_s, xt, xt_s), GPU_REL),
    ]  # fmt: skip
    have_cublas = True
    try:
        checks.append(("cublas block-scaled", cublas.gemm(a, a_s, wq, ws), (a, a_s, wq, ws), 1e-2))
    except Exception as err:  # noqa: BLE001 - report it and go on without cuBLAS columns
        print(f"note: cuBLAS block-scaled FP8 unavailable: {type(err).__name__}: {err}")
        have_cublas = False
    # the persistent GEMM with a bf16 TMA-store epilogue, forced (autotuning picks it only
    # at large M, after this check): 8 "SMs", so every program walks many tiles
    m_big = 4 * sizes.tokens[0] + 3 if dev == "cuda" else m
    xb = torch.randn(m_big, k, device=dev).to(torch.bfloat16)
    ab, ab_s = ref.quantize_act(xb)
    want_b = ref.gemm(ab, ab_s, wq, ws, torch.float32)
    got_p = _forced_gemm(kernels, ab, ab_s, wq, ws, torch, sm_count=8, PERSISTENT=True)
    err = _rel_err(got_p, want_b)
    print(f"correctness: generated gemm, persistent, bf16 out: relative error {err:.1e} "
          f"(limit {GPU_BF16_REL:g})")  # fmt: skip
    failures += [] if err <= GPU_BF16_REL else ["persistent gemm"]
    offsets = torch.tensor([m // 3, m // 3, m - 1], device=dev, dtype=torch.int32)
    we, wes = ref.quantize_weight(torch.randn(3, n, k, device=dev))
    if dev == "cuda" and _ws_here(kernels, ab, wq):  # Hopper's (the interpreter ignores it)
        for label, cfg, sms in (("", _ws_config(kernels, False), None),
                                (", persistent", _ws_config(kernels, True), 8)):  # fmt: skip
            got_w = _forced_gemm(kernels, ab, ab_s, wq, ws, torch, sm_count=sms, **cfg)
            err = _rel_err(got_w, want_b)
            print(f"correctness: generated gemm, warp-specialised{label}, bf16 out: relative "
                  f"error {err:.1e} (limit {GPU_BF16_REL:g})")  # fmt: skip
            failures += [] if err <= GPU_BF16_REL else [f"warp-specialised{label} gemm"]
        with _forced(kernels, **_ws_config(kernels, False)):
            got_w = kernels.grouped_gemm(a, a_s, we, wes, offsets, torch.float32)
        err = _rel_err(got_w, ref.grouped_gemm(a, a_s, we, wes, offsets, torch.float32))
        print(f"correctness: generated grouped gemm, warp-specialised: relative error "
              f"{err:.1e} (limit {GPU_REL:g})")  # fmt: skip
        failures += [] if err <= GPU_REL else ["warp-specialised grouped gemm"]
    got = kernels.grouped_gemm(a, a_s, we, wes, offsets, torch.float32)
    want = ref.grouped_gemm(a, a_s, we, wes, offsets, torch.float32)
    for name, got_, args, limit in checks:
        err = _rel_err(got_, ref.gemm(*args, torch.float32))
        print(f"correctness: {name}: relative error {err:.1e} (limit {limit:g})")
        failures += [] if err <= limit else [name]
    err = _rel_err(got, want)
    print(f"correctness: generated grouped gemm: relative error {err:.1e} (limit {GPU_REL:g})")
    failures += [] if err <= GPU_REL else ["grouped gemm"]
    # grouped wgrad: expert starts off the 16-token grid, so the TMA tiles' edges are masked
    uneven = torch.tensor([m // 3 + 5, m // 3 + 5, m - 7], device=dev, dtype=torch.int32)
    dyt, dyt_s = kernels.quantize_act_t_grouped(torch.randn(m, n, device=dev), uneven)
    xt, xt_s = kernels.quantize_act_t_grouped(torch.randn(m, k, device=dev), uneven)
    got = kernels.grouped_gemm_wgrad(dyt, dyt_s, xt, xt_s, uneven)
    err = _rel_err(got, ref.grouped_gemm_wgrad(dyt, dyt_s, xt, xt_s, uneven))
    print(f"correctness: generated grouped wgrad: relative error {err:.1e} (limit {GPU_REL:g})")
    failures += [] if err <= GPU_REL else ["grouped wgrad"]
    if failures:
        raise SystemExit(f"FAILED correctness: {', '.join(failures)}; nothing measured")
    return have_cublas


@contextlib.contextmanager
def _forced(kernels, sm_count=None, **config):
    """The GEMMs launched with the compiler's config changed by `config` (PERSISTENT, WS),
    not autotuned; `sm_count` pretends the device has that many SMs."""
    saved = (kernels.GEMM_TABLE, dict(kernels.DEFAULT_GEMM_CONFIG), kernels._autotuning,
             kernels._sm_count)  # fmt: skip
    try:
        # the table's shapes keep their static kernel (N, K constants), with the change
        kernels.GEMM_TABLE = {shape: {d: dict(cfg, **config) for d, cfg in entry.items()}
                              for shape, entry in kernels.GEMM_TABLE.items()}  # fmt: skip
        for device in ("cpu", "gpu"):
            kernels.DEFAULT_GEMM_CONFIG[device] = dict(kernels.DEFAULT_GEMM_CONFIG[device], **config)
        kernels._autotuning = lambda t: False
        if sm_count is not None:
            kernels._sm_count = lambda device: sm_count
        yield
    finally:
        kernels.GEMM_TABLE, defaults, kernels._autotuning, kernels._sm_count = saved
        kernels.DEFAULT_GEMM_CONFIG.update(defaults)


def _ws_config(kernels, persistent: bool) -> dict:
    """The first warp-specialised config of the autotuning space, persistent or not."""
    return next(c for c in kernels.GPU_GEMM_CONFIGS
                if c.get("WS") and c["PERSISTENT"] == persistent)  # fmt: skip


def _ws_here(kernels, a, b) -> bool:
    """Whether these operands' GEMMs may run warp-specialised (TMA on Hopper)."""
    return kernels._tma_usable(a, b) and kernels._ws_usable(a)


def _forced_gemm(kernels, a, a_s, w, w_s, torch, sm_count=None, **config):
    """c = a @ w^T in bf16 (a TMA-stored epilogue) under `_forced`."""
    with _forced(kernels, sm_count, **config):
        c = torch.empty((a.shape[0], w.shape[0]), dtype=torch.bfloat16, device=a.device)
        kernels._launch_gemm(a, a_s, w, w_s, c, False, split_k=1)
        return c


def gemm_rows(kernels, torch, sizes, have_cublas):
    print("\n## GEMMs (TFLOP/s)\n")
    print("| M | N | K | split K | generated | warp-specialised | cuBLAS FP8 block | cuBLAS BF16 "
          "| gen/cuBLAS FP8 | gen/BF16 | gen/DeepSeek ref (RESULTS reference) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ws_cfg = _ws_config(kernels, False)
    ratios = {m: ([], []) for m in sizes.tokens}
    for m in sizes.tokens:
        for (n, k), (_, _, deepseek) in sizes.shapes.items():
            x = torch.randn(m, k, device=sizes.device).to(torch.bfloat16)
            w = torch.randn(n, k, device=sizes.device).to(torch.bfloat16)
            a, a_s = kernels.quantize_act(x)
            wq, ws = kernels.quantize_weight(w)
            flops = 2 * m * n * k
            run = functools.partial(kernels.gemm, a, a_s, wq, ws, torch.bfloat16)
            gen = flops / bench_ms(run) / 1e9
            wsp = math.nan  # n/a: no TMA, not Hopper, or small M (each is a compile)
            if m == max(sizes.tokens) and _ws_here(kernels, a, wq):
                with _forced(kernels, **ws_cfg):  # the first WS candidate alone (split K kept)
                    wsp = flops / bench_ms(run) / 1e9
            bf16 = flops / bench_ms(functools.partial(torch.matmul, x, w.t())) / 1e9
            cub = flops / bench_ms(cublas_call(a, a_s, wq, ws)) / 1e9 if have_cublas else math.nan
            vs_ref = f"{gen / deepseek:.2f}x" if m == 4096 else "-"
            split = kernels._pick_split_k(m, n, k, x.device)
            print(f"| {m} | {n} | {k} | {split} | {gen:.0f} | {wsp:.0f} | {cub:.0f} | {bf16:.0f} "
                  f"| {gen / cub:.2f} | {gen / bf16:.2f} | {vs_ref} |")  # fmt: skip
            ratios[m][0].append(gen / cub)
            ratios[m][1].append(gen / deepseek)
    for m, (vs_cublas, vs_ref) in ratios.items():
        line = f"M={m}: gen/cuBLAS FP8 block geometric mean {geomean(vs_cublas):.2f}x (target 0.8x)"
        if m == 4096:
            line += f"; gen/DeepSeek ref minimum {min(vs_ref):.2f}x (target 1.3x)"
        print(line)


def quantiser_rows(kernels, soft, torch, sizes):
    print("\n## Quantisers (TB/s; activations bf16 in, e4m3 + fp32 scales out)\n")
    m, k = sizes.quant
    x = torch.randn(m, k, device=sizes.device).to(torch.bfloat16)
    g = torch.randn(m, k, device=sizes.device).to(torch.bfloat16)
    w = torch.randn(*sizes.weight, device=sizes.device)
    n_x, scales = x.numel(), x.numel() // 128 * 4
    copy = 4 * n_x / bench_ms(x.clone) / 1e9
    rows = (
        ("quantize_act 1x128", 3 * n_x + scales, functools.partial(kernels.quantize_act, x)),
        ("quantize_act_both 1x128 + 128x1", 4 * n_x + 2 * scales,
         functools.partial(kernels.quantize_act_both, x)),
        ("swiglu_quant", 5 * n_x + scales, functools.partial(kernels.swiglu_quant, x, g)),
        ("swiglu_quant, g and u kept in FP8", 7 * n_x + 3 * scales,
         functools.partial(kernels.swiglu_quant, x, g, keep_inputs=True)),
        ("quantize_weight 128x128 (fp32 in)", 5 * w.numel(),
         functools.partial(kernels.quantize_weight, w)),
    )  # fmt: skip
    print("| kernel | TB/s | of copy | integer rounding first, compiler's config (TB/s) "
          "| cast / integer |")  # fmt: skip
    print("|---|---|---|---|---|")
    print(f"| device-to-device copy ({m}x{k} bf16) | {copy:.2f} | 100% | - | - |")
    for name, nbytes, run in rows:
        tbs = nbytes / bench_ms(run) / 1e9
        twin = getattr(soft, run.func.__name__) if soft is not None else None
        slow = nbytes / bench_ms(functools.partial(twin, *run.args, **run.keywords)) / 1e9 \
            if twin else math.nan
        print(f"| {name} | {tbs:.2f} | {tbs / copy:.0%} | {slow:.2f} | {tbs / slow:.2f}x |")
    print("target: quantisers >= 80% of copy (integer rounding: the interpreter's path, "
          "DSVC_FP8_SOFT_ROUND=1)")  # fmt: skip


def backward_rows(kernels, torch, sizes, have_cublas):
    """dgrad (dY W, the weight read transposed: copied K-major on each call, as the FP8
    linear's backward does) and wgrad (dY^T X over the tokens, 1x128 scales on both)."""
    m = sizes.tokens[0]
    print(f"\n## Backward GEMMs at M = {m} tokens (TFLOP/s)\n")
    print("| N | K | dgrad generated | dgrad cuBLAS FP8 | dgrad BF16 | wgrad generated "
          "| wgrad cuBLAS FP8 | wgrad BF16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n, k in sizes.shapes:
        dy = torch.randn(m, n, device=sizes.device).to(torch.bfloat16)
        x = torch.randn(m, k, device=sizes.device).to(torch.bfloat16)
        w = torch.randn(n, k, device=sizes.device).to(torch.bfloat16)
        flops = 2 * m * n * k
        dyq, dys = kernels.quantize_act(dy)
        wq, ws = kernels.quantize_weight(w)
        dyt, dyts = kernels.quantize_act_t(dy)
        xt, xts = kernels.quantize_act_t(x)
        rate = {}
        rate["dgrad gen"] = functools.partial(
            kernels.gemm, dyq, dys, wq.t(), ws.t(), torch.bfloat16
        )
        rate["dgrad bf16"] = functools.partial(torch.matmul, dy, w)
        rate["wgrad gen"] = functools.partial(kernels.gemm, dyt, dyts, xt, xts, torch.bfloat16)
        rate["wgrad bf16"] = functools.partial(torch.matmul, dy.t(), x)
        if have_cublas:
            rate["dgrad cublas"] = cublas_call(dyq, dys, wq.t().contiguous(), ws.t().contiguous())
            rate["wgrad cublas"] = cublas_call(dyt, dyts, xt, xts)
        tf = {key: flops / bench_ms(fn) / 1e9 for key, fn in rate.items()}
        cells = [
            tf.get(key, math.nan)
            for key in (
                "dgrad gen",
                "dgrad cublas",
                "dgrad bf16",
                "wgrad gen",
                "wgrad cublas",
                "wgrad bf16",
            )
        ]
        print(f"| {n} | {k} | " + " | ".join(f"{v:.0f}" for v in cells) + " |")


def grouped_rows(kernels, torch, sizes, have_cublas):
    print("\n## Grouped GEMM, uneven tokens per expert (TFLOP/s)\n")
    print("| experts | tokens | N | K | generated | warp-specialised | loop of cuBLAS FP8 block "
          "| ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    ws_cfg = _ws_config(kernels, False)
    gen = torch.Generator().manual_seed(0)
    tokens = sizes.grouped_tokens
    for num_experts in (8, 32):
        probs = torch.distributions.Dirichlet(torch.ones(num_experts)).sample()
        picks = torch.multinomial(probs, tokens, replacement=True, generator=gen)
        offsets_host = torch.cumsum(torch.bincount(picks, minlength=num_experts), 0)
        offsets = offsets_host.to(sizes.device, torch.int32)
        bounds = [0, *offsets_host.tolist()]
        for n, k in sizes.grouped_shapes:
            x = torch.randn(tokens, k, device=sizes.device).to(torch.bfloat16)
            a, a_s = kernels.quantize_act(x)
            we, wes = kernels.quantize_weight(torch.randn(num_experts, n, k, device=sizes.device))
            flops = 2 * tokens * n * k
            run = functools.partial(kernels.grouped_gemm, a, a_s, we, wes, offsets)
            ours = flops / bench_ms(run) / 1e9
            wsp = math.nan
            if _ws_here(kernels, a, we.view(-1, k)):
                with _forced(kernels, **ws_cfg):
                    wsp = flops / bench_ms(run) / 1e9
            loop = math.nan
            if have_cublas:
                calls = [
                    cublas_call(a[s:e], a_s[s:e], we[i], wes[i])
                    for i, (s, e) in enumerate(itertools.pairwise(bounds))
                    if e > s
                ]
                loop = flops / bench_ms(functools.partial(_run_all, calls)) / 1e9
            print(f"| {num_experts} | {tokens} | {n} | {k} | {ours:.0f} | {wsp:.0f} | {loop:.0f} "
                  f"| {ours / loop:.2f} |")  # fmt: skip
        # the experts' weight gradients over the same routing: dW[e] (N, K) = dY_e^T X_e
        n, k = sizes.grouped_shapes[0]
        dyt, dyt_s = kernels.quantize_act_t_grouped(
            torch.randn(tokens, n, device=sizes.device).to(torch.bfloat16), offsets
        )
        xt, xt_s = kernels.quantize_act_t_grouped(
            torch.randn(tokens, k, device=sizes.device).to(torch.bfloat16), offsets
        )
        run = functools.partial(kernels.grouped_gemm_wgrad, dyt, dyt_s, xt, xt_s, offsets)
        wgrad = 2 * tokens * n * k / bench_ms(run) / 1e9
        print(f"| {num_experts} | {tokens} | {n} | {k} (wgrad, K = tokens) | {wgrad:.0f} | - | - "
              "| - |")  # fmt: skip
    print("target: generated >= 0.8x the cuBLAS loop (token counts: Dirichlet(1), seed 0)")


# (heads, query/key width, value width, sequence, batch): DeepSeek-V3's and bench_1b's MLA
ATTENTION_SHAPES = ((128, 192, 128, 4096, 1), (16, 96, 64, 2048, 8))


def attention_rows(torch, sizes):
    """Causal SDPA as the runtime calls it (runtime/attention.py `_core`), causal FLOPs
    (scores and values over half the context), forward and forward + backward."""
    import torch.nn.functional as F

    print("\n## Attention core (torch SDPA, causal, bf16)\n")
    print("| heads | qk | v | seq | batch | forward TFLOP/s | of 989 | backward TFLOP/s | of 989 |")
    print("|---|---|---|---|---|---|---|---|---|")
    shapes = ATTENTION_SHAPES if sizes.device == "cuda" else ((2, 32, 16, 64, 1),)
    for h, dqk, dv, s, b in shapes:
        q = torch.randn(b, h, s, dqk, device=sizes.device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, h, s, dqk, device=sizes.device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, h, s, dv, device=sizes.device, dtype=torch.bfloat16, requires_grad=True)
        flops = 2 * b * h * s * (s / 2) * (dqk + dv)  # causal: half the score matrix
        forward = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
        grad = torch.randn_like(forward())

        def both(forward=forward, inputs=(q, k, v), grad=grad):
            return torch.autograd.grad(forward(), inputs, grad)

        fwd_ms = bench_ms(forward)
        both_ms = bench_ms(both)
        bwd_ms = max(both_ms - fwd_ms, 1e-9)
        f, bw = flops / fwd_ms / 1e9, 2 * flops / bwd_ms / 1e9
        print(f"| {h} | {dqk} | {dv} | {s} | {b} | {f:.0f} | {f / 989:.2f} | {bw:.0f} | "
              f"{bw / 989:.2f} |")


def tuned_configs(kernels):
    """What triton.autotune chose, per kernel and key (for the next round of tuning)."""
    tuned = getattr(kernels, "_TUNED", {})
    if not tuned:
        return
    print("\n## Configs chosen by triton.autotune\n")
    print("| kernel | key | config |")
    print("|---|---|---|")
    for (name, fixed), tuner in sorted(tuned.items(), key=lambda item: str(item[0])):
        label = name + "".join(f", {k}={v}" for k, v in fixed)  # e.g. WS=False: no TMA
        for key, cfg in getattr(tuner, "cache", {}).items():
            print(f"| {label} | {key} | {cfg} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-autotune", action="store_true", help="use the compiler's configs")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny run in the interpreter")
    parser.add_argument(
        "--backward",
        action="store_true",
        help="also time dgrad and wgrad of each shape (more compiles: ~2 min)",
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    if args.no_autotune:
        os.environ["DSVC_FP8_AUTOTUNE"] = "0"
    try:
        import torch
    except ImportError:
        print("bench/kernels_gpu.py: torch is not installed; nothing measured.")
        return 0
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench/kernels_gpu.py: no CUDA device here; this benchmark needs an NVIDIA GPU "
              "(Hopper or newer: FP8 tensor cores, TMA). Nothing measured.")  # fmt: skip
        return 0
    import triton

    from dsvc.runtime import fp8_cublas as cublas
    from dsvc.runtime import fp8_torch as ref

    sizes = SMOKE if args.cpu_smoke else GPU
    name = torch.cuda.get_device_name() if sizes.device == "cuda" else "cpu (interpreter)"
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}")
    kernels = load_kernels(sizes.shapes)
    soft = None
    if sizes.device == "cuda":
        soft = load_kernels(sizes.shapes, soft_round=True)
        soft._autotuning = lambda t: False  # the compiler's configs: no extra compiles
    have_cublas = check_correctness(kernels, ref, cublas, torch, sizes)
    # cheapest first: the GEMMs' autotuning compiles the most, so under a time limit
    # (bench/gpu_check2.sh) a cut-off run still has the quantisers and the grouped GEMMs
    quantiser_rows(kernels, soft, torch, sizes)
    grouped_rows(kernels, torch, sizes, have_cublas)
    gemm_rows(kernels, torch, sizes, have_cublas)
    if args.backward:
        backward_rows(kernels, torch, sizes, have_cublas)
    attention_rows(torch, sizes)
    tuned_configs(kernels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
