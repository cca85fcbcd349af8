"""What the generated trainer keeps for the backward: bytes of autograd's saved tensors.

The runtime (runtime/*.py) is eager torch: every op saves what its backward needs,
in the tensors it happens to hold. These formulas follow it module by module, for T
tokens of one micro-batch, as plain arithmetic (numbers, or sympy symbols for the
report's formulas). The graph's ops carry them (`lower.saved_bytes`), the report
sums them per piece (`memory.activation_bytes`); tests/compiler/test_memory_runtime.py
holds them to the runtime's saved tensors counted with saved-tensor hooks.

What each runtime module saves (no recomputation):

* RMSNorm: its input cast to the norm dtype (a copy when that differs from the
  activation dtype) and the per-token reciprocal RMS; a GPU runs torch's fused
  rms_norm, a CPU its composite form, which also keeps the normalised copy;
* an FP8 linear (runtime/fp8_autograd.py): its input quantised along the token axis
  (1 B per element + an fp32 scale per 1 x tile) and its weight quantised for this
  micro-batch (1 B per element + an fp32 scale per tile x tile block): the FP8 weight
  is re-made every forward and held until that micro-batch's backward;
* a kept linear (router, output head in bf16): its input and a bf16 copy of its fp32
  weight, again per micro-batch;
* the attention core: a GPU runs memory-efficient attention (MLA's query and value
  widths differ, which flash attention refuses) and keeps q, k, v (v as the view of
  kv_b_proj's output it is), the output and the log-sum-exp; a CPU runs the math
  path, which keeps fp32 q, k, v and the S x S probabilities;
* SwiGLU: gate and up outputs and silu(gate); the routed experts' fused kernel keeps
  gate and up (and recomputes the product); the router its scores, choices and gate
  weights; the weighted sum of expert outputs its k rows per token; the loss its
  fp32 log-softmax; embeddings their token ids.

Recomputation (`train.recompute`, runtime/layers.py `replayed`): `selective` keeps a
norm's input only, MLA's latents and the attention core's outputs (its up-projections
replayed), SwiGLU's two inputs; `full` keeps a decoder layer's input only.
"""

from __future__ import annotations

from dsvc.dsl.spec import DTYPE_BYTES

from .symbols import ceil_div

GPU, CPU = "gpu", "cpu"
INDEX_BYTES = 8  # int64 token ids, expert choices, sort orders
SCALE_BYTES = 4  # FP8 scales are fp32 in the runtime (ue8m0 rounds their value, not their type)
LSE_BYTES = 4  # log-sum-exp per head and token, fp32
NORM_RSTD_BYTES = 4  # RMSNorm's reciprocal RMS per token, fp32


def storage_dtype(component: str, precision) -> str:
    """The dtype a component's weights compute in (kept components keep theirs)."""
    return precision.compute_dtype(component)


class Kept:
    """The saved-tensor formulas of one spec's precision and recomputation, on a device kind.

    `device` is GPU for what the report and simulator charge; CPU is what a CPU run of
    the same runtime keeps (the tests count it there).
    """

    def __init__(self, precision, recompute: str = "none", device: str = GPU):
        self.p, self.recompute, self.device = precision, recompute, device
        self.a = DTYPE_BYTES[precision.default]
        self.tile = precision.linear.act_tile[1]
        self.selective = recompute == "selective"
        self.full = recompute == "full"

    def dtype(self, component: str) -> str:
        return storage_dtype(component, self.p)

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

    # -- pieces ------------------------------------------------------------------
    def mla(self, T, S, g, norm: bool = True) -> dict:
        """{op: bytes} of one MLA block (`g` its dims: d, n_h, d_cq, d_c, d_nope, d_r, d_v),
        the pre-attention norm included unless `norm` is False."""
        a, H = self.a, g["n_h"]
        d, d_cq, d_c, d_r, d_v = g["d"], g["d_cq"], g["d_c"], g["d_r"], g["d_v"]
        d_qk = g["d_nope"] + d_r
        out = {"attn_norm": self.norm(T, d)} if norm else {}
        if d_cq:
            out["q_down"] = self.linear(T, d, d_cq)
        kv_width = d_c + d_r
        out["kv_down"] = self.linear(T, d, kv_width)
        core = DTYPE_BYTES[self.dtype("attention_core")]
        if self.selective:  # the replayed part keeps its inputs and the core's outputs
            if d_cq:
                out["q_norm"] = a * d_cq * T
            else:
                out["q_proj"] = a * d * T
            out["kv_norm"] = a * kv_width * T
            out["core"] = core * H * d_v * T + LSE_BYTES * H * T
        else:
            if d_cq:
                out["q_norm"] = self.norm(T, d_cq)
                out["q_up"] = self.linear(T, d_cq, H * d_qk)
            else:
                out["q_proj"] = self.linear(T, d, H * d_qk)
            out["kv_norm"] = self.norm(T, d_c)
            out["kv_up"] = self.linear(T, d_c, H * (g["d_nope"] + d_v))
            out["core"] = self.attention_core(T, S, H, d_qk, d_v, kv_up=H * (g["d_nope"] + d_v))
        out["o_proj"] = self.linear(T, H * d_v, d)
        return out

    def attention_core(self, T, S, H, d_qk, d_v, kv_up=None, kv_heads=None):
        """Memory-efficient attention on a GPU (q, k, v, output, log-sum-exp); the math path
        on a CPU (fp32 q, k, v and the probabilities). MLA's v is a view of kv_b_proj's
        output (`kv_up` elements per token), which it keeps whole."""
        core = DTYPE_BYTES[self.dtype("attention_core")]
        if self.device == CPU:
            return 4 * H * (2 * d_qk + d_v) * T + 4 * H * S * T
        v = kv_up if kv_up is not None and core == self.a else H * d_v
        if kv_heads is not None:  # GQA: k and v repeated to every head before the core
            v = H * d_v
        return core * (2 * H * d_qk + v + H * d_v) * T + LSE_BYTES * H * T

    def gqa(self, T, S, g, norm: bool = True) -> dict:
        d, H, G, d_h = g["d"], g["n_h"], g["n_kv"], g["d_h"]
        out = {"attn_norm": self.norm(T, d)} if norm else {}
        for name, width in (("q_proj", H * d_h), ("k_proj", G * d_h), ("v_proj", G * d_h)):
            out[name] = self.linear(T, d, width)
        out["core"] = self.attention_core(T, S, H, d_h, d_h, kv_heads=G)
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

    def embedding(self, T) -> dict:
        return {"embed": INDEX_BYTES * T}  # the token ids

    def head(self, T, d, V) -> dict:
        """Final norm, output head (a bf16 copy of its fp32 weight per micro-batch, tied or
        not), the loss (fp32 log-softmax over the vocabulary, the labels)."""
        return {"final_norm": self.norm(T, d), "head": self.linear(T, d, V, "head"),
                "loss": 4 * V * T + INDEX_BYTES * T}

    def mtp(self, T, d) -> dict:
        """One MTP module's own parts (its block and head are `mla`/`moe` and `head`)."""
        return {"embed": INDEX_BYTES * T, "enorm": self.norm(T, d), "hnorm": self.norm(T, d),
                "eh_proj": self.linear(T, 2 * d, d, "mtp_projection")}

    def layer_input(self, T, d):
        """What a decoder layer keeps under full recomputation: its input."""
        return self.a * d * T
