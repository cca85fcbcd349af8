"""Pass `fuse`: the memory-bound work of each decoder block grouped into kernels.

After `assign_precision` every FP8 boundary is an explicit `quantize` op and every
elementwise chain (norm, RoPE, SwiGLU, routing, residual adds) a separate op. Run
one by one, each reads its inputs from memory and writes its output back. This pass
groups them (a pure function: ops are annotated, nothing is removed) into the kernels
the generated stage program launches (docs/program.md):

| kind | ops | kernels (forward / backward) |
|---|---|---|
| rmsnorm_quant | norm + its quantize ops (one for all FP8 consumers) | `rmsnorm_quant` / `rmsnorm_bwd` |
| mla_rope_qkv | rope + MLA's latent split into the core's q, k, v | `mla_rope_qkv` / `..._bwd` |
| gqa_rope | rope on q and k | `gqa_rope` / `gqa_rope_bwd` |
| quant_bhsd | the core output's quantize, read in (B, H, S, V) | `quantize_bhsd` |
| gemm_residual | a projection + the residual add after it | the GEMM's epilogue |
| swiglu_quant | SwiGLU + the down projection's quantize (+ g, u in FP8, below) | `swiglu_quant` / `swiglu_bwd_quant` |
| router_topk | scores, bias, group top-k, gate weights, counts | `router_topk` / `router_bwd` |
| moe_combine | routed outputs (weighted by their experts) + shared + residual | `moe_combine` / `moe_dispatch_bwd` |

The backward kernels carry on the fusion: `rmsnorm_bwd` adds the residual stream's
gradient, quantises dx for the GEMMs that read it and recomputes the normed input's
token tiles for their wgrad; the RoPE and SwiGLU backwards write their gradients
already quantised in both tilings. The routed experts' SwiGLU multiplies each row by its
slot's gate weight (DeepSeek-V3's layout) and its backward takes the gates' gradient
beside its own, so the combine only sums and nothing of the experts' outputs is kept
for the backward. Under `precision.cache_fp8_activations` the SwiGLU
kernel also writes its inputs g and u as FP8 tiles, which the backward reads instead of
them in bf16.

Only the blocks' ops are grouped (embedding, head and the MTP module's own norms run
eagerly), and only under an FP8 linear policy (the kernels are built around its
quantisations; a bf16 model's blocks run eagerly). Each group records its bytes per
micro-batch (sympy in T): what the fused kernels read and write, forward and backward,
beside what the member ops move one by one, so `dsvc inspect --after fuse` shows the
saving; `bench/fusion_cpu.py` measures it from a run.
"""

from __future__ import annotations

import math

import sympy

from dsvc.compiler.ir import DTYPE_BYTES, FusionGroup, Graph, Op, T, Tensor

BLOCK_NORMS = (".attn_norm", ".ffn_norm", ".q_norm", ".kv_norm")
RSTD_BYTES = 4  # fp32 reciprocal RMS per token, kept for the norm's backward


def fuse(graph: Graph) -> Graph:
    """A copy of `graph` with `fusion` set and each member op's `fusion` attribute naming
    its groups."""
    out = graph.derive("fuse")
    groups = _Grouper(graph).groups()
    members: dict[str, list[str]] = {}
    for g in groups:
        for name in g.ops:
            members.setdefault(name, []).append(g.name)
    for name, names in members.items():
        out.replace(out.op(name).with_attrs(fusion=tuple(names)))
    out.fusion = tuple(groups)
    return out


def _nbytes(t: Tensor):
    return t.nbytes


def _tiles(n, tile: int):
    if isinstance(n, (int, sympy.Integer)):
        return sympy.Integer(math.ceil(int(n) / tile))
    return sympy.ceiling(n / tile)


def quant_bytes(rows, cols, tile: int, both: bool = False):
    """Bytes of an fp8 (rows, cols) tensor with its 1 x tile scales (and, `both`, its
    tile x 1 token-tile copy with scales)."""
    one = rows * cols + 4 * rows * _tiles(cols, tile)
    return one + (rows * cols + 4 * cols * _tiles(rows, tile) if both else 0)


class _Grouper:
    def __init__(self, graph: Graph):
        self.g = graph
        self.pol = graph.spec.precision
        self.a = DTYPE_BYTES[self.pol.default]
        self.tile = self.pol.linear.act_tile[1]
        self.out: list[FusionGroup] = []
        self.taken: set[str] = set()

    def groups(self) -> list[FusionGroup]:
        if not self.pol.linear.is_fp8:
            return []  # the kernels fuse around FP8 boundaries; these blocks run eagerly
        for op in self.g.ops():
            if op.block not in ("layer", "mtp") or op.layer is None:
                continue
            if op.kind == "norm" and op.name.endswith(BLOCK_NORMS):
                self._norm(op)
            elif op.kind == "rope":
                self._rope(op)
            elif op.kind == "attention_core":
                self._core_out(op)
            elif op.kind == "linear" and op.attr("fp8"):
                self._residual_epilogue(op)
            elif op.kind == "act":
                self._swiglu(op)
            elif op.kind == "router":
                self._router(op)
            elif op.kind == "experts":
                self._experts(op)
        return self.out

    # -- helpers
    def _consumers(self, op: Op, port: int = 0) -> list[Op]:
        return [self.g.op(c) for c, _, _ in self.g.consumers(op.name, port)]

    def _producer(self, op: Op, port: int) -> Op:
        return self.g.op(self.g.producer(op.name, port)[0])

    def _add(self, name, kind, ops, layer, kernel, backward, *, reads, writes, bwd_reads,
             bwd_writes, unfused_reads, unfused_writes, part="", what="") -> None:
        self.out.append(FusionGroup(
            name=name, kind=kind, ops=tuple(ops), layer=layer, kernel=kernel, backward=backward,
            reads=sympy.expand(reads), writes=sympy.expand(writes),
            bwd_reads=sympy.expand(bwd_reads), bwd_writes=sympy.expand(bwd_writes),
            unfused_reads=sympy.expand(unfused_reads),
            unfused_writes=sympy.expand(unfused_writes), part=part, what=what))
        self.taken.update(o for o in ops if not part)

    @staticmethod
    def _io(*ops: Op):
        """(bytes read, bytes written) of ops run one by one (their tensors in and out)."""
        reads = sum((_nbytes(t) for op in ops for t in op.inputs), sympy.Integer(0))
        writes = sum((_nbytes(t) for op in ops for t in op.outputs), sympy.Integer(0))
        reads += sum(op.param_bytes for op in ops)
        return reads, writes

    # -- norm -> quantize
    def _norm(self, norm: Op) -> None:
        quants = [c for c in self._consumers(norm) if c.kind == "quantize"]
        others = [c for c in self._consumers(norm) if c.kind != "quantize"]
        if not quants:
            return
        k = norm.attr("dim")
        x = norm.inputs[0]
        a, tile = self.a, self.tile
        src = self._producer(norm, 0)
        latent = norm.attr("reads") is not None  # MLA's kv_norm reads a slice of kv_down
        residual = not latent and not norm.name.endswith(".q_norm")
        y_out = bool(others)
        extra = x.shape[-1] - k if latent else 0  # the rope key's columns beside the latent
        # the consumers' dgrads sum to dy; what the backward writes depends on who reads dx
        dx = "act" if norm.name.endswith(".attn_norm") else (
            "both" if norm.name.endswith(".ffn_norm") else "quant")
        reads = T * k * a + norm.param_bytes
        writes = quant_bytes(T, k, tile) + RSTD_BYTES * T + (T * k * a if y_out else 0)
        bwd_reads = 2 * T * k * a + RSTD_BYTES * T + norm.param_bytes
        bwd_reads += (T * k * a if residual else 0) + T * extra * a
        width = k + extra
        bwd_writes = quant_bytes(T, k, tile, both=True) + 4 * k  # x's token tiles, dw
        if dx in ("quant", "both"):
            bwd_writes += quant_bytes(T, width, tile, both=True)
        if dx in ("act", "both"):
            bwd_writes += T * width * a
        ur, uw = self._io(norm, *quants)
        # eager: norm bwd (reads dy, x; writes dx), the dx sum with the residual's, and each
        # consumer quantising dy in both tilings
        ubr = 2 * T * k * a + (2 * T * k * a if residual else 0) + len(quants) * T * width * a
        ubw = T * k * a + (T * k * a if residual else 0)
        ubw += len(quants) * quant_bytes(T, width, tile, both=True)
        flags = f"dx={dx}{' +residual' if residual else ''}{' +y' if y_out else ''}"
        self._add(f"{norm.name}+quant", "rmsnorm_quant", [norm.name] + [q.name for q in quants],
                  norm.layer, "rmsnorm_quant", "rmsnorm_bwd", reads=reads, writes=writes,
                  bwd_reads=bwd_reads, bwd_writes=bwd_writes, unfused_reads=ur + ubr,
                  unfused_writes=uw + ubw,
                  what=f"RMSNorm -> 1x{tile} tiles of {k}; {flags}"
                       f"{f'; latent of {src.name} ({extra} rope columns beside)' if latent else ''}")

    # -- RoPE (+ MLA's q/k/v assembly)
    def _rope(self, rope: Op) -> None:
        core = next(c for c in self._consumers(rope) if c.kind == "attention_core")
        heads = core.attr("heads")
        a = self.a
        q, k_src = rope.inputs
        mla = core.attr("kv_heads") is None
        if mla:
            kvu = self._producer(core, 1).outputs[0]
            r = rope.attr("rotary_dim")
            dqk = q.shape[-1] // heads
            nope = dqk - r
            v = kvu.shape[-1] // heads - nope
            outs = T * heads * (2 * dqk + v) * a  # Q, K, V for the core
            reads = _nbytes(q) + _nbytes(kvu) + T * r * a
            bwd_reads = outs
            bwd_writes = quant_bytes(T, q.shape[-1], self.tile, both=True)
            bwd_writes += quant_bytes(T, kvu.shape[-1], self.tile, both=True) + T * r * a
            ur, uw = self._io(rope)
            # eager: q split + rope on a float copy + cat, k rope + expand + cat, v slice copy
            ur += 3 * outs
            uw += 3 * outs
            kind, what = "mla_rope_qkv", (f"RoPE on q's last {r} per head and the shared key; "
                                          f"q, k (+ key broadcast to {heads} heads), v for the core")
        else:
            outs = _nbytes(q) + _nbytes(k_src)
            reads = outs
            bwd_reads = outs
            bwd_writes = quant_bytes(T, q.shape[-1], self.tile, both=True)
            bwd_writes += quant_bytes(T, k_src.shape[-1], self.tile, both=True)
            ur, uw = self._io(rope)
            ur, uw = ur + 2 * outs, uw + 2 * outs  # the float copies of eager's rotation
            kind, what = "gqa_rope", "RoPE (rotate-half) on q and k"
        ubr, ubw = bwd_reads * 3, bwd_writes * 2
        if not mla:  # the backward rotates dQ, dK into bf16 dq, dk, then quantises each
            bwd_reads, bwd_writes = bwd_reads + outs, bwd_writes + outs
        self._add(rope.name, kind, [rope.name], rope.layer, kind, f"{kind}_bwd", reads=reads,
                  writes=outs, bwd_reads=bwd_reads, bwd_writes=bwd_writes,
                  unfused_reads=ur + ubr, unfused_writes=uw + ubw, what=what)

    # -- attention output -> quantize
    def _core_out(self, core: Op) -> None:
        quants = [c for c in self._consumers(core) if c.kind == "quantize"]
        if not quants:
            return
        o = core.outputs[0]
        width = o.shape[-1]
        reads = _nbytes(o)
        writes = quant_bytes(T, width, self.tile)
        ur, uw = self._io(*quants)
        ur, uw = ur + 2 * _nbytes(o), uw + 2 * _nbytes(o)  # eager's transposed copy first
        self._add(f"{core.name}.quant", "quant_bhsd", [q.name for q in quants], core.layer,
                  "quantize_bhsd", "quantize_bhsd", reads=reads, writes=writes,
                  bwd_reads=_nbytes(o), bwd_writes=quant_bytes(T, width, self.tile, both=True)
                  - quant_bytes(T, width, self.tile), unfused_reads=ur, unfused_writes=uw,
                  what="the core output (B, H, S, V) quantised as o_proj's (B S, H V) rows")

    # -- projection + residual add
    def _residual_epilogue(self, lin: Op) -> None:
        adds = [c for c in self._consumers(lin) if c.kind == "add"]
        if len(adds) != 1 or len(adds[0].inputs) != 2 or adds[0].name in self.taken:
            return
        add = adds[0]
        y = lin.outputs[0]
        self._add(f"{lin.name}+{add.name.rsplit('.', 1)[-1]}", "gemm_residual",
                  [lin.name, add.name], lin.layer, "gemm", "-",
                  reads=_nbytes(y), writes=0, bwd_reads=0, bwd_writes=0,
                  unfused_reads=3 * _nbytes(y), unfused_writes=2 * _nbytes(y),
                  what="the residual add in the GEMM's epilogue (one rounding, no separate add)")

    # -- SwiGLU -> quantize
    def _swiglu_bytes(self, inter, tokens, grouped: bool, experts: int = 0):
        """Bytes of a SwiGLU group; `grouped` (routed experts): token tiles by expert, and
        each row weighted by its gate, whose gradient the backward writes (a part per
        column tile, summed)."""
        a, tile = self.a, self.tile
        reads = 2 * tokens * inter * a
        writes = quant_bytes(tokens, inter, tile)
        cols = _tiles(tokens, tile) + (experts if grouped else 0)
        tt = tokens * inter + 4 * inter * cols  # one tensor in token tiles
        bwd_reads = 3 * tokens * inter * a
        bwd_writes = 2 * (quant_bytes(tokens, inter, tile) + tt) + tt
        # eager: silu and the product written, quantised; backward through both
        ur = reads + tokens * inter * a * 2
        uw = writes + 2 * tokens * inter * a
        ubr = 6 * tokens * inter * a
        ubw = 3 * tokens * inter * a + 2 * (quant_bytes(tokens, inter, tile) + tt) + tt
        if self.pol.cache_fp8_activations:  # g and u written as FP8 tiles and read back so
            writes += 2 * quant_bytes(tokens, inter, tile)
            bwd_reads += 2 * quant_bytes(tokens, inter, tile) - 2 * tokens * inter * a
        if grouped:  # the gates read; their gradient's parts written, read and summed
            parts = 4 * tokens * math.ceil(inter / tile)
            reads += 4 * tokens
            bwd_reads += 4 * tokens + parts
            bwd_writes += parts + 4 * tokens
        return reads, writes, bwd_reads, bwd_writes, ur + ubr, uw + ubw

    @property
    def _kept_note(self) -> str:
        return "; g, u kept in FP8 for the backward" if self.pol.cache_fp8_activations else ""

    def _swiglu(self, act: Op) -> None:
        quants = [c for c in self._consumers(act) if c.kind == "quantize"]
        if not quants:
            return
        inter = act.outputs[0].shape[-1]
        r, w, br, bw, ur, uw = self._swiglu_bytes(inter, T, False)
        self._add(f"{act.name}+quant", "swiglu_quant", [act.name] + [q.name for q in quants],
                  act.layer, "swiglu_quant", "swiglu_bwd_quant", reads=r, writes=w,
                  bwd_reads=br, bwd_writes=bw, unfused_reads=ur, unfused_writes=uw,
                  what=f"silu(g) u in fp32 straight into 1x{self.tile} tiles of {inter}"
                  + self._kept_note)

    # -- routing
    def _router(self, router: Op) -> None:
        e, k = router.attr("routed"), router.attr("top_k")
        logits = T * e * 4
        reads = logits + 4 * e
        writes = T * k * (4 + 8) + T * e * 4 + 8 * e  # weights, ids, scores, counts
        bwd_reads = T * k * 12 + T * e * 4 * 2
        bwd_writes = T * e * 4
        # eager: ~15 elementwise / top-k ops over (T, E) fp32 each reading and writing it
        self._add(f"{router.name}.route", "router_topk", [router.name], router.layer,
                  "router_topk", "router_bwd", reads=reads, writes=writes, bwd_reads=bwd_reads,
                  bwd_writes=bwd_writes, unfused_reads=15 * logits, unfused_writes=12 * logits,
                  what=(f"{router.attr('score')} scores + bias, top-{router.attr('top_groups')} of "
                        f"{router.attr('groups')} groups, top-{k} of {e}, gate weights"))

    # -- routed experts: SwiGLU inside, and the combine
    def _experts(self, experts: Op) -> None:
        a, tile = self.a, self.tile
        k, inter, d = experts.attr("top_k"), experts.attr("intermediate"), experts.outputs[0].shape[-1]
        m = T * k  # routed slots
        place = experts.attr("routed")
        r, w, br, bw, ur, uw = self._swiglu_bytes(inter, m, True, place)
        self._add(f"{experts.name}:swiglu", "swiglu_quant", [experts.name], experts.layer,
                  "swiglu_quant", "swiglu_bwd_quant", reads=r, writes=w, bwd_reads=br,
                  bwd_writes=bw, unfused_reads=ur, unfused_writes=uw, part="swiglu",
                  what=f"routed experts: silu(g) u times the gate into 1x{tile} tiles; token "
                  "tiles by expert; the gates' gradient" + self._kept_note)
        add = next((c for c in self._consumers(experts) if c.kind == "add"), None)
        if add is None:
            return
        parts = [self.g.op(self.g.producer(add.name, i)[0]) for i in range(len(add.inputs))]
        shared = [p for p in parts if p.kind == "swiglu_ffn"]
        members = [experts.name, add.name] + [s.name for s in shared]
        if shared:
            sh = shared[0]
            si = sh.attr("intermediate")
            r2, w2, br2, bw2, ur2, uw2 = self._swiglu_bytes(si, T, False)
            self._add(f"{sh.name}:swiglu", "swiglu_quant", [sh.name], sh.layer, "swiglu_quant",
                      "swiglu_bwd_quant", reads=r2, writes=w2, bwd_reads=br2, bwd_writes=bw2,
                      unfused_reads=ur2, unfused_writes=uw2, part="swiglu",
                      what=f"shared experts: silu(g) u into 1x{tile} tiles of {si}"
                      + self._kept_note)
        reads = m * d * a + T * k * 8 + T * d * a  # the rows, their positions, the residual
        writes = T * d * a
        # backward: dout's rows quantised by expert (unscaled: the experts' SwiGLU applies
        # the gates and takes their gradient), dn summed
        bwd_reads = T * k * 8 + m * d * a + 2 * T * d * a
        bwd_writes = quant_bytes(m, d, tile) + m * d + 4 * d * (_tiles(m, tile) + place) + T * d * a
        # eager: K copies of each row, the weighted product and its sum, two adds
        ur = 3 * m * d * a + 3 * T * d * a
        uw = 2 * m * d * a + 2 * T * d * a
        ubr = 4 * m * d * a + 2 * T * d * a
        ubw = 3 * m * d * a + T * k * 4 + 2 * T * d * a + quant_bytes(m, d, tile, both=True)
        self._add(f"{experts.name.rsplit('.', 1)[0]}.combine", "moe_combine", members,
                  experts.layer, "moe_combine", "moe_dispatch_bwd", reads=reads,
                  writes=writes, bwd_reads=bwd_reads, bwd_writes=bwd_writes,
                  unfused_reads=ur + ubr, unfused_writes=uw + ubw, part="combine",
                  what=("routed outputs (weighted by their experts) + the residual"
                        + (" (shared experts added in their down GEMM's epilogue)" if shared
                           else "")))
