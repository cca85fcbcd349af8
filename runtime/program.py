"""Running a build's generated stage program: loader, chunk autograd, weight-gradient deferral.

`dsvc compile` writes `program.py` beside plan.json: for every (attention, ffn) kind of
block in the model, straight-line code for its chunks (docs/program.md), generated
from the compiler's graph after the `fuse` pass. A chunk is the work between two
points where a tensor must exist anyway (the attention core's inputs and output, the
expert all-to-alls): its forward, the input-gradient half of its backward and the
weight-gradient half, each a function of plain tensors that calls the fused kernels
and the FP8 GEMMs. This module runs them:

- `Chunk` (one autograd node per chunk): forward saves what the chunk's code says;
  backward runs `backward_input`, then `backward_weight` at once, or, inside
  `defer_weight_grads(key)` (the executor's zero-bubble `I` action), queues it for
  `run_weight_grads(key)` (its `W` action), so the split costs nothing extra;
- `ProgramRuntime`: what the generated code calls besides the kernels (the FP8
  backend's GEMMs with epilogues, weight quantisation, the attention core, the
  expert exchanges of `ep.Route`);
- `load_program(path)` / `attach_program(modules, program, plan)`: every `Block` of
  the stage modules whose kind the program covers runs it; the runtime's eager modules
  stay the reference (`Block.forward` without a program) and hold the parameters, so
  checkpoints, the optimizer and Hugging Face loading are unchanged.

A program is generated for one precision policy; a plan run with another (`--fp32`)
keeps the eager modules (`program_mismatch` says why).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import types
import weakref

import torch
import torch.nn.functional as F

from . import fp8_torch, fused_torch
from .fp8_triton import PROTOCOL
from .generated import forget, import_generated

PROGRAM_API = 2  # the interface between generated programs and this module

_EPILOGUE_BACKENDS = ("torch", "triton")


# ----------------------------------------------------------------------------- backends


def program_ops(backend) -> types.SimpleNamespace:
    """The FP8 and fused-op functions the generated code calls, for a backend name or a
    generated kernel module: one namespace (the torch references fill what a backend
    lacks: cuBLAS has only GEMMs)."""
    from .fp8 import resolve_backend

    base = resolve_backend(backend)
    ops = {name: getattr(fused_torch, name) for name in fused_torch.FUSED_PROTOCOL}
    ops.update({name: getattr(fp8_torch, name) for name in PROTOCOL})
    ops["swiglu_quant"] = fp8_torch.swiglu_quant
    epilogues = base is fp8_torch or getattr(base, "GEMM_EPILOGUES", False)
    for name in (*PROTOCOL, *fused_torch.FUSED_PROTOCOL):
        fn = getattr(base, name, None)
        if fn is not None:
            ops[name] = fn
    ns = types.SimpleNamespace(**ops)
    ns.epilogues = bool(epilogues)
    ns.name = backend if isinstance(backend, str) else getattr(backend, "__name__", "module")
    return ns


# ----------------------------------------------------------------------------- deferral

# The key whose weight gradients are being queued: one per process, not per thread, since
# autograd runs the backward of a GPU tensor's nodes on its device's worker thread, not on
# the thread that called backward (a thread-local key set there would never be seen, and
# every weight gradient would run at once). One backward runs at a time: under dual
# micro-batch overlap the helper thread only runs forwards.
_DEFER = types.SimpleNamespace(key=None)
_QUEUED: dict = {}  # key -> [(params, chunk, p, wstate)]


@contextlib.contextmanager
def defer_weight_grads(key):
    """Within: chunks queue their weight-gradient half under `key` instead of running it."""
    prev = _DEFER.key
    _DEFER.key = key
    try:
        yield
    finally:
        _DEFER.key = prev


def run_weight_grads(key) -> bool:
    """Run (and accumulate into .grad) every weight-gradient half queued under `key`, in
    the order their backward ran; False when nothing was queued."""
    work = _QUEUED.pop(key, None)
    if not work:
        return False
    for params, chunk, p, wstate in work:
        grads = chunk.backward_weight(p.rt, p, wstate)
        for param, g in zip(params, grads):
            if g is None:
                continue
            g = g.to(param.dtype)
            if param.grad is None:
                param.grad = g
            else:
                param.grad += g
    return True


def pending_weight_grads() -> list:
    """Keys with queued weight gradients (an executor checks none is left at step end)."""
    return sorted(_QUEUED, key=repr)


# ----------------------------------------------------------------------------- chunks


class Params(types.SimpleNamespace):
    """A chunk's parameters by short name, and the runtime (`p.rt`)."""


class Chunk(torch.autograd.Function):
    """One chunk of a generated block as one autograd node (see the module docstring).

    apply(chunk, rt, num_inputs, *inputs_then_params): `chunk` is the generated class
    (PARAMS as (short name, module path) pairs, NONDIFF output indices, forward,
    backward_input, backward_weight). Parameters are leaves that outlive the step, so
    they ride on ctx rather than through save_for_backward.
    """

    @staticmethod
    def forward(ctx, chunk, rt, num_inputs, *args):
        inputs, params = args[:num_inputs], args[num_inputs:]
        p = Params(rt=rt, **{name: t for (name, _), t in zip(chunk.PARAMS, params)})
        outputs, saved, extra = chunk.forward(rt, p, *inputs)
        holes = [t is None for t in saved]
        ctx.save_for_backward(*[t for t in saved if t is not None])
        ctx.holes, ctx.extra, ctx.chunk, ctx.p, ctx.params = holes, extra, chunk, p, params
        ctx.mark_non_differentiable(*[outputs[i] for i in chunk.NONDIFF])
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        it = iter(ctx.saved_tensors)
        saved = [None if hole else next(it) for hole in ctx.holes]
        chunk, p = ctx.chunk, ctx.p
        dinputs, wstate = chunk.backward_input(p.rt, p, saved, ctx.extra, *grads)
        key = _DEFER.key
        if key is not None:
            _QUEUED.setdefault(key, []).append((ctx.params, chunk, p, wstate))
            dparams = (None,) * len(ctx.params)
        else:
            dparams = tuple(None if g is None else g.to(w.dtype)
                            for g, w in zip(chunk.backward_weight(p.rt, p, wstate), ctx.params))
        return (None, None, None, *dinputs, *dparams)


# ----------------------------------------------------------------------------- the runtime


class ProgramRuntime:
    """What generated chunks call besides the fused kernels (one per stage module)."""

    def __init__(self, ops, tile: int, ue8m0: bool, act_dtype: torch.dtype):
        self.ops, self.tile, self.ue8m0, self.act = ops, tile, ue8m0, act_dtype
        # id(parameter) -> (a weak reference to it, its version, (w_fp8, scales)): qweight
        self._qweights: dict = {}

    # -- running a chunk
    def apply(self, chunk, module, *inputs):
        """Run generated `chunk` on `module`'s parameters (paths in chunk.PARAMS)."""
        params = [module.get_parameter(path) for _, path in chunk.PARAMS]
        return Chunk.apply(chunk, self, len(inputs), *inputs, *params)

    # -- FP8 GEMMs (the plan's backend) and their epilogues
    def qweight(self, w):
        """(w_fp8, scales) of a weight in tile x tile blocks. A parameter is quantised once
        per value: every micro-batch of a step, and a recomputation's replay, share one
        FP8 copy (which their backwards keep) instead of each quantising and keeping its
        own. The parameter's version counter moves with every in-place update (the
        optimizer's step, a checkpoint or Hugging Face load), and a moved one is quantised
        anew; `release_weights` drops the copies once a step's backward is done."""
        if not isinstance(w, torch.nn.Parameter):
            return self.ops.quantize_weight(w, self.tile, self.ue8m0)
        key = (w._version, w.data_ptr(), w.dtype, w.shape)
        hit = self._qweights.get(id(w))
        if hit is not None and hit[0]() is w and hit[1] == key:
            return hit[2]
        out = self.ops.quantize_weight(w, self.tile, self.ue8m0)
        self._qweights[id(w)] = (weakref.ref(w), key, out)
        return out

    def release_weights(self) -> None:
        """Drop the FP8 weight copies (the backwards that kept them are done): the memory is
        free for the optimizer step, and the next forward quantises the updated weights."""
        self._qweights.clear()

    def gemm(self, a, a_s, w, out_dtype=None, *, bias=None, residual=None):
        """a (M, K) fp8 @ w^T with w = (w_fp8 (N, K), scales); bias (N,) and residual
        (M, N) added in fp32 before the single rounding (the kernels' epilogue)."""
        out_dtype = out_dtype or self.act
        if self.ops.epilogues:
            return self.ops.gemm(a, a_s, w[0], w[1], out_dtype, tile=self.tile, bias=bias,
                                 residual=residual)
        return _epilogue(self.ops.gemm(a, a_s, w[0], w[1], torch.float32, tile=self.tile),
                         bias, residual, out_dtype)

    def dgrad(self, dy, dy_s, w, out_dtype=None, *, residual=None):
        """dY (M, N) fp8 @ W (N, K): the input gradient through a weight's transposed blocks."""
        out_dtype = out_dtype or self.act
        wt, wt_s = w[0].t(), w[1].t()
        if self.ops.epilogues:
            return self.ops.gemm(dy, dy_s, wt, wt_s, out_dtype, tile=self.tile,
                                 residual=residual)
        return _epilogue(self.ops.gemm(dy, dy_s, wt, wt_s, torch.float32, tile=self.tile),
                         None, residual, out_dtype)

    def wgrad(self, dyt, dyt_s, xt, xt_s):
        """dW (N, K) = dY^T X from both operands' token tiles, fp32."""
        return self.ops.gemm(dyt, dyt_s, xt, xt_s, torch.float32, tile=self.tile)

    def grouped(self, a, a_s, w, offsets, out_dtype=None, *, residual=None, transpose=False):
        """Per-expert a[rows of e] @ w[e]^T (transpose: @ w[e], the dgrad)."""
        out_dtype = out_dtype or self.act
        b, b_s = (w[0].transpose(1, 2), w[1].transpose(1, 2)) if transpose else w
        if self.ops.epilogues:
            return self.ops.grouped_gemm(a, a_s, b, b_s, offsets, out_dtype, tile=self.tile,
                                         residual=residual)
        out = self.ops.grouped_gemm(a, a_s, b, b_s, offsets, torch.float32, tile=self.tile)
        return _epilogue(out, None, residual, out_dtype)

    def grouped_wgrad(self, dyt, dyt_s, xt, xt_s, offsets):
        return self.ops.grouped_gemm_wgrad(dyt, dyt_s, xt, xt_s, offsets, torch.float32,
                                           tile=self.tile)

    # -- expert routing (ep.Route's layout; the exchanges started here, as ExpertComm's)
    @staticmethod
    def route(comm, idx_TK):
        """The one-hop route of this rank's slots (token, k) to their experts' ranks; slots
        ordered by (destination rank, local expert). Counts are exchanged here."""
        if comm.group is None and comm.ep_size > 1:
            raise RuntimeError(
                f"expert placement spans {comm.ep_size} EP ranks but this layer has no EP "
                "process group: build it through runtime.trainer.Trainer"
            )
        return comm.route_slots(idx_TK)

    @staticmethod
    def rows_of(t, index):
        """t[index] along rows (fp8 gathered as bytes)."""
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).index_select(0, index)
        return t.index_select(0, index)

    @staticmethod
    def send_rows(route, tensors, tag: str, backward: bool = False):
        """Rows in the route's order to their experts' ranks, arriving by local expert
        (the dispatch; backward=True: the combine's gradient, the same way)."""
        from .overlap import BACKWARD, FORWARD

        if not route.moves:
            return tuple(tensors)
        role, label = (BACKWARD, f"{tag}.combine") if backward else (FORWARD, f"{tag}.dispatch")
        outs = route.comm.exchange(list(tensors), route.recv_splits, route.send_splits,
                                   route.group, role, label)
        return tuple(o.index_select(0, route.perm) for o in outs)

    @staticmethod
    def return_rows(route, tensors, tag: str, backward: bool = False):
        """Rows by local expert back to the ranks they came from, in the route's order
        (the combine; backward=True: the dispatch's gradient)."""
        from .overlap import BACKWARD, FORWARD

        if not route.moves:
            return tuple(tensors)
        role, label = (BACKWARD, f"{tag}.dispatch") if backward else (FORWARD, f"{tag}.combine")
        ins = [t.index_select(0, route.inv_perm) for t in tensors]
        return tuple(route.comm.exchange(ins, route.send_splits, route.recv_splits, route.group,
                                         role, label))

    def two_hop(self, comm, idx_TK, w_TK, tensors, tag: str):
        """DeepSeek-V3's node-then-GPU dispatch of this rank's tokens (`TwoHop`): returns
        the route and `tensors` (rows by token) arrived at their experts by local expert,
        then the gate weight of each arrived row."""
        hop = TwoHop(self, comm, idx_TK, w_TK)
        return hop, hop.dispatch(tensors, tag)

    # -- selective recomputation (the plan's train.recompute)
    @staticmethod
    def replayed(fn, *args):
        """`fn(*args)` keeping for the backward only its inputs and the attention core's
        outputs, the rest recomputed when the backward reaches it (as the eager MLA's
        selective recomputation; runtime/layers.py `replayed`)."""
        from .attention import is_attention_core
        from .layers import replayed

        return replayed(fn, *args, keep=is_attention_core)

    # -- the attention core (kept in its plan dtype; torch picks the fused SDPA kernel)
    @staticmethod
    def attention(q_BHSd, k_BHSd, v_BHSd, scale: float, core_dtype, out_dtype):
        out = F.scaled_dot_product_attention(
            q_BHSd.to(core_dtype), k_BHSd.to(core_dtype), v_BHSd.to(core_dtype),
            is_causal=True, scale=scale,
        )  # fmt: skip
        return out.to(out_dtype)


class TwoHop:
    """The two-hop route of the generated expert chunk, as `ep.ExpertComm` runs it eagerly:
    a token crosses to each node holding one of its experts once (hop 1, to the rank with
    its own local index there), and that forwarding rank sends the copy on to the owners
    of the token's experts in the node (hop 2); the replies are summed per copy on the
    forwarding rank, so one row per (token, node) crosses back.

    Every rank is at once a source (its tokens), a forwarding rank (copies arrived by hop
    1) and an expert owner (rows arrived by hop 2). The chunk sees what one-hop routes
    give it: rows by local expert (`counts`) with each row's gate weight beside them (the
    owner applies it inside SwiGLU, so replies come back weighted), and for the combine a
    layout `moe_combine` and `moe_dispatch_bwd` read as they read one-hop slots: `pos`
    (T, nodes) holds the row of each (token, node) copy's reply (a zero row where the
    token reaches no expert on that node). Each row's gate gradient, taken by its owner,
    travels back with the input gradient and is placed at its (token, k) at the source."""

    moves = True

    def __init__(self, rt, comm, idx_TK, w_TK):
        self.rt, self.comm = rt, comm
        t, k = idx_TK.shape
        self.hop1, copy_tok, copy_node, on_node_CK = comm.node_copies(idx_TK)
        order1 = self.hop1.order
        self.src1 = copy_tok.index_select(0, order1)  # each copy's token, in hop 1's order
        self.on_node1 = on_node_CK.index_select(0, order1)
        idx_C, w_C = idx_TK.index_select(0, self.src1), w_TK.index_select(0, self.src1)
        self.slot_e = torch.where(self.on_node1, idx_C, torch.full_like(idx_C, -1))
        self.slot_w = torch.where(self.on_node1, w_C, torch.zeros_like(w_C)).float()
        c = copy_tok.numel()
        nodes = comm.ep_size // comm.node_size
        self.pos = torch.full((t, nodes), c, dtype=torch.long, device=idx_TK.device)
        self.pos[copy_tok, copy_node] = self.hop1.inv_order
        self.tokens, self.top_k = t, k

    def dispatch(self, tensors, tag: str):
        """Rows by token (fp8 codes, scales or bf16) to the owners of their experts, and
        the gate weight of each row as it arrived (fp32)."""
        rt = self.rt
        first = [rt.rows_of(x, self.src1) for x in tensors]
        *at_fwd, e_fwd, w_fwd = rt.send_rows(self.hop1, (*first, self.slot_e, self.slot_w), tag)
        self.slot_e = self.slot_w = None  # sent: nothing on the route outlives its use
        # hop 2: each valid slot of an arrived copy to its expert's owner in this node
        self.hop2, c_idx, k_idx = self.comm.node_slots(e_fwd)
        order2 = self.hop2.order
        self.copy2 = c_idx.index_select(0, order2)  # each hop-2 slot's copy, in hop 2's order
        self.slot2 = k_idx.index_select(0, order2)
        self.copies_in = e_fwd.shape[0]
        self.counts = self.hop2.counts
        second = [rt.rows_of(x, self.copy2) for x in at_fwd]
        return rt.send_rows(self.hop2, (*second, w_fwd[self.copy2, self.slot2]), tag)

    def combine(self, y, tag: str):
        """The experts' rows (weighted by their owners) back: summed per copy on the
        forwarding rank, one row per copy home; returns (rows, pos) for `moe_combine`."""
        rt = self.rt
        (y_slot,) = rt.return_rows(self.hop2, (y,), tag)
        y_copy = y_slot.new_zeros(self.copies_in, y.shape[1]).index_add(0, self.copy2, y_slot)
        (y_back,) = rt.return_rows(self.hop1, (y_copy,), tag)
        return torch.cat((y_back, y_back.new_zeros(1, y.shape[1]))), self.pos

    def combine_backward(self, dout, tag: str):
        """dout (T, D) in the combine dtype to the experts' owners, a row per slot (each
        copy's row to every slot it was forwarded to; unscaled: the owner's SwiGLU
        backward applies the gate)."""
        rt = self.rt
        (dy_copy,) = rt.send_rows(self.hop1, (rt.rows_of(dout, self.src1),), tag, backward=True)
        (dy_arr,) = rt.send_rows(self.hop2, (dy_copy.index_select(0, self.copy2),), tag,
                                 backward=True)  # fmt: skip
        return dy_arr

    def dispatch_backward(self, dx, dw_rows, tag: str):
        """The experts' input gradients (rows by local expert) and their rows' gate
        gradients home: summed per copy on the forwarding rank, one row per copy back
        with its slots' gate gradients; returns (rows for `moe_dispatch_bwd` with `pos`,
        the gate gradient (T, top_k) fp32)."""
        rt = self.rt
        dx_slot, dw_slot = rt.return_rows(self.hop2, (dx, dw_rows), tag, backward=True)
        dx_copy = dx_slot.new_zeros(self.copies_in, dx.shape[1]).index_add(0, self.copy2, dx_slot)
        dw_fwd = torch.zeros(self.copies_in, self.top_k, dtype=torch.float32, device=dx.device)
        dw_fwd[self.copy2, self.slot2] = dw_slot
        dx_back, dw_back = rt.return_rows(self.hop1, (dx_copy, dw_fwd), tag, backward=True)
        dw = torch.zeros(self.tokens, self.top_k, dtype=torch.float32, device=dw_back.device)
        dw.index_add_(0, self.src1, torch.where(self.on_node1, dw_back, 0.0))
        return torch.cat((dx_back, dx_back.new_zeros(1, dx.shape[1]))), dw


def _epilogue(out32, bias, residual, out_dtype):
    if bias is not None:
        out32 = out32 + bias.to(torch.float32)
    if residual is not None:
        out32 = out32 + residual.to(torch.float32)
    return out32.to(out_dtype)


# ----------------------------------------------------------------------------- loading


class ProgramError(Exception):
    """A generated program that this runtime cannot run (one line, what to do)."""


def load_program(path: str | os.PathLike) -> types.ModuleType:
    """Import a build's generated program.py and check its interface version."""
    path = pathlib.Path(path).resolve()
    if not path.is_file():
        raise ProgramError(f"no generated program at {path}; recompile the spec")
    module = import_generated(path, "_dsvc_program_")
    api = getattr(module, "PROGRAM_API", None)
    if api != PROGRAM_API:
        forget(module)
        raise ProgramError(f"{path} was generated for program interface {api}, this runtime "
                           f"runs {PROGRAM_API}; recompile the spec with this dsvc")
    return module


def program_mismatch(program, plan) -> str | None:
    """Why `program` cannot run `plan` (None: it can): the precision it was generated
    for must be the plan's (a `--fp32` run keeps the eager modules). Recomputation runs
    in either: full replays a block, program or not; selective replays the generated MLA
    chunk up to the attention core (its other chunks keep FP8 codes and the inputs the
    eager modules keep under selective)."""
    want = program.PRECISION
    prec = plan.precision
    have = {"default": prec.default, "norm": prec.kept["norm"],
            "router": prec.kept["router"], "attention_core": prec.kept["attention_core"]}
    for role in program.FP8_ROLES:
        fmt = prec.linear_for(role)
        have[f"linear.{role}"] = f"{fmt.format}/{fmt.act_tile}/{fmt.ue8m0}/{fmt.pad}"
    diff = sorted(k for k in want if have.get(k) != want[k])
    if diff:
        return ("the plan's precision differs from the one the program was generated for "
                f"({', '.join(diff)})")
    return None


def attach_program(modules, program, plan, backend) -> tuple[int, int]:
    """Make every Block of `modules` whose kind `program` covers run it; returns (blocks
    attached, blocks in all).

    `backend` is the plan's FP8 backend (name or kernel module). Nothing is attached
    when `program_mismatch` finds a reason."""
    from .layers import dtype_of

    blocks = [b for mod in modules for b in _blocks(mod)]
    if program_mismatch(program, plan) is not None:
        return 0, len(blocks)
    lin = plan.precision.linear_for(program.FP8_ROLES[0]) if program.FP8_ROLES else None
    rt = ProgramRuntime(program_ops(backend), lin.act_tile if lin else fp8_torch.TILE,
                        lin.ue8m0 if lin else False, dtype_of(plan.precision.default))
    count = 0
    for block in blocks:
        fn = program.BLOCKS.get(block.kind)
        if fn is None:
            continue
        block.program = (fn, rt)
        count += 1
    return count, len(blocks)


def release_weights(modules) -> None:
    """Drop the generated blocks' FP8 weight copies (`ProgramRuntime.release_weights`): the
    trainer calls it after a step's backward, before the optimizer runs."""
    for rt in {id(b.program[1]): b.program[1] for mod in modules for b in _blocks(mod)
               if b.program is not None}.values():
        rt.release_weights()


def detach_program(modules) -> None:
    """Back to the eager modules (the reference)."""
    for mod in modules:
        for block in _blocks(mod):
            block.program = None


def _blocks(module):
    from .model import Block

    return [m for m in module.modules() if isinstance(m, Block)]
