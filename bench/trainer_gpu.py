"""A compiled trainer on one GPU: FP8 with the generated kernels beside BF16 eager.

    python bench/trainer_gpu.py [--build DIR] [--steps 6] [--warmup 2] [--autotune]
                                [--profile fp8,bf16 [--trace-dir DIR]]
    python bench/trainer_gpu.py --cpu-smoke     (checks this script on a CPU: a tiny
                                                 build, the kernels under TRITON_INTERPRET=1)

Trains the ~1.1B-parameter DeepSeek-V3-like model of tests/train_specs/bench_1b.dsv
(MLA, 1 dense + 11 MoE layers of 24 routed + 1 shared experts, 4 per token, MTP
depth 1; 8 sequences of 2048 tokens per step) through the build directory's own
runtime, in the same process, twice from the same initial weights and batches:

- fp8:          the spec's precision (FP8 e4m3 linears and expert GEMMs, 1x128 / 128x128
                scales), the decoder blocks running the build's generated stage program
                (program.py: the fused kernels of kernels/fp8_kernels.py, docs/program.md);
- fp8-eager:    the same FP8 numerics through the runtime's eager modules (the generated
                GEMM and quantiser kernels, every other op unfused);
- bf16:         the same model with every linear in BF16 (torch matmuls), eager;
- bf16-compile: bf16 with every decoder block under torch.compile (regional, one
                compiled region per block, as torch recommends for repeated layers).

For each it prints the median step time, tokens/s, model TFLOP/s, MFU and peak
memory; for each mode named by `--profile`, one more step under torch.profiler: GPU
busy and idle time, GPU time by kind of kernel, the heaviest kernels
(bench/step_profile.py). Model FLOPs per token follow the DeepSeek-V3 report's convention (docs/report.md) (6 x matmul
parameters touched per token, output head included, embedding excluded, plus the
causal attention products x 3), with the MTP module's own block and head counted
because it trains; MFU divides by the card's dense BF16 peak (989 TFLOP/s on
H100/H200/H800) for both runs. The build is compiled here when `--build` is not
given (needs dsvc); on a machine without the compiler pass a build compiled
elsewhere. Without CUDA (and without --cpu-smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "train_specs" / "bench_1b.dsv"
SMOKE_SPEC = ROOT / "tests" / "train_specs" / "kernels1.dsv"
# dense peaks (TFLOP/s) by device name: (bf16, fp8)
MODES = ("fp8", "fp8-eager", "bf16", "bf16-compile")
PEAKS = {"H200": (989.0, 1979.0), "H100": (989.0, 1979.0), "H800": (989.0, 1979.0)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", help="a compiled build directory (default: compile --spec)")
    p.add_argument("--spec", default=str(SPEC), help="spec to compile when --build is not given")
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel compiles)")
    p.add_argument(
        "--modes",
        default="fp8,fp8-eager,bf16,bf16-compile",
        help=f"comma-separated, of: {', '.join(MODES)}",
    )
    p.add_argument(
        "--autotune",
        action="store_true",
        help="let triton.autotune search tile configs (slow first steps); default: "
        "launch the configs the compiler chose",
    )
    p.add_argument(
        "--profile",
        default="",
        help="comma-separated modes (or `all`) to run one more step of under torch.profiler: "
        "GPU busy and idle time, GPU time by kind of kernel, the heaviest kernels "
        "(bench/step_profile.py)",
    )
    p.add_argument("--trace-dir", help="with --profile: also keep each mode's trace here (gzipped)")
    p.add_argument("--peak-tflops", type=float, help="dense BF16 peak for MFU (default: by name)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cpu-smoke", action="store_true", help="check this script on a CPU")
    return p.parse_args(argv)


def use_build_runtime(build: str) -> None:
    """Make `import dsvc_runtime` load the build's own runtime copy, as its train.py would,
    without putting the build directory on sys.path: its `kernels/` folder would shadow
    any package of that name for the rest of the process (transformers probes one)."""
    import importlib.util

    init = os.path.join(build, "dsvc_runtime", "__init__.py")
    loaded = sys.modules.get("dsvc_runtime")
    if loaded is not None and os.path.abspath(loaded.__file__) == os.path.abspath(init):
        return
    for name in [n for n in sys.modules if n.split(".")[0] == "dsvc_runtime"]:
        del sys.modules[name]  # another build's runtime
    spec = importlib.util.spec_from_file_location(
        "dsvc_runtime", init, submodule_search_locations=[os.path.dirname(init)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["dsvc_runtime"] = module
    spec.loader.exec_module(module)


def compile_build(spec: str, out: str, overrides=()) -> str:
    """Compile `spec` (with `key=value` overrides) into `out` unless it is already built."""
    try:
        from dsvc import dsl
        from dsvc.compiler.codegen.build import build_cached
    except ImportError as err:
        sys.exit(
            f"trainer_gpu: cannot compile {spec} here ({err}); compile it where dsvc is "
            "installed (dsvc compile SPEC -o DIR) and pass --build DIR"
        )
    build_cached(dsl.load(spec, overrides), out)
    return out


def flops_per_token(raw: dict) -> float:
    """Training FLOPs per token (the DeepSeek-V3 report's convention, MTP modules included)."""
    m, seq = raw["model"], raw["train"]["seq_len"]
    d = m["hidden"]

    def attention(a):
        if a["kind"] == "mla":
            qk = a["qk_nope_dim"] + a["qk_rope_dim"]
            q = (
                d * a["q_lora_rank"] + a["q_lora_rank"] * a["heads"] * qk
                if a["q_lora_rank"]
                else d * a["heads"] * qk
            )
            kv = d * (a["kv_lora_rank"] + a["qk_rope_dim"]) + a["kv_lora_rank"] * a["heads"] * (
                a["qk_nope_dim"] + a["v_dim"]
            )
            matmul, v = q + kv + a["heads"] * a["v_dim"] * d, a["v_dim"]
        else:
            qk = v = a["head_dim"]
            matmul = d * qk * (a["heads"] + 2 * a["kv_heads"]) + a["heads"] * qk * d
        core = 2 * a["heads"] * (qk + v) * seq / 2  # scores and values, causal
        return matmul, core

    def ffn(f):
        if f["kind"] == "dense":
            return 3 * d * f["intermediate"]
        shared = f["shared"] * 3 * d * f.get("shared_intermediate", f["intermediate"])
        return f["top_k"] * 3 * d * f["intermediate"] + shared + d * f["routed"]

    head = d * m["vocab"]
    layers = list(m["layers"])
    depth = m.get("mtp", {}).get("depth", 0)
    if depth:  # each MTP module: eh_proj, one block (the last layer's kinds), the shared head
        layers += [layers[-1]] * depth
    matmul, core = head * (1 + depth) + depth * 2 * d * d, 0.0
    for layer in layers:
        am, ac = attention(m["attention"][layer["attention"]])
        matmul += am + ffn(m["ffn"][layer["ffn"]])
        core += ac
    return 6 * matmul + 3 * core


def bf16_precision(raw: dict) -> dict:
    """The spec's policy with every linear, dispatch and combine in BF16."""
    prec = copy.deepcopy(raw["precision"])
    prec.update(linear="bf16", linear_overrides={}, dispatch="bf16", combine="bf16")
    prec.pop("fp8_backend", None)
    return prec


def make_trainer(build: str, raw: dict, mode: str, device, backend: str = "triton"):
    """(trainer, plan, what the blocks run) for one mode, from the build's own runtime.
    `backend` runs the FP8 modes' ops: the build's generated kernels ("triton"), or the
    torch references they equal bit for bit ("torch": a CPU's affordable path)."""
    from dsvc_runtime import fp8
    from dsvc_runtime.mesh import build_mesh
    from dsvc_runtime.plan import parse_plan
    from dsvc_runtime.trainer import Trainer

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    r = copy.deepcopy(raw)
    if mode.startswith("bf16"):
        r["precision"] = bf16_precision(raw)
        fp8.use_kernels(None)
    else:
        r["precision"]["fp8_backend"] = backend
        if backend == "triton":
            fp8.use_kernels(os.path.join(build, "kernels", "fp8_kernels.py"))
    plan = parse_plan(r, os.path.join(build, "plan.json"))
    trainer = Trainer(plan, build_mesh(plan, device))
    blocks = ""
    if mode == "fp8":
        from dsvc_runtime import program

        prog = program.load_program(os.path.join(build, "program.py"))
        attached, total = program.attach_program(trainer.modules, prog, plan, backend)
        if not attached:
            raise RuntimeError(
                f"the generated program runs none of the {total} blocks: "
                f"{program.program_mismatch(prog, plan)}"
            )
        blocks = f"{attached} of {total} blocks generated"
    elif mode == "bf16-compile":
        from dsvc_runtime.model import Block

        compiled = [m for mod in trainer.modules for m in mod.modules() if isinstance(m, Block)]
        for blk in compiled:
            blk.compile()
        blocks = f"{len(compiled)} blocks compiled"
    return trainer, plan, blocks


def run_mode(build: str, raw: dict, mode: str, device, args) -> dict:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer, plan, blocks = make_trainer(build, raw, mode, device)
    setup_s = time.perf_counter() - t0
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        metrics = trainer.step()  # ends with host reads of the loss: synchronised
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(metrics["loss"])
        if i >= args.warmup:
            times.append(dt)
        print(f"  {mode} step {i + 1}: {dt:.3f} s, loss {metrics['loss']:.4f}", flush=True)
    step_s = statistics.median(times)
    tokens = plan.train.global_batch * plan.train.seq_len
    profiled = None
    if mode in _profiled_modes(args):
        try:
            profiled = _profile(trainer, mode, build, args)
        except Exception as err:  # noqa: BLE001 - keep the mode's timings, say what failed
            profiled = {"error": f"{type(err).__name__}: {err}"}
            print(f"  {mode}: the profiled step failed: {profiled['error']}", flush=True)
        else:
            print(f"  (unprofiled: median {step_s:.3f} s per step)", flush=True)
    out = {
        "mode": mode,
        # what ran the decoder blocks, as bench/trainer_measurements.json records a run
        "program": "generated" if mode == "fp8" else "eager",
        "blocks": blocks,
        "setup_s": setup_s,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "losses": losses,
    }
    if profiled is not None:
        out["profile"] = profiled
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del trainer
    return out


def _profiled_modes(args) -> set[str]:
    names = {m.strip() for m in args.profile.split(",") if m.strip()}
    return set(MODES) if "all" in names else names


def _profile(trainer, mode: str, build: str, args) -> dict:
    """One more step under torch.profiler, summarised (and printed) by kind of kernel."""
    import step_profile

    from dsvc_runtime.fp8_triton import load_kernel_module

    kernels = load_kernel_module(os.path.join(build, "kernels", "fp8_kernels.py"))
    keep = None
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
        keep = os.path.join(args.trace_dir, f"trace_{mode}.json.gz")
    summary = step_profile.profile_step(trainer.step, step_profile.generated_kernels(kernels), keep)
    print(step_profile.format_summary(mode, summary), flush=True)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = sorted(_profiled_modes(args) - set(MODES)) + [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"trainer_gpu: unknown mode {bad[0]!r}; expected one of {', '.join(MODES)}")
    if args.trace_dir and not args.profile:
        sys.exit("trainer_gpu: --trace-dir keeps the traces of --profile; name the modes")
    idle = sorted(_profiled_modes(args) - set(modes)) if args.profile != "all" else []
    if idle:
        print(f"trainer_gpu: --profile {', '.join(idle)}: not among --modes, not run")
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "trainer_gpu: no CUDA device here; nothing to measure "
            "(`--cpu-smoke` checks the script on a CPU)"
        )
        return 0
    if not args.autotune:
        os.environ.setdefault("DSVC_FP8_AUTOTUNE", "0")
    if args.cpu_smoke:
        args.steps, args.warmup = min(args.steps, 1), 0
        build = args.build or compile_build(str(SMOKE_SPEC), tempfile.mkdtemp(prefix="dsvc-smk"))
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        build = args.build or compile_build(args.spec, str(ROOT / "build" / "bench_1b"))
        device = torch.device("cuda")
    build = os.path.abspath(build)
    use_build_runtime(build)
    with open(os.path.join(build, "plan.json")) as f:
        raw = json.load(f)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v[0] for k, v in PEAKS.items() if k in name), None)
    fpt = flops_per_token(raw)
    t = raw["train"]
    print(
        f"trainer_gpu: {raw['source'].get('spec')} on {name}; {t['global_batch']} x "
        f"{t['seq_len']} tokens per step; {fpt / 1e9:.2f} GFLOP per token; torch "
        f"{torch.__version__}; autotune {'on' if args.autotune else 'off'}",
        flush=True,
    )
    results = []
    for mode in modes:
        try:
            res = run_mode(build, raw, mode, device, args)
        except Exception as err:  # noqa: BLE001 - report the mode's failure, run the next
            import traceback

            traceback.print_exc()
            res = {"mode": mode, "error": f"{type(err).__name__}: {err}"}
        results.append(res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _print_table(results, fpt, peak)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": name, "flops_per_token": fpt, "peak_tflops": peak, "results": results},
                f,
                indent=1,
            )
    return 0 if all("error" not in r for r in results) else 1


def _print_table(results: list[dict], fpt: float, peak: float | None) -> None:
    print(
        "\n| mode | step (s) | tokens/s | model TFLOP/s | MFU | peak mem (GB) | loss first -> last |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | failed: {r['error']} | | | | | |")
            continue
        tflops = fpt * r["tokens_per_s"] / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        mem = f"{r['peak_mem_gb']:.1f}" if "peak_mem_gb" in r else "n/a"
        label = f"{r['mode']} ({r['blocks']})" if r.get("blocks") else r["mode"]
        print(
            f"| {label} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {tflops:.1f} | "
            f"{mfu} | {mem} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |"
        )
    ok = {r["mode"]: r for r in results if "error" not in r}
    print()
    for a, b in (
        ("fp8", "bf16"),
        ("fp8", "bf16-compile"),
        ("fp8", "fp8-eager"),
        ("fp8-eager", "bf16"),
        ("bf16-compile", "bf16"),
    ):
        if a in ok and b in ok:
            speed = ok[a]["tokens_per_s"] / ok[b]["tokens_per_s"]
            first = ok[a]["losses"][0] / ok[b]["losses"][0] - 1
            mem = ""
            if "peak_mem_gb" in ok[a] and "peak_mem_gb" in ok[b]:
                mem = f"; peak memory {ok[a]['peak_mem_gb'] / ok[b]['peak_mem_gb']:.2f}x"
            print(f"{a} / {b} tokens/s: {speed:.2f}x; first-step loss {first:+.2e} (relative){mem}")
    if peak:
        print(f"MFU against the dense BF16 peak of {peak:.0f} TFLOP/s for both modes")


if __name__ == "__main__":
    sys.exit(main())
