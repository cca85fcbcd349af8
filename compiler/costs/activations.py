"""What the generated trainer keeps for the backward: bytes of autograd's saved tensors.

A decoder block runs the build's generated stage program (compiler/codegen/stage_program.py,
runtime/program.py) where the program covers its kind (`stage_program.eager_reason`, the
one rule for that; an FP8 linear policy), and the runtime's eager modules elsewhere; the
embedding, the head and the MTP modules' own norms and projection always run eagerly. These
formulas follow the code that runs, for T tokens of one micro-batch, as plain arithmetic
(numbers, or sympy symbols for the report's formulas). The graph's ops carry them
(`lower.saved_bytes`), the report sums them per piece (`memory.activation_bytes`);
tests/compiler/test_memory_runtime.py holds them to the runtime's saved tensors counted
with saved-tensor hooks, program and eager.

What the generated program's chunks save (each chunk's `saved`, no recomputation):

* a fused RMSNorm (`rmsnorm_quant`): its input and the per-token reciprocal RMS (MLA's
  latent norm reads kv_a's output in place and keeps all of it, rope key included);
* an FP8 GEMM: nothing per micro-batch (its input's codes are rebuilt from what the norm,
  SwiGLU or the core keeps). Its FP8 weight and block scales are made once per step and
  shared by every micro-batch and replay (`ProgramRuntime.qweight`) until the step's
  backward is done: the report charges them once per device (`memory`), not per
  micro-batch in flight, and they are not in the ops' per-micro-batch bytes;
* the attention core (torch's SDPA between the chunks): q, k, v as the RoPE kernel wrote
  them, the log-sum-exp; its output (B, H, S, V) is kept by the next chunk for o_proj;
* SwiGLU (dense, shared and routed experts): gate and up, as FP8 1 x tile codes with an
  fp32 scale per tile (`precision.cache_fp8_activations`, the default) or in the
  activation dtype;
* the MoE chunk: the norm's input (kept by the chunk before it; the norm's output, the
  router's and the experts' wgrad's input, is rebuilt from it), the router's scores and
  choices, each slot's token and position, each routed row's gate
  weight (applied inside SwiGLU: no expert output is kept for the gates' gradient);
  with experts on other EP ranks, the FP8 rows that arrived.

What the eager modules save (no recomputation):

* RMSNorm: its input cast to the norm dtype (a copy when that differs from the
  activation dtype) and the per-token reciprocal RMS; a GPU runs torch's fused
  rms_norm, a CPU its composite form, which also keeps the normalised copy;
* an FP8 linear (runtime/fp8_autograd.py): its input quantised along the token axis
  (1 B per element + an fp32 scale per 1 x tile) and its weight quantised for this
  micro-batch (1 B per element + an fp32 scale per tile x tile block): the FP8 weight
  is re-made every forward and held until that micro-batch's backward;
* a kept linear (router, MTP projection in bf16): its input and a bf16 copy of its fp32
  weight, again per micro-batch;
* the attention core: a GPU runs memory-efficient attention (MLA's query and value
  widths differ, which flash attention refuses) and keeps q, k, v (v as the view of
  kv_b_proj's output it is), the output and the log-sum-exp; a CPU runs the math
  path where the widths differ, which keeps fp32 q, k, v and the S x S probabilities,
  and its flash kernel otherwise;
* SwiGLU: gate and up outputs and silu(gate); the routed experts' fused kernel keeps
  gate and up (and recomputes the product); the router its scores, choices and gate
  weights; the weighted sum of expert outputs its k rows per token; the head and loss,
  run in pieces with their gradients taken in the forward, the gradients of the normed
  rows and of the head's weight; embeddings their token ids.

Recomputation (`train.recompute`, runtime/layers.py `replayed`): `selective` keeps, in
the program, the block's input and the attention core's outputs of the MLA chunk up to
the core (replayed; its other chunks keep what they keep anyway); in the eager modules, a
norm's input only, MLA's latents and the core's outputs (its up-projections replayed),
SwiGLU's two inputs. `full` keeps a decoder layer's input only, program or eager.
"""

from __future__ import annotations

from dsvc.compiler.codegen.stage_program import eager_reason
from dsvc.dsl.spec import DTYPE_BYTES

from .symbols import ceil_div

GPU, CPU = "gpu", "cpu"
INDEX_BYTES = 8  # int64 token ids, expert choices, sort orders
SCALE_BYTES = 4  # FP8 scales are fp32 in the runtime (ue8m0 rounds their value, not their type)
LSE_BYTES = 4  # log-sum-exp per head and token, fp32
GATE_BYTES = 4  # a routed slot's gate weight, fp32
NORM_RSTD_BYTES = 4  # RMSNorm's reciprocal RMS per token, fp32


def storage_dtype(component: str, precision) -> str:
    """The dtype a component's weights compute in (kept components keep theirs)."""
    return precision.compute_dtype(component)


def head_weight_bytes(precision) -> int:
    """Bytes per element of the output head's weight as the loss casts it and keeps its
    gradient (runtime/model.py `_head`, runtime/loss.py): the head's compute dtype, which
    a plan keeps out of FP8."""
    return DTYPE_BYTES[storage_dtype("head", precision)]


class Kept:
    """The saved-tensor formulas of one spec's precision and recomputation, on a device kind.

    `device` is GPU for what the report and simulator charge; CPU is what a CPU run of
    the same runtime keeps (the tests count it there). `attention` and `ffn` give a
    block's pieces as the program or the eager modules keep them (`runs_program`).
    """

    def __init__(self, precision, recompute: str = "none", device: str = GPU,
                 program: str = "generated"):
        self.p, self.recompute, self.device = precision, recompute, device
        self.program = program  # "eager": the run keeps the eager modules (--program eager)
        self.a = DTYPE_BYTES[precision.default]
        self.tile = precision.linear.act_tile[1]
        self.selective = recompute == "selective"
        self.full = recompute == "full"

    def dtype(self, component: str) -> str:
        return storage_dtype(component, self.p)

    def runs_program(self, ffn=None) -> bool:
        """Whether the generated program runs a block with FFN definition `ffn` (without
        one: whether the policy lets it run any block), unless the run keeps the eager
        modules."""
        return self.program == "generated" and not eager_reason(self.p, ffn)

    # -- a block, as the code that runs it keeps it -----------------------------------
    def attention(self, kind: str, T, S, g, program: bool) -> dict:
        """{op: bytes} of a block's attention (`kind` mla or gqa, `g` its dims), its
        pre-attention norm included; under full recomputation the block's input, which
        its first op keeps."""
        if self.full:
            return {"attn_norm": self.layer_input(T, g["d"])}
        if kind == "mla":
            return self.program_mla(T, S, g) if program else self.mla(T, S, g)
        return self.program_gqa(T, S, g) if program else self.gqa(T, S, g)

    def ffn(self, kind: str, T, g, local, program: bool) -> tuple[dict, object]:
        """({op: bytes}, routed-row bytes) of a block's FFN (`kind` dense or moe), its norm
        included, `local` routed experts on this rank; nothing under full recomputation."""
        if self.full:
            return {}, 0
        if kind == "dense":
            return (self.program_dense(T, g) if program else self.dense(T, g)), 0
        return self.program_moe(T, g, local) if program else self.moe(T, g, local)

    # -- leaves ------------------------------------------------------------------
    def norm(self, T, width, selective: bool | None = None):
        """RMSNorm over `width`; under selective recomputation its input only."""
        if self.selective if selective is None else selective:
            return self.a * width * T
        n = DTYPE_BYTES[self.p.keep.get("norm", self.p.default)]
        copies = 2 if self.device == CPU else 1
        return copies * n * width * T + NORM_RSTD_BYTES * T

    def fp8_weight(self, n_in, n_out, copies=1):
        t = self.tile
        return copies * (n_in * n_out + ceil_div(n_out, t) * ceil_div(n_in, t) * SCALE_BYTES)

    def fp8_input(self, T, width):
        """A linear's input quantised along tokens: 1 B + an fp32 scale per 1 x tile tokens."""
        return width * T + width * ceil_div(T, self.tile) * SCALE_BYTES

    def fp8_rows(self, rows, width):
        """Rows quantised along their width: 1 B + an fp32 scale per 1 x tile elements."""
        return width * rows + ceil_div(width, self.tile) * rows * SCALE_BYTES

    def linear(self, T, n_in, n_out, component: str = "linear"):
        """One linear of `component`'s format: its cached input and its weight copy."""
        dtype = self.dtype(component)
        if dtype.startswith("fp8"):
            return self.fp8_input(T, n_in) + self.fp8_weight(n_in, n_out)
        b = DTYPE_BYTES[dtype]
        weight_copy = n_in * n_out * b if b != DTYPE_BYTES[self.p.master_weights] else 0
        return b * n_in * T + weight_copy

    def swiglu_parts(self, T, d, inter) -> dict:
        """Dense FFN / shared experts: the gate and up linears, the product (gate and up
        outputs and silu(gate)), the down linear; under selective recomputation the
        product keeps its two inputs and the down projection's input is replayed."""
        if self.selective:
            act, down = 2 * self.a * inter * T, 0
        else:
            act, down = 3 * self.a * inter * T, self.linear(T, inter, d)
        return {"gate": self.linear(T, d, inter), "up": self.linear(T, d, inter), "act": act,
                "down": down}

    def swiglu(self, T, d, inter):
        return sum(self.swiglu_parts(T, d, inter).values())

    def attention_core(self, T, S, H, d_qk, d_v, v=None, output: bool = True):
        """torch's SDPA: memory-efficient attention on a GPU (and a CPU's flash kernel where
        the widths agree) keeps q, k, v, the output (unless `output` is False) and the
        log-sum-exp in the core's dtype; where v is a view of a wider tensor (the eager
        MLA's kv_b_proj output, `v` elements per token), that tensor whole. A CPU's math
        path (the widths differ) keeps fp32 q, k, v and the probabilities instead."""
        core = DTYPE_BYTES[self.dtype("attention_core")]
        if self.device == CPU and d_qk != d_v:
            return 4 * H * (2 * d_qk + d_v) * T + 4 * H * S * T
        v = v if v is not None and core == self.a else H * d_v
        return core * (2 * H * d_qk + v + (H * d_v if output else 0)) * T + LSE_BYTES * H * T

    def core_outputs(self, T, H, d_v, output: bool = True):
        """What selective recomputation keeps of the core: its output (unless `output` is
        False) and the log-sum-exp."""
        core = DTYPE_BYTES[self.dtype("attention_core")]
        return (core * H * d_v * T if output else 0) + LSE_BYTES * H * T

    # -- the eager modules' pieces ------------------------------------------------------
    def mla(self, T, S, g) -> dict:
        """{op: bytes} of one MLA block (`g` its dims: d, n_h, d_cq, d_c, d_nope, d_r, d_v),
        the pre-attention norm included."""
        a, H = self.a, g["n_h"]
        d, d_cq, d_c, d_r, d_v = g["d"], g["d_cq"], g["d_c"], g["d_r"], g["d_v"]
        d_qk = g["d_nope"] + d_r
        out = {"attn_norm": self.norm(T, d)}
        if d_cq:
            out["q_down"] = self.linear(T, d, d_cq)
        kv_width = d_c + d_r
        out["kv_down"] = self.linear(T, d, kv_width)
        if self.selective:  # the replayed part keeps its inputs and the core's outputs
            if d_cq:
                out["q_norm"] = a * d_cq * T
            else:
                out["q_proj"] = a * d * T
            out["kv_norm"] = a * kv_width * T
            out["core"] = self.core_outputs(T, H, d_v)
        else:
            if d_cq:
                out["q_norm"] = self.norm(T, d_cq)
                out["q_up"] = self.linear(T, d_cq, H * d_qk)
            else:
                out["q_proj"] = self.linear(T, d, H * d_qk)
            out["kv_norm"] = self.norm(T, d_c)
            out["kv_up"] = self.linear(T, d_c, H * (g["d_nope"] + d_v))
            out["core"] = self.attention_core(T, S, H, d_qk, d_v, v=H * (g["d_nope"] + d_v))
        out["o_proj"] = self.linear(T, H * d_v, d)
        return out

    def gqa(self, T, S, g) -> dict:
        """{op: bytes} of one GQA block; k and v are repeated to every head before the core."""
        d, H, G, d_h = g["d"], g["n_h"], g["n_kv"], g["d_h"]
        out = {"attn_norm": self.norm(T, d)}
        for name, width in (("q_proj", H * d_h), ("k_proj", G * d_h), ("v_proj", G * d_h)):
            out[name] = self.linear(T, d, width)
        out["core"] = self.attention_core(T, S, H, d_h, d_h)
        out["o_proj"] = self.linear(T, H * d_h, d)
        return out

    def dense(self, T, g) -> dict:
        return {"ffn_norm": self.norm(T, g["d"]), **self.swiglu_parts(T, g["d"], g["d_ff"])}

    def router(self, T, d, E, k):
        dtype = self.dtype("router")
        b = DTYPE_BYTES[dtype]
        weight_copy = d * E * b if b != DTYPE_BYTES[self.p.master_weights] else 0
        # input (the norm's output when the router computes in the activation dtype), the
        # scores, the choices, the gathered gate weights and their sum
        return b * d * T + weight_copy + 4 * E * T + INDEX_BYTES * k * T + 4 * k * T + 4 * T

    def routed_rows(self, R, d, inter):
        """The routed experts' kernels over R received rows. FP8: gate and up keep the rows
        quantised along tokens, down keeps gate and up outputs. Otherwise (grouped GEMMs):
        the rows once, gate and up outputs, silu(gate) and the product."""
        if self.dtype("linear").startswith("fp8"):
            return 2 * (d * R + d * ceil_div(R, self.tile) * SCALE_BYTES) + 2 * self.a * inter * R
        return self.a * d * R + 4 * self.a * inter * R

    def routed_weights(self, d, inter, local):
        """The `local` experts' weights as the kernels hold them for one micro-batch."""
        dtype = self.dtype("linear")
        if dtype.startswith("fp8"):
            # + a token tile per expert at its origin, per row of K, in the wgrad's scales
            return self.fp8_weight(d, inter, 2 * local) + self.fp8_weight(inter, d, local) \
                + 2 * d * local * SCALE_BYTES
        b = DTYPE_BYTES[dtype]
        return 3 * d * inter * local * b if b != DTYPE_BYTES[self.p.master_weights] else 0

    def moe(self, T, g, local) -> tuple[dict, object]:
        """({op: bytes}, routed-row bytes) of one MoE block with `local` experts on this
        rank: the rows its experts receive scale with the expert-load imbalance, so they
        are returned apart (their op is "experts")."""
        d, E, k = g["d"], g["E"], g["k"]
        out = {"ffn_norm": self.norm(T, d), "router": self.router(T, d, E, k)}
        # the weighted sum of the k expert outputs per token (both operands), the sort
        # orders there and back, the sequence-wise aux loss's per-token sums
        combine = self.a * k * d * T + self.a * k * T + 2 * INDEX_BYTES * k * T + 4 * T
        out["experts"] = combine + self.routed_weights(d, g["d_e"], local)
        if g["E_s"]:
            out["shared"] = self.swiglu(T, d, g["E_s"] * g["d_s"])
        return out, self.routed_rows(k * T, d, g["d_e"])

    # -- the generated program's pieces (compiler/codegen/templates/program_*.py.jinja) ---
    def fused_norm(self, T, width):
        """`rmsnorm_quant`: its input and the reciprocal RMS per token."""
        return self.a * width * T + NORM_RSTD_BYTES * T

    def swiglu_inputs(self, rows, width):
        """SwiGLU's gate and up over `rows`: FP8 1 x tile codes and scales
        (`cache_fp8_activations`) or in the activation dtype."""
        if self.p.cache_fp8_activations:
            return 2 * self.fp8_rows(rows, width)
        return 2 * self.a * width * rows

    def program_core(self, T, S, H, d_qk, d_v, replayed: bool) -> dict:
        """The attention core's saved tensors, and its output (B, H, S, V) in the activation
        dtype, which the next chunk keeps for o_proj's wgrad (the core's own output, unless
        the core computes in another dtype and keeps that too); of the core, its outputs
        only when the chunk before it is `replayed` (selective recomputation)."""
        own = DTYPE_BYTES[self.dtype("attention_core")] != self.a
        core = (self.core_outputs(T, H, d_v, own) if replayed else
                self.attention_core(T, S, H, d_qk, d_v, output=own))
        return {"core": core, "o_proj": self.a * H * d_v * T}

    def program_mla(self, T, S, g) -> dict:
        """{op: bytes} of one MLA block in the program: its norms keep their inputs (the
        latent norm all of kv_a's output it reads, rope key included); under selective
        recomputation the chunk up to the core keeps the block's input only."""
        d, d_cq, d_c, d_r = g["d"], g["d_cq"], g["d_c"], g["d_r"]
        core = self.program_core(T, S, g["n_h"], g["d_nope"] + d_r, g["d_v"], self.selective)
        if self.selective:
            return {"attn_norm": self.a * d * T, **core}
        out = {"attn_norm": self.fused_norm(T, d)}
        if d_cq:
            out["q_norm"] = self.fused_norm(T, d_cq)
        out["kv_norm"] = self.fused_norm(T, d_c + d_r)
        return {**out, **core}

    def program_gqa(self, T, S, g) -> dict:
        """{op: bytes} of one GQA block in the program (no selective replay there)."""
        return {"attn_norm": self.fused_norm(T, g["d"]),
                **self.program_core(T, S, g["n_h"], g["d_h"], g["d_h"], replayed=False)}

    def program_dense(self, T, g) -> dict:
        return {"ffn_norm": self.fused_norm(T, g["d"]), "act": self.swiglu_inputs(T, g["d_ff"])}

    def program_moe(self, T, g, local) -> tuple[dict, object]:
        """({op: bytes}, routed-row bytes) of one MoE block in the program. Per token: the
        norm's input and rstd (the norm's output is rebuilt from the input for the weight
        gradients, not kept), the router's fp32 scores, its choices, the balance loss's
        sums; per slot (k a token): its token and position (one hop; DeepSeek-V3's two
        hops keep about as much). Per received row: its gate weight (fp32: the expert
        applies it inside SwiGLU, so no expert output is kept for the gates' gradient),
        gate and up, and where the experts are split over EP ranks (`local` < E), the
        FP8 rows that arrived."""
        d, E, k, d_e = g["d"], g["E"], g["k"], g["d_e"]
        out = {"ffn_norm": self.fused_norm(T, d),
               "router": 4 * E * T + INDEX_BYTES * k * T + 4 * T,
               "experts": 2 * INDEX_BYTES * k * T}
        if g["E_s"]:
            out["shared"] = self.swiglu_inputs(T, g["E_s"] * g["d_s"])
        rows = self.swiglu_inputs(k * T, d_e) + GATE_BYTES * k * T
        if local != E:
            rows = rows + self.fp8_rows(k * T, d)
        return out, rows

    # -- outside the blocks (always eager) ---------------------------------------------
    def embedding(self, T) -> dict:
        return {"embed": INDEX_BYTES * T}  # the token ids

    def head(self, T, d, V) -> dict:
        """Final norm, output head and loss. The loss runs in pieces of tokens and takes
        its gradients as it goes (runtime/loss.py): no logits are kept, but the gradient
        of the normed rows (activation dtype) and of the head's weight (in the head's
        dtype), tied or not."""
        return {"final_norm": self.norm(T, d), "head": 0,
                "loss": self.a * d * T + head_weight_bytes(self.p) * V * d}

    def mtp(self, T, d) -> dict:
        """One MTP module's own parts (its block and head are `attention`/`ffn` and `head`)."""
        return {"embed": INDEX_BYTES * T, "enorm": self.norm(T, d), "hnorm": self.norm(T, d),
                "eh_proj": self.linear(T, 2 * d, d, "mtp_projection")}

    def layer_input(self, T, d):
        """What a decoder layer keeps under full recomputation: its input."""
        return self.a * d * T
