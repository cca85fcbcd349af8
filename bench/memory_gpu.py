"""Peak GPU memory of a compiled trainer, by category, from the CUDA allocator's own record.

    python bench/memory_gpu.py --build DIR [--modes fp8,fp8-eager] [--steps 2]
                               [--snapshot-dir OUT] [--json FILE]

For each mode of bench/trainer_gpu.py (fp8: the generated program; fp8-eager: the eager
modules; bf16) it builds the trainer, records the allocator's history
(`torch.cuda.memory._record_memory_history`, Python stacks), trains a few steps, and
replays the recorded trace: every allocation and free in order, the live set at the
moment the allocated total peaks. Each live block is put in the category of the code
that allocated it (from its Python frames):

| category | allocated by |
|---|---|
| parameters and buffers | building the trainer (`Trainer.__init__`, model and parameter init) |
| optimizer states | the optimizer (runtime/optim.py, torch.optim) |
| backward | the backward pass: weight gradients (AccumulateGrad, a chunk's `backward_weight`) and its temporaries |
| activations | the forward pass (a module's or a chunk's `forward`), alive at the peak: saved for backward |
| other | anything else (communication buffers, the loss, the data) |

It prints the categories at the peak, the ten largest allocation sites among the
activations, and the peak the allocator reports (`max_memory_allocated`), which the
replay must match. `--snapshot-dir` keeps each mode's snapshot pickle (open it at
https://pytorch.org/memory_viz). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import pickle
import sys

CATEGORIES = ("parameters and buffers", "optimizer states", "backward", "activations", "other")
_BACKWARD = {
    "backward",
    "backward_input",
    "backward_weight",
    "run_weight_grads",
    "_engine_run_backward",
    "run_backward",
    "stage_backward_input",
    "stage_backward_weight",
}
_INIT = {"init_parameters", "load_weights", "build_full_model", "build_mesh"}


def categorise(frames) -> str:
    """The category of an allocation from its Python frames, whatever their order: the
    optimizer over the backward over building the trainer over the forward."""
    names = {f.get("name", "") for f in frames}
    files = {os.path.basename(f.get("filename", "")) for f in frames}
    if "optim.py" in files or any("/torch/optim/" in f.get("filename", "") for f in frames):
        return "optimizer states"
    if names & _BACKWARD:
        return "backward"
    if names & _INIT or any(
        f.get("name") == "__init__" and os.path.basename(f.get("filename", "")) == "trainer.py"
        for f in frames
    ):
        return "parameters and buffers"
    if "forward" in names:
        return "activations"
    return "other"


def _site(frames) -> str:
    """The innermost frame outside torch: where the allocation was asked for."""
    for f in frames:
        file = f.get("filename", "")
        if "/torch/" not in file and not file.startswith("<"):
            return f"{os.path.basename(file)}:{f.get('line')} {f.get('name')}"
    return "torch internals"


def peak_by_category(snapshot: dict, device: int = 0) -> dict:
    """Replay `snapshot`'s trace of `device`: the peak allocated total, bytes per category
    at that moment, and the largest activation sites then."""
    live: dict[int, tuple[int, str, str]] = {}
    total = peak = 0
    at_peak: dict = {}
    for ev in snapshot["device_traces"][device]:
        action = ev["action"]
        if action == "alloc":
            frames = ev.get("frames") or []
            live[ev["addr"]] = (ev["size"], categorise(frames), _site(frames))
            total += ev["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    by_cat = collections.Counter()
    sites = collections.Counter()
    for size, cat, site in at_peak.values():
        by_cat[cat] += size
        if cat == "activations":
            sites[site] += size
    return {
        "peak": peak,
        "categories": {c: by_cat.get(c, 0) for c in CATEGORIES},
        "activation_sites": sites.most_common(10),
    }


def run_mode(build: str, raw: dict, mode: str, steps: int, snapshot_dir: str | None) -> dict:
    import torch
    import trainer_gpu  # bench/ is sys.path[0] when this script runs

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # records from here: the trainer's construction, then the steps
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        trainer, plan, blocks = trainer_gpu.make_trainer(build, raw, mode, torch.device("cuda"))
        for i in range(steps):
            metrics = trainer.step()
            print(f"  {mode} step {i + 1}: loss {metrics['loss']:.4f}", flush=True)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    reported = torch.cuda.max_memory_allocated()
    if snapshot_dir:
        path = pathlib.Path(snapshot_dir) / f"memory_{mode}.pickle"
        with open(path, "wb") as f:
            pickle.dump(snap, f)
    result = peak_by_category(snap, torch.cuda.current_device())
    del trainer
    torch.cuda.empty_cache()
    tokens = plan.train.micro_batch * plan.train.seq_len
    return {
        "mode": mode,
        "blocks": blocks,
        "reported_peak": reported,
        "tokens_per_microbatch": tokens,
        **result,
    }


def _print(res: dict) -> None:
    gb = 1e9
    print(
        f"\n{res['mode']} ({res['blocks'] or 'eager blocks'}): peak {res['peak'] / gb:.2f} GB "
        f"replayed, {res['reported_peak'] / gb:.2f} GB reported by the allocator"
    )
    for cat, size in res["categories"].items():
        print(f"  {cat:24}{size / gb:>8.2f} GB  {100 * size / max(res['peak'], 1):5.1f}%")
    print("  largest activation sites at the peak:")
    for site, size in res["activation_sites"]:
        print(f"    {size / gb:>7.2f} GB  {site}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", required=True, help="a compiled build directory (bench_1b)")
    ap.add_argument("--modes", default="fp8,fp8-eager")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--snapshot-dir", help="keep each mode's allocator snapshot here")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("memory_gpu: no CUDA device here; nothing to measure")
        return 0
    os.environ.setdefault("DSVC_FP8_AUTOTUNE", "0")
    build = os.path.abspath(args.build)
    import trainer_gpu  # bench/ is sys.path[0] when this script runs

    trainer_gpu.use_build_runtime(build)
    with open(os.path.join(build, "plan.json")) as f:
        raw = json.load(f)
    if args.snapshot_dir:
        os.makedirs(args.snapshot_dir, exist_ok=True)
    print(
        f"memory_gpu: {raw['source'].get('spec')} on {torch.cuda.get_device_name()}, "
        f"micro-batch {raw['train']['micro_batch']} x {raw['train']['seq_len']} tokens"
    )
    results, failed = [], False
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        try:
            res = run_mode(build, raw, mode, args.steps, args.snapshot_dir)
        except Exception:  # noqa: BLE001 - report the mode's failure, run the next
            import traceback

            traceback.print_exc()
            failed = True
            continue
        _print(res)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
