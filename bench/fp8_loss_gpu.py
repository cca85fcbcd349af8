"""FP8 training against BF16 on natural text: the seed's claim that FP8 stays within 0.25%.

    python bench/fp8_loss_gpu.py --build DIR [--tokens FILE] [--steps 200] [--json OUT]
    python bench/fp8_loss_gpu.py --cpu-smoke     (checks this script on a CPU: a tiny
                                                  build, the kernels under TRITON_INTERPRET=1)
    python bench/fp8_loss_gpu.py --cpu [--spec S] [--seed N] [--runs fp8,fp8-eager,bf16]
                                                 (the comparison itself on a CPU, at the
                                                  size of bench/specs/loss_cpu.dsv)

Three training runs of the build's model (tests/train_specs/bench_1b.dsv on a GPU), in
this process, through the build's own runtime, from the same initial weights (the
runtime's initialisation is seeded by parameter name):

- fp8:        the spec's precision, the decoder blocks running the generated program;
- bf16:       every linear, dispatch and combine in BF16, eager;
- bf16-other: BF16 again on another stretch of the same text (a different data order):
              the noise floor, what changing nothing but the batches does to the loss.

The text is natural, never the synthetic rule data (whose loss heads to zero and says
nothing): the Python standard library's own sources as UTF-8 bytes, written here by
`dsvc tokenize --tokenizer bytes --shuffle 0` unless `--tokens` names a byte-token file.
The learning-rate schedule is stretched over --steps.

After training, each model's language-model loss is measured on the same held-out
sequences (a stretch of the file no run trained on), so the three differ only by what
training did. Printed: the loss curves' last-10% means, the held-out losses, the
relative gap fp8 / bf16 - 1 and the noise floor bf16-other / bf16 - 1; the claim holds
when |gap| <= 0.25% (and is only meaningful when the noise floor is below it too).
Without CUDA (and without --cpu-smoke or --cpu) it says so and exits 0.

--cpu trains on this machine's CPU, the FP8 runs through the torch references of the
kernels (runtime/fp8_torch.py, runtime/fused_torch.py: bit for bit the kernels' results,
so the numerics are a GPU's), at a size a CPU affords (default bench/specs/loss_cpu.dsv).
`--runs` may add fp8-eager: the same FP8 numerics through the eager modules (which apply
the routed experts' gates at the combine, as the program before it applied them in
SwiGLU), to set the program's own numerics against them; `--seed` changes the initial
weights. One thread (the same bits whatever the core count): separate seeds or runs go
side by side as separate processes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time

import numpy as np
import source_tree  # noqa: F401  (dsvc from this tree, installed or not)
from trainer_gpu import ROOT, SMOKE_SPEC, compile_build, make_trainer, use_build_runtime

from dsvc.compiler.tokenizer import BYTE_VOCAB

CLAIM = 0.0025  # FP8's loss within 0.25% of BF16's (the DeepSeek-V3 report)
# run name -> (trainer mode, data order: 1 reads the stretch after the first runs')
RUNS = {"fp8": ("fp8", 0), "fp8-eager": ("fp8-eager", 0), "bf16": ("bf16", 0),
        "bf16-other": ("bf16", 1)}  # fmt: skip
DEFAULT_RUNS = "fp8,bf16,bf16-other"
CPU_SPEC = ROOT / "bench" / "specs" / "loss_cpu.dsv"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", help="a compiled build directory (default: compile the bench spec)")
    p.add_argument("--tokens", help="a byte-token file (uint16; default: built from the stdlib)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches (global_batch each)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cpu-smoke", action="store_true", help="check this script on a CPU")
    p.add_argument("--cpu", action="store_true",
                   help="train on the CPU, FP8 through the kernels' torch references")
    p.add_argument("--spec", help=f"the spec --cpu compiles (default {CPU_SPEC})")
    p.add_argument("--seed", type=int, help="initial weights' seed (default: the spec's)")
    p.add_argument("--runs", default=DEFAULT_RUNS,
                   help=f"comma-separated, of: {', '.join(RUNS)} (default {DEFAULT_RUNS})")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown or not args.runs:
        p.error(f"--runs: unknown {', '.join(unknown) or '(none given)'}; expected of "
                f"{', '.join(RUNS)}")
    return args


def stdlib_tokens(path: str, count: int) -> int:
    """Write up to `count` byte tokens of this interpreter's standard library sources to
    `path` with `dsvc tokenize` (documents shuffled with seed 0, each ended by the byte
    tokenizer's end id; the tests left out); returns how many it wrote."""
    from dsvc.compiler.cli import main as dsvc
    from dsvc.compiler.tokenizer import record_path

    argv = ["tokenize", sysconfig.get_paths()["stdlib"], "-o", path, "--tokenizer", "bytes",
            "--glob", "*.py", "--shuffle", "0", "--max-tokens", str(count)]
    for skip in ("test", "tests", "site-packages", "idlelib"):
        argv += ["--exclude", skip]
    if dsvc(argv) != 0:
        raise SystemExit(f"fp8_loss_gpu: dsvc tokenize could not write {path}")
    with open(record_path(path)) as f:
        return json.load(f)["tokens"]


def with_text(raw: dict, tokens: str, steps: int) -> dict:
    """The plan trained on the token file, its schedule stretched over `steps`."""
    r = copy.deepcopy(raw)
    if r["model"]["vocab"] < BYTE_VOCAB:
        raise SystemExit(f"fp8_loss_gpu: the model's vocabulary of {r['model']['vocab']} cannot "
                         f"hold the {BYTE_VOCAB} byte-token ids")
    r["train"]["data"] = {"kind": "tokens", "path": os.path.abspath(tokens), "dtype": "uint16"}
    sched = r["train"].get("lr_schedule")
    if sched and sched.get("kind") == "warmup_cosine":
        sched["total_steps"] = steps
        sched["warmup_steps"] = min(sched.get("warmup_steps", 0), max(steps // 10, 1),
                                    steps - 1)  # fmt: skip
    return r


def held_out_loss(trainer, first_sample: int, batches: int) -> float:
    """The mean language-model loss of the trained model on `batches` global batches from
    `first_sample` on, forward only; MoE load and aux records are dropped after."""
    import torch

    (module,) = trainer.modules  # one stage: the bench runs on one device
    t = trainer.plan.train
    losses = []
    with torch.no_grad():
        for b in range(batches):
            rows = trainer.data.samples(first_sample + b * t.global_batch, t.global_batch)
            rows = rows.to(trainer.mesh.device)
            for mb in rows.split(t.micro_batch):
                module(mb[:, :-1].contiguous(), mb[:, 1:].contiguous())
                losses.append(float(module.loss_log[-1]["lm"]))
            module.loss_log.clear()
    for moe in trainer.moe_layers().values():
        moe.take_load()
        moe.aux_values.clear()
    return statistics.fmean(losses)


def run(build: str, raw: dict, name: str, mode: str, order: int, args, device) -> dict:
    import torch

    t = raw["train"]
    trainer, _plan, blocks = make_trainer(build, raw, mode, device, args.backend)
    per_run = args.steps * t["global_batch"]
    if order:  # the noise floor reads the stretch after the first run's
        trainer.sharder.resume_at(0, per_run)
    curve, start = [], time.perf_counter()
    for i in range(args.steps):
        m = trainer.step()
        curve.append(m["lm_loss"])
        if not np.isfinite(m["loss"]):
            raise RuntimeError(f"{name}: loss not finite at step {i + 1}")
        if (i + 1) % max(args.steps // 10, 1) == 0:
            print(f"  {name} step {i + 1}: lm loss {m['lm_loss']:.4f}", flush=True)
    took = time.perf_counter() - start
    held = held_out_loss(trainer, 2 * per_run, args.eval_batches)
    tail = curve[-max(len(curve) // 10, 1):]
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"run": name, "blocks": blocks, "train_s": took, "curve": curve,
            "last_mean": statistics.fmean(tail), "held_out": held}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    import torch

    if not (args.cpu_smoke or args.cpu) and not torch.cuda.is_available():
        print("fp8_loss_gpu: no CUDA device here; nothing to measure "
              "(`--cpu-smoke` checks the script on a CPU, `--cpu` trains there)")
        return 0
    os.environ.setdefault("DSVC_FP8_AUTOTUNE", "0")
    work = tempfile.mkdtemp(prefix="dsvc-fp8loss")
    args.backend = "torch" if args.cpu else "triton"
    if args.cpu:
        spec = args.spec or str(CPU_SPEC)
        build = args.build or compile_build(spec, os.path.join(work, "build"))
        device = torch.device("cpu")
        torch.set_num_threads(1)  # the same bits on any CPU; runs go side by side instead
    elif args.cpu_smoke:
        args.steps, args.eval_batches = min(args.steps, 2), 1
        build = args.build or compile_build(  # room for the byte tokens' 257 ids
            str(SMOKE_SPEC), os.path.join(work, "build"), (f"model.vocab={BYTE_VOCAB}",))
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not args.build:
            from trainer_gpu import SPEC

            args.build = compile_build(str(SPEC), str(ROOT / "build" / "bench_1b"))
        build, device = args.build, torch.device("cuda")
    build = os.path.abspath(build)
    use_build_runtime(build)
    with open(os.path.join(build, "plan.json")) as f:
        raw = json.load(f)
    t = raw["train"]
    need = (2 * args.steps + args.eval_batches) * t["global_batch"] * t["seq_len"] + 1
    tokens = args.tokens
    if tokens is None:
        tokens = os.path.join(work, "stdlib.bin")
        got = stdlib_tokens(tokens, need)
        print(f"fp8_loss_gpu: {got:,} byte tokens of the standard library in {tokens}")
        if got < need:
            print(f"  (fewer than the {need:,} the runs read: later samples wrap around)")
    raw = with_text(raw, tokens, args.steps)
    if args.seed is not None:
        raw["train"]["seed"] = args.seed
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"fp8_loss_gpu: {raw['source'].get('spec')} on {name}, {args.steps} steps of "
          f"{t['global_batch']} x {t['seq_len']} tokens, torch {torch.__version__}", flush=True)
    results = [run(build, raw, n, *RUNS[n], args, device) for n in args.runs]
    by = {r["run"]: r for r in results}
    print("\n| run | blocks | train (s) | lm loss, first -> last-10% mean | held-out lm loss |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['blocks'] or 'eager'} | {r['train_s']:.0f} | "
              f"{r['curve'][0]:.4f} -> {r['last_mean']:.4f} | {r['held_out']:.4f} |")

    def ratio(a, b):
        return by[a]["held_out"] / by[b]["held_out"] - 1 if a in by and b in by else None

    gap, floor = ratio("fp8", "bf16"), ratio("bf16-other", "bf16")
    if gap is not None:
        verdict = "holds" if abs(gap) <= CLAIM else "does not hold"
        line = f"\nfp8 / bf16 - 1 (held out): {gap:+.3%}"
        if floor is not None:
            line += f"; noise floor bf16-other / bf16 - 1: {floor:+.3%}"
        print(f"{line}; the {CLAIM:.2%} claim {verdict} at {args.steps} steps")
    program = ratio("fp8", "fp8-eager")
    if program is not None:
        print(f"fp8 (generated program) / fp8-eager (eager modules) - 1 (held out): "
              f"{program:+.3%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "steps": args.steps, "seed": raw["train"].get("seed"),
                       "gap": gap, "noise_floor": floor, "program_vs_eager": program,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
