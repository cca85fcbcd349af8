"""Kernel launches and bytes per token of one MLA + MoE block, before and after fusion.

Runs one decoder block of a spec (default: the 1.1B bench spec's first MLA + MoE layer)
forward and backward twice from the same weights and inputs, on the same rendered FP8
Triton kernels (under TRITON_INTERPRET=1 on a CPU):

- before: the runtime's eager modules (each quantisation, norm, RoPE, SwiGLU, routing
  step and residual add its own kernel or torch op);
- after: the build's generated stage program (compiler/codegen/stage_program.py from the graph
  after the `fuse` pass), whose fusion groups are one Triton kernel each.

Everything is counted from the run itself, not from the IR:
- a Triton launch (a hook on the interpreter's launch): one launch; every tensor it
  receives is read, or written when its contents differ after the launch (a tensor
  passed twice counts once);
- a torch op (a TorchDispatchMode): one launch, its tensor inputs read and outputs
  written; views, allocations without a fill and metadata ops launch nothing on a GPU
  and are skipped, as are the interpreter's own torch calls inside a Triton launch;
- the GEMMs and the weight quantiser, which both runs call alike and which the
  interpreter takes most of an hour for at the bench spec's widths, run by the torch
  reference (`--interpret-all`: by the kernels), each call counted as its one launch
  with the tensors it receives and returns;
- the attention core as the two fused kernels it is on a GPU (forward, backward),
  counted apart (`--with-core` folds it in): both runs have the same core.

Also measured: the bytes the forward leaves for the backward (every tensor autograd
saves, and those custom Functions keep on their ctx; parameters excluded), per token.

Launches are per forward + backward of the layer; bytes per token are the slope
between T and 2T tokens, (bytes(2T) - bytes(T)) / T, so the weights' traffic, fixed
per micro-batch, cancels. Prints both runs, the after/before ratios and the kernels
moving the most bytes; exit 1 unless launches are at most half and bytes per token at
least 30% lower.

    python bench/fusion_cpu.py [--spec FILE] [--tokens T] [--json OUT] [--interpret-all]
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import collections
import contextlib
import json
import pathlib
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SPEC = ROOT / "tests" / "train_specs" / "bench_1b.dsv"

# ops that move no data on a GPU (allocation without a fill, metadata, aliasing)
_FREE = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "resize_",
    "set_",
    "_unsafe_view",
    "is_same_size",
    "record_stream",
}
# the attention core's ops (counted apart: one fused kernel on a GPU)
_CORE = ("core.",)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _bits(t):
    """A tensor's bytes as a flat uint8 copy (NaN payloads compare equal)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


class Tally:
    """Launches and bytes, by kernel or op name."""

    def __init__(self):
        self.launches = collections.Counter()
        self.read = collections.Counter()
        self.written = collections.Counter()
        self.saved = 0  # bytes kept for backward after the forward

    def add(self, name: str, read: int, written: int) -> None:
        self.launches[name] += 1
        self.read[name] += read
        self.written[name] += written

    def totals(self, keep=lambda name: True) -> dict:
        names = [n for n in self.launches if keep(n)]
        return {
            "launches": sum(self.launches[n] for n in names),
            "read": sum(self.read[n] for n in names),
            "written": sum(self.written[n] for n in names),
        }


class OpCounter(TorchDispatchMode):
    """Every torch op that would launch a GPU kernel, with the bytes of its tensors."""

    def __init__(self, tally: Tally):
        super().__init__()
        self.tally, self.paused = tally, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.paused or name in _FREE or func.is_view:
            return out
        read = sum(_nbytes(t) for t in _tensors((args, kwargs)))
        self.tally.add(f"torch.{name}", read, sum(_nbytes(t) for t in _tensors(out)))
        return out


@contextlib.contextmanager
def triton_launch_hook(tally: Tally, counter: OpCounter):
    """Count every interpreted Triton launch (the interpreter's run is the launch)."""
    from triton.runtime.interpreter import InterpretedFunction

    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        counter.paused += 1  # the interpreter's own tensor copies are no kernel's traffic
        try:
            # a tensor passed twice (a placeholder for an output the launch skips) is one
            seen, tensors = set(), []
            for t in _tensors((args, kwargs)):
                key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
                if t.numel() and key not in seen:
                    seen.add(key)
                    tensors.append(t)
            before = [_bits(t) for t in tensors]
            out = real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
            read = written = 0
            for t, b in zip(tensors, before):
                if torch.equal(_bits(t), b):
                    read += _nbytes(t)
                else:
                    written += _nbytes(t)
        finally:
            counter.paused -= 1
        tally.add(f"triton.{self.__name__}", read, written)
        return out

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = real_run


# kernels both runs launch alike, run by the torch reference unless --interpret-all
BY_REFERENCE = ("quantize_weight", "gemm", "grouped_gemm", "grouped_gemm_wgrad")


@contextlib.contextmanager
def by_reference(namespaces, tally: Tally, counter: OpCounter):
    """The weight quantiser and the GEMMs through the torch reference instead of the
    interpreter, which takes most of an hour per MoE layer for them at the bench spec's
    widths. Each call is still counted as the one launch it is, reading the tensors it
    receives and writing the ones it returns. Both runs make the same calls (the same
    weights, the same GEMM shapes), so the comparison is of the work around them."""
    from dsvc.runtime import fp8_torch

    def stand_in(name):
        ref = getattr(fp8_torch, name)

        def call(*args, **kwargs):
            counter.paused += 1
            try:
                out = ref(*args, **kwargs)
            finally:
                counter.paused -= 1
            seen, read = set(), 0
            for t in _tensors((args, kwargs)):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    read += _nbytes(t)
            tally.add(f"triton.{name}", read, sum(_nbytes(t) for t in _tensors(out)))
            return out

        return call

    with reference_ops(namespaces, stand_in):
        yield


@contextlib.contextmanager
def reference_ops(namespaces, stand_in=None):
    """`BY_REFERENCE`'s functions of each namespace (a kernel module, a program's ops)
    replaced by the torch reference's, or by `stand_in(name)`; restored on exit."""
    from dsvc.runtime import fp8_torch

    real = [{n: getattr(ns, n) for n in BY_REFERENCE} for ns in namespaces]
    for ns in namespaces:
        for n in BY_REFERENCE:
            setattr(ns, n, stand_in(n) if stand_in else getattr(fp8_torch, n))
    try:
        yield
    finally:
        for ns, fns in zip(namespaces, real):
            for n, fn in fns.items():
                setattr(ns, n, fn)


@contextlib.contextmanager
def fused_core(tally: Tally, counter: OpCounter):
    """The attention core as the two fused kernels it is on a GPU (SDPA's flash or
    memory-efficient forward and backward): on a CPU, torch runs it as many ops. Forward
    reads q, k, v and writes o; backward reads q, k, v, o, dO and writes dq, dk, dv.
    Both runs' blocks call `F.scaled_dot_product_attention`."""
    real = F.scaled_dot_product_attention

    class Core(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, kwargs):
            counter.paused += 1
            try:
                o = real(q, k, v, **kwargs)
            finally:
                counter.paused -= 1
            ctx.save_for_backward(q, k, v, o)
            ctx.kwargs = kwargs
            tally.add("core.attention_fwd", sum(map(_nbytes, (q, k, v))), _nbytes(o))
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o = ctx.saved_tensors
            counter.paused += 1
            try:
                with torch.enable_grad():
                    qkv = [t.detach().requires_grad_(True) for t in (q, k, v)]
                    grads = torch.autograd.grad(real(*qkv, **ctx.kwargs), qkv, do)
            finally:
                counter.paused -= 1
            read = sum(map(_nbytes, (q, k, v, o, do)))
            tally.add("core.attention_bwd", read, sum(map(_nbytes, grads)))
            return (*grads, None)

    def sdpa(q, k, v, **kwargs):
        return Core.apply(q, k, v, kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _first_mla_moe_layer(plan) -> int:
    m = plan.model
    for i, lay in enumerate(m.layers):
        if m.attention[lay.attention].kind == "mla" and m.ffn[lay.ffn].kind == "moe":
            return i
    raise SystemExit("fusion_cpu: the spec has no MLA + MoE layer")


def setup(spec_path: pathlib.Path, workdir: pathlib.Path):
    """(block, program, plan, kernels): the spec's first MLA + MoE block, its generated
    program and the rendered kernel module (every fused kernel)."""
    from dsvc import dsl
    from dsvc.compiler.codegen.kernels import generic_config, render_kernels
    from dsvc.compiler.codegen.stage_program import render_program
    from dsvc.compiler.driver import build_plan, run_until
    from dsvc.runtime import fp8
    from dsvc.runtime import program as P
    from dsvc.runtime.plan import parse_plan

    spec = dsl.load(spec_path)
    graph = run_until(spec, "fuse")
    (workdir / "program.py").write_text(
        render_program(graph, spec_file=spec_path.name, span=None, passes=graph.passes)
    )
    (workdir / "fp8_kernels.py").write_text(render_kernels(generic_config()))
    fp8.use_kernels(workdir / "fp8_kernels.py")
    raw = build_plan(spec)
    raw["precision"]["fp8_backend"] = "triton"
    plan = parse_plan(raw)
    layer = _first_mla_moe_layer(plan)
    return one_rank_block(plan, layer), P.load_program(workdir / "program.py"), plan, layer


def load_build(spec, build: pathlib.Path):
    """(plan, program, kernels) of `spec` compiled into `build` (kept when current): the
    plan on the FP8 backend "triton", the build's generated program and kernel module."""
    from dsvc.compiler.codegen.build import build_cached
    from dsvc.runtime import fp8
    from dsvc.runtime import program as P
    from dsvc.runtime.plan import parse_plan

    build_cached(spec, str(build))
    fp8.use_kernels(build / "kernels" / "fp8_kernels.py")
    raw = json.loads((build / "plan.json").read_text())
    raw["precision"]["fp8_backend"] = "triton"
    plan = parse_plan(raw, str(build / "plan.json"))
    return plan, P.load_program(build / "program.py"), fp8.resolve_backend("triton")


def one_rank_block(plan, index: int):
    """Layer `index` of `plan` as a runtime Block on one rank that holds every routed
    expert (nothing is exchanged), its weights initialised as the trainer's are."""
    from dsvc.runtime.ep import ExpertComm
    from dsvc.runtime.init import init_parameters
    from dsvc.runtime.model import Block
    from dsvc.runtime.plan import ExpertPlacement

    lay = plan.model.layers[index]
    routed = getattr(plan.model.ffn[lay.ffn], "routed", 0) or 1
    placement = ExpertPlacement(per_rank=(tuple(range(routed)),), group_of_expert=())
    block = Block(plan, lay, ExpertComm(placement, 0, None, "fp32", "fp32"))
    with torch.no_grad():
        init_parameters(block, 0, plan.model.init_std)
    return block


def measure(block, x, dy, kernels, interpret_all: bool) -> Tally:
    """One forward and backward of `block`, every launch counted."""
    from dsvc.runtime.program import release_weights

    tally = Tally()
    block.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    counter = OpCounter(tally)
    # the eager modules call the kernel module, the program its runtime's namespace
    namespaces = [kernels] + ([block.program[1].ops] if block.program is not None else [])
    reference = (
        contextlib.nullcontext() if interpret_all else by_reference(namespaces, tally, counter)
    )
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        _keep(t, saved, params)
        return t

    with triton_launch_hook(tally, counter), reference, fused_core(tally, counter), counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(xi)
        _ctx_tensors(y.grad_fn, saved, params)
        tally.saved = sum(saved.values())
        (y.float() * dy).sum().backward()
    release_weights([block])  # one step's end, as the trainer's: the next run quantises anew
    return tally


def _keep(t, saved: dict, params: set) -> None:
    """Count a tensor kept for backward by its storage (views of one storage count once;
    the parameters, alive anyway, not at all)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return
    st = t.untyped_storage()
    if st.data_ptr() not in params:
        saved[st.data_ptr()] = st.nbytes()


def _ctx_tensors(root, saved: dict, params: set) -> None:
    """Tensors custom autograd Functions keep as attributes of their ctx (beside
    save_for_backward), one object deep: a generated chunk's route, an eager one's state."""
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        todo.extend(fn for fn, _ in node.next_functions)
        for value in getattr(node, "__dict__", {}).values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            for item in items:
                for t in _tensors(item):
                    _keep(t, saved, params)
                if not isinstance(item, (torch.Tensor, torch.nn.Module)):
                    for t in _tensors(list(getattr(item, "__dict__", {}).values())):
                        _keep(t, saved, params)


def _is_core(name: str) -> bool:
    return any(c in name for c in _CORE)


def _bytes(tally: Tally, name: str) -> int:
    return tally.read[name] + tally.written[name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=pathlib.Path, default=DEFAULT_SPEC)
    ap.add_argument(
        "--tokens", type=int, default=32, help="T: the block runs at T and 2T tokens (one sequence)"
    )
    ap.add_argument("--with-core", action="store_true", help="count the attention core too")
    ap.add_argument(
        "--interpret-all",
        action="store_true",
        help="run the GEMMs and the weight quantiser in the interpreter too (hours at the "
        "bench spec's widths)",
    )
    ap.add_argument("--top", type=int, default=12, help="kernels listed per run")
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args(argv)
    if args.tokens < 1:
        ap.error("--tokens must be at least 1")
    from dsvc.runtime import program as P
    from dsvc.runtime.fp8 import resolve_backend

    t = args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        block, prog, plan, layer = setup(args.spec, pathlib.Path(tmp))
        kernels = resolve_backend("triton")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 2 * t, plan.model.hidden, generator=gen).to(torch.bfloat16)
        dy = torch.randn(1, 2 * t, plan.model.hidden, generator=gen)
        runs = {}
        for label in ("before (eager)", "after (program)"):
            if label.startswith("after"):
                attached, _ = P.attach_program([block], prog, plan, "triton")
                if not attached:
                    print("fusion_cpu: the program does not cover this block", file=sys.stderr)
                    return 1
            runs[label] = [
                measure(block, x[:, :n], dy[:, :n], kernels, args.interpret_all) for n in (t, 2 * t)
            ]
    keep = (lambda n: True) if args.with_core else (lambda n: not _is_core(n))
    print(
        f"{args.spec.name} layer {layer} (MLA + MoE), forward + backward at {t} and {2 * t} "
        f"tokens, FP8 Triton kernels (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}); "
        f"attention core {'included' if args.with_core else 'counted apart'}"
    )
    print(
        "launches: per forward + backward of the layer at T; bytes per token: the slope "
        f"(bytes at {2 * t} - bytes at {t}) / {t}, so the weights' fixed traffic cancels"
    )
    print(
        f"{'':18}{'launches':>10}{'read B/tok':>12}{'written B/tok':>15}{'total B/tok':>13}"
        f"{'saved for bwd B/tok':>21}"
    )
    result = {}
    for label, (one, two) in runs.items():
        a, b = one.totals(keep), two.totals(keep)
        row = {
            "launches": a["launches"],
            "launches_2t": b["launches"],
            "read_per_token": (b["read"] - a["read"]) / t,
            "written_per_token": (b["written"] - a["written"]) / t,
            "core": one.totals(_is_core),
            # the generated kernels alone (what the simulator counts as the program's launches)
            "triton_launches": one.totals(lambda n: keep(n) and n.startswith("triton."))["launches"],
        }
        row["bytes_per_token"] = row["read_per_token"] + row["written_per_token"]
        row["saved_per_token"] = (two.saved - one.saved) / t
        result[label] = row
        print(
            f"{label:18}{row['launches']:>10}{row['read_per_token']:>12.0f}"
            f"{row['written_per_token']:>15.0f}{row['bytes_per_token']:>13.0f}"
            f"{row['saved_per_token']:>21.0f}"
        )
    b, a = result["before (eager)"], result["after (program)"]
    launch_ratio = a["launches"] / b["launches"]
    byte_ratio = a["bytes_per_token"] / b["bytes_per_token"]
    saved_ratio = a["saved_per_token"] / b["saved_per_token"]
    print(
        f"after / before: launches {launch_ratio:.3f}, bytes per token {byte_ratio:.3f} "
        f"(goal: launches <= 0.5, bytes <= 0.7); saved for backward {saved_ratio:.3f}"
    )
    for label, (one, two) in runs.items():
        names = sorted(
            (n for n in set(one.launches) | set(two.launches) if keep(n)),
            key=lambda n: (-(_bytes(two, n) - _bytes(one, n)), n),
        )
        print(f"\n{label}: the {args.top} kernels moving the most bytes per token (launches at T)")
        for n in names[: args.top]:
            per_token = (_bytes(two, n) - _bytes(one, n)) / t
            print(f"  {n:44}{one.launches[n]:>5}{per_token:>12.0f}")
    # the slopes are only per-token figures when both token counts ran the same kernels
    same_work = all(r["launches"] == r["launches_2t"] and r["bytes_per_token"] > 0
                    for r in result.values())
    if not same_work:
        print("fusion_cpu: the runs at T and 2T launched different work; no per-token figure",
              file=sys.stderr)
    ok = same_work and launch_ratio <= 0.5 and byte_ratio <= 0.7
    if args.json:
        out = {
            "spec": args.spec.name,
            "layer": layer,
            "tokens": [t, 2 * t],
            "runs": result,
            "launch_ratio": launch_ratio,
            "byte_ratio": byte_ratio,
            "saved_ratio": saved_ratio,
            "ok": ok,
        }
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
