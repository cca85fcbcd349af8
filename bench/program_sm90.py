"""Every fused kernel launch of a spec's generated stage program, compiled for sm_90 on a CPU.

    python bench/program_sm90.py [--spec FILE] [--set KEY=VALUE ...] [--batch 2] [--seq 64]
                                 [--check] [--json OUT] [--compile-with PYTHON]

The GPU runs what `dsvc compile` writes: program.py calling kernels/fp8_kernels.py with
the spec's shapes. bench/kernels_sm90.py compiles the kernel module's kernels with
arguments written out by hand; this script takes them from the program itself:

1. compiles the spec into a build, and runs the first block of every kind the program
   covers (forward and backward, `--batch` x `--seq` tokens) on the build's kernels
   under TRITON_INTERPRET=1, recording each launch: the kernel, its tensors' dtypes, its
   integers (as the JIT specialises them: 1 a constant, multiples of 16 hinted), its
   constexprs and warps. The GEMMs and the weight quantiser run by the torch reference
   (the interpreter takes most of an hour for them at the bench spec's widths;
   bench/kernels_sm90.py compiles their whole autotuning space);
2. compiles each distinct launch for sm_90 with triton's NVIDIA backend (no driver
   needed) from the same kernel file, loaded without the interpreter, and prints
   registers, bytes spilled and shared memory per launch.

Each step runs in a process of its own (the interpreter leaves triton.language patched
for the process that ran it). `--set` overrides the spec as dsvc's does (DeepSeek-V3's
example with fewer routed experts fits a CPU's memory: `--spec examples/deepseek_v3.dsv
--set model.ffn.moe.routed=16 --set parallel.expert=16`). The experts' exchange is
not run (one rank holds every expert), so its wire quantisers are not among the
launches.

Token counts enter the launches only as runtime integers (no constexpr depends on
them), so a launch compiles here as it will at the GPU's 8 x 2048 tokens as long as
both counts are multiples of 16 and the batch is not 1. `--check`: exit 1 when a launch
fails to compile, needs more shared memory than an H100 / H200 block may have, or
spills past its budget (bench/kernels_sm90.py FUSED_SPILL_BUDGET; none elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

import source_tree  # noqa: F401  (dsvc from this tree, installed or not)
import torch
from sm90_compile import Ptr, available, compile_sm90, jit_function  # neighbours in bench/

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SPEC = ROOT / "tests" / "train_specs" / "bench_1b.dsv"
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
_DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.float8_e5m2: "fp8e5",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def _spec_class(a):
    """What the JIT specialises a recorded argument on (ints: 1, a multiple of 16, or
    other; floats: their type)."""
    kind, v = a
    if kind != "value" or isinstance(v, bool) or v is None:
        return (kind, v)
    if isinstance(v, float):
        return "fp32"
    return 1 if v == 1 else ("div16" if v % 16 == 0 else "int")


def _key(launch: dict):
    return (launch["kernel"], tuple((n, _spec_class(a)) for n, a in launch["args"]),
            launch["warps"], launch["stages"])  # fmt: skip


def _constexprs(launch: dict, fn) -> str:
    names = {n for n, p in zip(fn.arg_names, fn.params) if p.is_constexpr}
    return ", ".join(f"{n}={a[1]}" for n, a in launch["args"] if n in names)


def _arg(v):
    """A launch argument as JSON: a tensor's element type, a number, a bool, a dtype."""
    if isinstance(v, torch.Tensor):
        return ["ptr", _DTYPES[v.dtype]]
    if isinstance(v, (bool, int, float)) or v is None:
        return ["value", v]
    name = getattr(v, "name", None)  # a triton dtype passed as a constexpr
    if name is None:
        raise TypeError(f"program_sm90: cannot record an argument of type {type(v).__name__}")
    return ["dtype", name]


def _value(a):
    """The argument `_arg` recorded, as compile_sm90 takes it."""
    kind, v = a
    if kind == "ptr":
        return Ptr(v)
    if kind == "dtype":
        import triton.language as tl

        return tl.core.dtype(v)
    return v


def record(spec_path: pathlib.Path, batch: int, seq: int, workdir: pathlib.Path, overrides=()):
    """(build directory, the distinct launches, the block kinds run) of one forward and
    backward of the first block of every kind the spec's program covers, under the
    interpreter."""
    from fusion_cpu import load_build, one_rank_block, reference_ops  # neighbour in bench/
    from triton.runtime.interpreter import InterpretedFunction

    from dsvc import dsl
    from dsvc.runtime import program as P

    build = workdir / "build"
    plan, program, kernels = load_build(dsl.load(spec_path, list(overrides)), build)
    seen: dict = {}
    current = [""]
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            warps = kwargs.pop("num_warps", 4)
            stages = kwargs.pop("num_stages", 3)
            names = self.arg_names
            bound = dict(zip(names, args))
            bound.update({k: v for k, v in kwargs.items() if k in names})
            launch = {"kernel": self.__name__, "warps": warps, "stages": stages,
                      "args": [[n, _arg(bound[n])] for n in names if n in bound],
                      "blocks": [current[0]]}  # fmt: skip
            key = _key(launch)
            if key not in seen:
                seen[key] = launch
            elif current[0] not in seen[key]["blocks"]:
                seen[key]["blocks"].append(current[0])
            kwargs.update(num_warps=warps, num_stages=stages)
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    kinds_done = set()
    InterpretedFunction.run = run
    try:
        gen = torch.Generator().manual_seed(0)
        for index, lay in enumerate(plan.model.layers):
            kind = (lay.attention, lay.ffn)
            if kind in kinds_done or kind not in program.BLOCKS:
                continue
            block = one_rank_block(plan, index)
            kinds_done.add(block.kind)
            current[0] = f"{block.kind[0]} + {block.kind[1]} (layer {index})"
            P.attach_program([block], program, plan, kernels)
            with reference_ops([kernels, block.program[1].ops]):
                x = torch.randn(batch, seq, plan.model.hidden, generator=gen)
                x = x.to(torch.bfloat16).requires_grad_(True)
                y = block(x)
                (y.float() * torch.randn(y.shape, generator=gen)).sum().backward()
                P.release_weights([block])
    finally:
        InterpretedFunction.run = real_run
    return build, list(seen.values()), [" + ".join(k) for k in sorted(kinds_done)]


def compile_all(kernels_path: pathlib.Path, launches) -> list[dict]:
    """Each launch compiled for sm_90 from the kernel file, loaded without the interpreter
    (in a process that has not run it: the interpreter leaves triton.language patched)."""
    from dsvc.runtime.generated import import_generated

    module = import_generated(kernels_path.resolve(), "_dsvc_sm90_kernels_")
    rows = []
    for launch in sorted(launches, key=lambda la: (la["kernel"], str(_key(la)))):
        fn = jit_function(getattr(module, launch["kernel"]))
        row = {"kernel": launch["kernel"], "blocks": launch["blocks"],
               "constexprs": _constexprs(launch, fn), "warps": launch["warps"]}  # fmt: skip
        args = {n: _value(a) for n, a in launch["args"]}
        try:
            c = compile_sm90(fn, args, launch["warps"], launch["stages"])
        except Exception as err:  # noqa: BLE001 - a failed compile is the finding
            row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        else:
            row.update(regs=c.regs, spill=c.spill_bytes, shared=c.shared)
        rows.append(row)
    return rows


def _phase(argv, interpret: bool, python: str | None = None) -> None:
    """Run one phase of this script in a fresh process (TRITON_INTERPRET as it needs),
    by `python` (default: this one)."""
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([python or sys.executable, __file__, *argv], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"program_sm90: the {argv[0]} phase failed:\n{proc.stderr[-3000:]}")


def problems(rows) -> list[str]:
    """What fails --check: a compile error, shared memory past the limit, spills past
    the kernel's budget."""
    from kernels_sm90 import FUSED_SPILL_BUDGET

    out = []
    for r in rows:
        what = f"{r['kernel']} ({r['constexprs']})"
        if "error" in r:
            out.append(f"{what}: does not compile: {r['error']}")
            continue
        if r["shared"] > SHARED_LIMIT:
            out.append(f"{what}: {r['shared']} B of shared memory (at most {SHARED_LIMIT})")
        budget = FUSED_SPILL_BUDGET.get(r["kernel"], 0)
        if r["spill"] > budget:
            out.append(f"{what}: spills {r['spill']} B per thread (budget {budget})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=pathlib.Path, default=DEFAULT_SPEC)
    ap.add_argument("--batch", type=int, default=2, help="sequences (not 1: see above)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (a multiple of 16)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of the spec, as dsvc's --set (repeatable)")
    ap.add_argument("--check", action="store_true", help="exit 1 on a finding (see above)")
    ap.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    ap.add_argument("--compile-with", metavar="PYTHON",
                    help="compile with another environment's python (another triton: the "
                    "GPU image's 3.6, whose interpreter cannot record under the newest numpy)")
    ap.add_argument("--phase", choices=("record", "compile"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=pathlib.Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase == "record":
        build, launches, kinds = record(args.spec, args.batch, args.seq, args.work, args.set)
        doc = {"kernels": str(build / "kernels" / "fp8_kernels.py"), "kinds": kinds,
               "launches": launches}  # fmt: skip
        (args.work / "launches.json").write_text(json.dumps(doc))
        return 0
    if args.phase == "compile":
        doc = json.loads((args.work / "launches.json").read_text())
        rows = compile_all(pathlib.Path(doc["kernels"]), doc["launches"])
        import triton

        (args.work / "rows.json").write_text(json.dumps({"triton": triton.__version__,
                                                         "rows": rows}))  # fmt: skip
        return 0
    if args.batch < 2 or args.seq < 16 or args.seq % 16:
        ap.error("--batch must be at least 2 and --seq a positive multiple of 16")
    why = available()
    if why:
        print(f"program_sm90: cannot compile for sm_90 here: {why}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = ["--work", tmp, "--spec", str(args.spec), *(f"--set={o}" for o in args.set)]
        _phase(["--phase", "record", *work, "--batch", str(args.batch), "--seq", str(args.seq)],
               interpret=True)  # fmt: skip
        _phase(["--phase", "compile", *work], interpret=False, python=args.compile_with)
        kinds = json.loads((pathlib.Path(tmp) / "launches.json").read_text())["kinds"]
        done = json.loads((pathlib.Path(tmp) / "rows.json").read_text())
    rows = done["rows"]
    print(
        f"{args.spec.name}: the generated program's fused kernel launches for "
        f"{', '.join(kinds)} blocks ({args.batch} x {args.seq} tokens, forward and backward), "
        f"compiled for sm_90 with triton {done['triton']}"
    )
    print("\n| kernel | constexprs | warps | registers | spilled B | shared KB | blocks |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        blocks = "; ".join(r["blocks"])
        if "error" in r:
            print(f"| {r['kernel']} | {r['constexprs']} | {r['warps']} | failed: {r['error']} "
                  f"| | | {blocks} |")  # fmt: skip
            continue
        print(
            f"| {r['kernel']} | {r['constexprs']} | {r['warps']} | {r['regs']} | {r['spill']} | "
            f"{r['shared'] / 1024:.1f} | {blocks} |"
        )
    found = problems(rows)
    if not rows:
        found.append("no launch recorded: the spec's program covers none of its blocks")
    print(f"\n{len(rows)} distinct launches of {len({r['kernel'] for r in rows})} kernels; "
          f"{len(found)} findings")  # fmt: skip
    for f in found:
        print(f"  {f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
