"""What one graph op costs when the runtime's eager modules run it: its kernels, timed on the card.

The eager modules (runtime/*.py, GPU path with the generated Triton FP8 kernels) run the
embedding, head, loss and MTP's own parts, and every decoder block the generated stage
program does not cover; `simulate_program.ProgramCoster` costs the blocks it does (an
FP8 plan's). Each graph op stands for the kernels the eager modules issue for it. Per
op and micro-batch this gives, for the forward, the input-gradient and the
weight-gradient parts:

* GPU seconds, with every SM and with the SMs communication kernels leave
  (`KernelModel.contended_sms`: compute overlapped with an all-to-all);
* host ops: eager torch spends host time on each (`host_s_per_op`); a chunk takes the
  longer of its GPU time and its host time (the host runs ahead until it cannot);
* replayed forward work, charged to the backward under `train.recompute`.

The kernels, from the runtime's code:

* FP8 linear (runtime/fp8_autograd.py): forward quantises its input in both layouts
  and its fp32 weight (the weight every micro-batch), one FP8 GEMM; backward
  quantises the output gradient in both layouts, the dgrad and wgrad GEMMs, and the
  fp32 weight gradient accumulates into `.grad` (read, add, write);
* bf16 linear (router, head): a bf16 copy of the fp32 weight per use, cuBLAS GEMMs,
  the weight gradient cast to fp32 and accumulated;
* routed experts: rows gathered and sorted by expert (FP8-quantised for the wire and
  dequantised on arrival under EP), two quantisers and three weight quantisers, three
  grouped GEMMs, SwiGLU fused into the down projection's quantiser; backward the
  same in reverse with SwiGLU's gradient in fp32 and the wgrads over token tiles; the
  weighted sum of the k outputs per token;
* RMSNorm: casts to and from fp32 around torch's fused kernel; RoPE on fp32 copies,
  the concatenations into q and k, the output's reshape copy; residual adds; SwiGLU's
  two element-wise kernels; the embedding's bf16 copy of its table per micro-batch and
  its scatter-add backward; the loss's fp32 logits and log-softmax;
* fused attention: causal FLOPs at the attention rate.
"""

from __future__ import annotations

import dataclasses

from dsvc.compiler.ir import DTYPE_BYTES, num

PHASES = ("fwd", "dgrad", "wgrad")
# What the GPU time of an op is spent in (bench/step_profile.py measures the same split):
# the generated FP8 GEMMs (dense and grouped), cuBLAS BF16 GEMMs, the fused attention
# core, and memory-bound kernels (quantisers, fused and element-wise kernels, copies)
KERNEL_KINDS = ("fp8_gemm", "bf16_gemm", "attention", "memory")
# Decoder-block ops by their name's part after the block prefix ("L3.", "mtp0."):
# what full recomputation replays.
BLOCK_PARTS = ("attn_norm", "attn", "attn_add", "ffn_norm", "ffn", "moe", "ffn_add")
SELECTIVE_ROLES = ("q_b_proj", "kv_b_proj", "q_proj")  # MLA up-projections (replayed)


@dataclasses.dataclass
class OpCost:
    """Seconds and host ops of one op per micro-batch, by phase; `replay` is forward work
    the backward repeats (recomputation), already included in `dgrad`."""

    gpu: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    gpu_c: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    host: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    syncs: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    by_kind: dict = dataclasses.field(default_factory=dict)  # (phase, KERNEL_KINDS) -> gpu

    def add(self, phase: str, gpu: float, gpu_c: float | None = None, host: int = 0,
            kind: str = "memory") -> None:
        self.gpu[phase] += gpu
        self.gpu_c[phase] += gpu if gpu_c is None else gpu_c
        self.host[phase] += host
        self.by_kind[(phase, kind)] = self.by_kind.get((phase, kind), 0.0) + gpu

    def scale(self, factor: float) -> None:
        """GPU seconds times `factor` (host ops unchanged): more rows on the same kernels."""
        for phase in PHASES:
            self.gpu[phase] *= factor
            self.gpu_c[phase] *= factor
        self.by_kind = {key: t * factor for key, t in self.by_kind.items()}

    def absorb(self, other: OpCost) -> None:
        """Adds `other`'s seconds, host ops and kinds to this cost's."""
        for phase in PHASES:
            self.gpu[phase] += other.gpu[phase]
            self.gpu_c[phase] += other.gpu_c[phase]
            self.host[phase] += other.host[phase]
        for key, t in other.by_kind.items():
            self.by_kind[key] = self.by_kind.get(key, 0.0) + t

    def add_replay(self, other: OpCost) -> None:
        """`other`'s forward run again in this op's input-gradient phase (recomputation)."""
        self.gpu["dgrad"] += other.gpu["fwd"]
        self.gpu_c["dgrad"] += other.gpu_c["fwd"]
        self.host["dgrad"] += other.host["fwd"]
        for (phase, kind), t in list(other.by_kind.items()):
            if phase == "fwd":
                self.by_kind[("dgrad", kind)] = self.by_kind.get(("dgrad", kind), 0.0) + t


class OpCoster:
    """Costs the ops of one graph on one card (`KernelModel`)."""

    def __init__(self, graph, kernels, ep: int):
        spec = graph.spec
        self.g, self.k, self.ep = graph, kernels, max(1, ep)
        self.T = graph.tokens
        self.a = DTYPE_BYTES[spec.precision.default]
        self.norm_b = DTYPE_BYTES[spec.precision.keep.get("norm", spec.precision.default)]
        self.recompute = spec.train.recompute if spec.train is not None else "none"
        self.fp8_dispatch = spec.precision.dispatch.startswith("fp8")
        # fp32 scale bytes per element of a 1 x tile activation tile
        self.scale = 4 / spec.precision.linear.act_tile[1]
        self.sms_c = kernels.contended_sms

    # -- helpers -----------------------------------------------------------------------
    def _copy(self, cost: OpCost, phase: str, nbytes: float, host: int = 1,
              quantizer: str | None = None) -> None:
        t = self.k.copy(nbytes, quantizer)
        cost.add(phase, t, t, host)

    def _fp8_linear(self, cost: OpCost, m, n, k, phases=PHASES, scale=1.0) -> None:
        """An FP8 linear of m tokens, k -> n (runtime/fp8_autograd.py FP8Linear)."""
        K, a = self.k, self.a
        scales = self.scale
        if "fwd" in phases:
            self._copy(cost, "fwd", m * k * (a + 2 + 2 * scales) * scale, 1, "quantize_act_both")
            self._copy(cost, "fwd", n * k * (4 + 1) * scale, 1, "quantize_weight")
            cost.add("fwd", K.fp8_gemm(m, n, k) * scale, K.fp8_gemm(m, n, k, self.sms_c) * scale, 2,
                     "fp8_gemm")
        if "dgrad" in phases:
            self._copy(cost, "dgrad", m * n * (a + 2 + 2 * scales) * scale, 1,
                       "quantize_act_both")
            cost.add("dgrad", K.fp8_gemm(m, k, n) * scale, K.fp8_gemm(m, k, n, self.sms_c) * scale,
                     2, "fp8_gemm")
        if "wgrad" in phases:
            cost.add("wgrad", K.fp8_gemm(n, k, m) * scale, K.fp8_gemm(n, k, m, self.sms_c) * scale,
                     1, "fp8_gemm")
            self._copy(cost, "wgrad", 12 * n * k * scale, 1)  # fp32 .grad: read, add, write

    def _bf16_linear(self, cost: OpCost, m, n, k, fp32: bool = False, phases=PHASES) -> None:
        """A bf16 (or fp32) linear through F.linear on cast operands: cuBLAS GEMMs."""
        K = self.k
        rate = 2 if fp32 else 1  # TF32 at half the BF16 rate
        if "fwd" in phases:
            if not fp32:
                self._copy(cost, "fwd", n * k * (4 + 2), 1)  # the bf16 copy of the weight
            cost.add("fwd", rate * K.bf16_gemm(m, n, k), rate * K.bf16_gemm(m, n, k, self.sms_c), 2,
                     "bf16_gemm")
        if "dgrad" in phases:
            cost.add("dgrad", rate * K.bf16_gemm(m, k, n),
                     rate * K.bf16_gemm(m, k, n, self.sms_c), 2, "bf16_gemm")
        if "wgrad" in phases:
            cost.add("wgrad", rate * K.bf16_gemm(n, k, m),
                     rate * K.bf16_gemm(n, k, m, self.sms_c), 1, "bf16_gemm")
            extra = 0 if fp32 else n * k * (2 + 4)  # the gradient cast back to fp32
            self._copy(cost, "wgrad", extra + 12 * n * k, 2)

    def _norm(self, cost: OpCost, width) -> None:
        """Casts to the norm dtype and back around torch's fused rms_norm."""
        T, a, nb = self.T, self.a, self.norm_b
        casts = (a + nb) * 2 if nb != a else 0
        self._copy(cost, "fwd", T * width * (casts + 2 * nb) + 4 * T, 3 if casts else 1)
        self._copy(cost, "dgrad", T * width * (casts + 3 * nb), 3 if casts else 1)
        self._copy(cost, "wgrad", 12 * width + T * width * nb, 1)

    # -- one op ------------------------------------------------------------------------
    def cost(self, op, load: float = 1.0) -> OpCost:
        """`op`'s kernels, with the forward work its backward repeats (recomputation).
        `load`: the busiest EP rank's routed tokens over the mean rank's (an `experts` op
        under a measured histogram, `simulate_costs.expert_skew`); the eager modules'
        costs scale with it as a whole."""
        c = self._cost(op)
        self._recompute(c, op)
        if load != 1.0:
            c.scale(load)
        return c

    def _cost(self, op) -> OpCost:
        c = OpCost()
        T, a = self.T, self.a
        kind = op.kind
        if kind == "linear":
            k, n = op.attr("in_features"), op.attr("out_features")
            if op.dtype.startswith("fp8"):
                self._fp8_linear(c, T, n, k)
                if op.attr("bias"):
                    self._copy(c, "fwd", 2 * a * T * n, 1)
            else:
                self._bf16_linear(c, T, n, k, fp32=op.dtype == "fp32")
        elif kind == "router":
            d, E, topk = op.inputs[0].shape[-1], op.attr("routed"), op.attr("top_k")
            d = num(d, T)
            self._bf16_linear(c, T, E, d, fp32=op.dtype == "fp32")
            # scores, bias, group ranking, top-k, gathers, renormalisation, the aux loss
            self._copy(c, "fwd", 8 * 4 * 2 * T * E + 4 * T * topk * 6, 18)
            self._copy(c, "dgrad", 4 * 4 * 2 * T * E, 8)
        elif kind == "experts":
            self._experts(c, op)
        elif kind == "swiglu_ffn":
            d, inter = num(op.inputs[0].shape[-1], T), op.attr("intermediate")
            for phase in PHASES:
                self._fp8_or_bf16(c, op, T, inter, d, (phase,), 2)  # gate and up
                self._fp8_or_bf16(c, op, T, d, inter, (phase,), 1)  # down
            self._act(c, inter)
        elif kind == "attention_core":
            c.add("fwd", self.k.attention(num(op.flops_fwd, T)),
                  self.k.attention(num(op.flops_fwd, T), sms=self.sms_c), 3, "attention")
            c.add("dgrad", self.k.attention(num(op.flops_dgrad, T), True),
                  self.k.attention(num(op.flops_dgrad, T), True, self.sms_c), 3, "attention")
        elif kind == "norm":
            self._norm(c, num(op.attr("dim"), T))
        elif kind == "rope":
            self._rope(c, op)
        elif kind == "add":
            width = num(op.outputs[0].shape[-1], T) if op.outputs[0].shape else 0
            n_in = len(op.inputs)
            self._copy(c, "fwd", T * width * a * (n_in + 1), n_in - 1)
            self._copy(c, "dgrad", T * width * a * 3, 1)  # gradients meeting at the branch
        elif kind == "act":
            self._act(c, num(op.outputs[0].shape[-1], T))
        elif kind == "concat":
            width = num(op.outputs[0].shape[-1], T)
            self._copy(c, "fwd", 2 * T * width * a, 1)
        elif kind == "embedding":
            V, d = op.attr("vocab"), num(op.outputs[0].shape[-1], T)
            # the table's bf16 copy per forward; its gradient: zeros, scatter-add, the cast
            # back to fp32 and the accumulation into .grad
            self._copy(c, "fwd", V * d * 6 + 2 * T * d * a, 3)
            self._copy(c, "wgrad", V * d * (a + 6 + 12) + 2 * T * d * a, 4)
        elif kind == "loss":
            V = num(op.inputs[0].shape[-1], T)
            shifted = op.attr("label_shift", 0) > 0  # MTP: the valid positions copied out
            extra = 8 * T * V if shifted else 0
            self._copy(c, "fwd", T * V * (a + 4 + 8) + extra, 12 if shifted else 6)
            self._copy(c, "dgrad", T * V * (4 + 12 + 4 + a) + extra, 8 if shifted else 5)
        return c

    def _fp8_or_bf16(self, c, op, m, n, k, phases, times):
        for _ in range(times):
            if op.dtype.startswith("fp8"):
                self._fp8_linear(c, m, n, k, phases)
            else:
                self._bf16_linear(c, m, n, k, fp32=op.dtype == "fp32", phases=phases)

    def _act(self, c: OpCost, width) -> None:
        """silu(gate) * up: two element-wise kernels forward, four backward."""
        T, a = self.T, self.a
        self._copy(c, "fwd", 5 * a * T * width, 2)
        self._copy(c, "dgrad", 10 * a * T * width, 4)

    def _rope(self, c: OpCost, op) -> None:
        """RoPE on fp32 copies (the cast, about six fp32 element-wise passes, the cast
        back) of the rotated part of q and k; for MLA the concatenations that build q and
        k for the core and, after it, the output's reshape copy; GQA repeats k and v to
        every head when it has fewer KV heads."""
        T, a = self.T, self.a
        att = self._attention_of(op)
        per_elem = 2 * a + 2 * 4 + 6 * 3 * 4
        if att.kind == "mla":
            dqk = att.qk_nope_dim + att.qk_rope_dim
            rotated = (att.heads + 1) * att.qk_rope_dim
            glue = att.heads * (4 * dqk + 2 * att.v_dim) * a
        else:
            rotated = (att.heads + att.kv_heads) * att.head_dim
            glue = 4 * att.heads * att.head_dim * a if att.kv_heads != att.heads else 0
        self._copy(c, "fwd", T * (rotated * per_elem + glue), 21)
        self._copy(c, "dgrad", T * (rotated * per_elem + glue), 21)

    def _attention_of(self, op):
        m = self.g.spec.model
        if op.block == "layer":
            return m.attention_of(op.layer)
        if m.layers:
            return m.attentions[m.layers[-1].attention]
        return None

    def _experts(self, c: OpCost, op) -> None:
        """Routed experts on one EP rank for one micro-batch: the glue around them and the
        runtime's FP8 grouped kernels (or grouped bf16 GEMMs)."""
        T, a, K = self.T, self.a, self.k
        d, inter, k = num(op.outputs[0].shape[-1], T), op.attr("intermediate"), op.attr("top_k")
        local = op.attr("routed") // self.ep
        rows = T * k  # uniform routing: a rank receives as many rows as it sends
        sc = self.scale
        # glue: gather and sort the rows, (EP: quantise for the wire, dequantise on arrival),
        # sort the results back, the weighted sum of k rows per token
        wire = (rows * d * (a + 1 + sc) + rows * d * (1 + sc + a)) if self.ep > 1 and \
            self.fp8_dispatch else 0
        glue = rows * d * a * 2 * 3 + wire + rows * d * a * 2 + T * d * a
        self._copy(c, "fwd", glue, 30)
        self._copy(c, "dgrad", glue + rows * d * a * 2, 20)
        if op.dtype.startswith("fp8"):
            for phase, quant in (("fwd", rows * d * (a + 1 + sc) * 2 + rows * d * (a + 1 + sc) * 2
                                  + 3 * local * inter * d * 5 + rows * inter * (2 * a + 1 + sc)),
                                 ("dgrad", rows * d * (a + 1 + sc) + rows * inter * (2 * a + 4 * 5)
                                  + 2 * rows * inter * (4 + 1 + sc) + 3 * rows * d * a),
                                 ("wgrad", rows * d * (a + 1 + sc) + rows * inter * (2 * a + 4 + 4)
                                  + 2 * rows * inter * (4 + 1 + sc) + 12 * 3 * local * inter * d)):
                self._copy(c, phase, quant, 10, "quantize_act")
            fwd = 2 * K.fp8_grouped(rows, local, inter, d) + K.fp8_grouped(rows, local, d, inter)
            fwd_c = 2 * K.fp8_grouped(rows, local, inter, d, self.sms_c) + \
                K.fp8_grouped(rows, local, d, inter, self.sms_c)
            c.add("fwd", fwd, fwd_c, 4, "fp8_gemm")
            c.add("dgrad", fwd, fwd_c, 4, "fp8_gemm")  # dgrads: the same shapes transposed
            wg = 3 * K.fp8_grouped(local * inter, local, d, rows / max(local, 1))
            wg_c = 3 * K.fp8_grouped(local * inter, local, d, rows / max(local, 1), self.sms_c)
            c.add("wgrad", wg, wg_c, 3, "fp8_gemm")
        else:
            rate = 2 if op.dtype == "fp32" else 1
            gemm = rate * K.bf16_gemm(rows, inter, d) * 3
            gemm_c = rate * K.bf16_gemm(rows, inter, d, self.sms_c) * 3
            c.add("fwd", gemm, gemm_c, 6, "bf16_gemm")
            c.add("dgrad", gemm, gemm_c, 6, "bf16_gemm")
            c.add("wgrad", gemm, gemm_c, 3, "bf16_gemm")
            self._copy(c, "fwd", 3 * local * inter * d * 6 + rows * inter * a * 5, 4)
            self._copy(c, "wgrad", 3 * local * inter * d * (6 + 12), 4)

    def _recompute(self, c: OpCost, op) -> None:
        if replayed(op, self.recompute):
            c.add_replay(c)
        elif self.recompute == "selective" and op.kind == "swiglu_ffn":
            # the shared experts' product and down projection run again
            d, inter = num(op.inputs[0].shape[-1], self.T), op.attr("intermediate")
            replay = OpCost()
            self._fp8_or_bf16(replay, op, self.T, d, inter, ("fwd",), 1)
            self._act(replay, inter)
            c.add_replay(replay)


def two_hop_route(spec, ep: int) -> bool:
    """Whether the simulator routes a MoE layer's tokens node, then GPU (`parallel.two_hop`
    with EP wider than an NVLink domain): four count exchanges a route, each row moved
    once more inside the node."""
    c = spec.cluster
    return bool(spec.parallel.two_hop and ep > (c.nvlink.domain or c.gpus_per_node))


def replayed(op, recompute: str) -> bool:
    """Whether the backward repeats `op`'s forward under recomputation `recompute`."""
    if recompute == "full":
        part = op.name.split(".")[1] if "." in op.name else ""
        return op.block == "layer" or (op.block == "mtp" and part in BLOCK_PARTS)
    if recompute == "selective":
        return op.kind in ("norm", "rope", "act") or op.attr("role") in SELECTIVE_ROLES \
            or (op.attr("role") == "down_proj" and op.block in ("layer", "mtp"))
    return False
