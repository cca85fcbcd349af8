"""What a decoder block costs when the build's generated stage program runs it.

An FP8 plan's blocks run the generated program (docs/program.md), not the eager modules
`simulate_ops.OpCoster` describes: the `fuse` pass's groups are its kernels. Which blocks
it runs is `stage_program.eager_reason`'s rule, the one the program's renderer and the
memory model (`costs.activations`) read too. Per op of such a block, one micro-batch:

* every fusion group is one kernel forward and one backward, charged to the group's
  first op with the bytes the pass counted (`FusionGroup.reads`, `writes`,
  `bwd_reads`, `bwd_writes`); a `gemm_residual` group is the GEMM's epilogue (no launch
  of its own). A group kernel runs at the measured rate of the quantiser whose access
  pattern it shares (`FUSED_AS`: forward kernels write 1 x 128 tiles, backward kernels
  both tilings), or at its own measured rate once the calibration records one under the
  kernel's name;
* an FP8 linear is its GEMMs (its operands arrive quantised from a group's kernel) and
  its weight's FP8 copy once per step (`ProgramRuntime.qweight`: a share of it per
  micro-batch); the fp32 gradient accumulates as in the eager modules;
* the kernels outside the groups: the output gradient's quantisation where the residual
  stream's gradient arrives in bf16 (a dense FFN's and the shared experts' down
  projection, GQA's v), the routed rows' gathers (and, across ranks, their packing),
  the MoE weight-gradient half's rebuild of the ffn norm's output and of the experts'
  input as token tiles, GQA's key and value repeat;
* an op whose memory-bound work a group does costs nothing of its own;
* recomputation as the program runs it: `full` replays the block, `selective` the MLA
  chunk up to the attention core (the core's outputs are kept).

Host time: one launch of the generated program (a fused kernel or a GEMM through its
Python host function) costs `program_host_s_per_launch` (calibration.json, measured by
bench/host_cpu.py with the launches stubbed: the program's Python, its allocations and
the torch ops between launches, divided by its launches), so the torch ops the program
leaves (routing bookkeeping, the router GEMM, autograd's gradient accumulation) add no
host time of their own.
"""

from __future__ import annotations

from dsvc.compiler.codegen.stage_program import eager_reason
from dsvc.compiler.ir import num

from .simulate_ops import BLOCK_PARTS, OpCost, OpCoster, replayed, two_hop_route

NO_WORK = ("quantize", "cast")  # in a program block: their groups' kernels do it

# The measured quantiser whose access pattern each fused kernel shares, until the
# calibration measures the kernel itself under its own name: the kernels that write
# 1 x tile tiles a 1 x tile quantiser's, those that write token tiles (both tilings, or
# token tiles alone) the two-layout quantiser's; None (bf16 outputs, routing): the copy rate
FUSED_AS = {
    "rmsnorm_quant": "quantize_act", "quantize_bhsd": "quantize_act",
    "swiglu_quant": "swiglu_quant", "mla_rope_qkv": None, "gqa_rope": None,
    "router_topk": None, "moe_combine": None,
    "rmsnorm_bwd": "quantize_act_both", "mla_rope_qkv_bwd": "quantize_act_both",
    "gqa_rope_bwd": "quantize_act_both", "swiglu_bwd_quant": "quantize_act_both",
    "moe_dispatch_bwd": "quantize_act_both", "router_bwd": None,
    "quantize_grouped": "quantize_act_both", "quantize_act_t": "quantize_act_both",
    "quantize_bhsd_t": "quantize_act_both",
}
# Kernels a group's host function launches more than once: GQA's rotation per tensor (and
# its backward's two quantisers), the combine's backward (dout's rows quantised by expert,
# then the sum home)
LAUNCHES = {"gqa_rope": 2, "gqa_rope_bwd": 4, "moe_dispatch_bwd": 2}
# Group kinds whose backward kernel runs in the weight-gradient half, and the name it runs
# under there: the core output's token tiles for o_proj's wgrad
WGRAD_BACKWARD = {"quant_bhsd": "quantize_bhsd_t"}


class ProgramBlocks:
    """Which ops the generated program runs and which fusion groups each op carries."""

    def __init__(self, graph):
        spec = graph.spec
        self.precision, self.model = spec.precision, spec.model
        self.at: dict[str, list] = {}  # op name -> the groups charged to it
        self.fused: set[str] = set()  # ops some group's kernel runs
        for g in (graph.fusion or ()) if graph.program == "generated" else ():
            self.at.setdefault(g.ops[0], []).append(g)
            self.fused.update(g.ops)
        # blocks (by name prefix, "L3", "mtp0") whose selective replay the program runs: MLA's
        self.mla = {g.ops[0].split(".")[0] for gs in self.at.values() for g in gs
                    if g.kind == "mla_rope_qkv"}
        self.recompute = spec.train.recompute if spec.train is not None else "none"
        self._runs: dict[str, bool] = {}

    def runs(self, op) -> bool:
        """Whether `op` is part of a decoder block the program runs."""
        if not self.at or op.block not in ("layer", "mtp"):
            return False  # no groups: a plan the program leaves to the eager modules, or
            # a run that keeps them (`Graph.program`)
        part = op.name.split(".")[1] if "." in op.name else ""
        if op.block == "mtp" and part not in BLOCK_PARTS:
            return False  # the MTP module's own norms and projection run eagerly
        ffn = (self.model.layers[op.layer].ffn if op.block == "layer"
               else self.model.layers[-1].ffn)
        if ffn not in self._runs:
            self._runs[ffn] = not eager_reason(self.precision, self.model.ffns[ffn])
        return self._runs[ffn]

    def covered(self, op) -> bool:
        """A memory-bound op of a program block whose work a group's kernel does."""
        return op.name in self.fused and not any(
            num(f, 1) for f in (op.flops_fwd, op.flops_dgrad, op.flops_wgrad))

    def replayed(self, op) -> bool:
        """Whether the backward runs `op`'s forward again (`train.recompute`): as the
        program replays in its blocks, as the eager modules do elsewhere."""
        if self.recompute == "full" or not self.runs(op):
            return replayed(op, self.recompute)
        if self.recompute != "selective" or op.kind == "attention_core":
            return False
        prefix, _, rest = op.name.partition(".")
        part = rest.split(".")[0]
        return prefix in self.mla and (part == "attn_norm" or (
            part == "attn" and op.attr("role") != "o_proj" and op.kind != "quantize"))

    def kernels_at(self, op, tokens, load: float = 1.0) -> list[tuple[str, str, float]]:
        """(phase, kernel, bytes) of the group kernels charged to `op`, per micro-batch: each
        group's forward, and its backward in the phase it runs in (a residual add's
        epilogue: its bytes in the GEMM, kernel "gemm"). `load` scales the routed experts'
        own SwiGLU (rows on the busiest EP rank), not the combine on the tokens' ranks.
        None for an op of a block the program does not run."""
        out = []
        for g in self.at.get(op.name, ()) if self.runs(op) else ():
            fwd, bwd = group_bytes(g, tokens)
            f = load if (op.kind == "experts" and g.part == "swiglu") else 1.0
            out.append(("fwd", g.kernel, fwd * f))
            if g.kind in WGRAD_BACKWARD:
                out.append(("wgrad", WGRAD_BACKWARD[g.kind], bwd * f))
            elif g.backward and g.backward != "-":
                out.append(("dgrad", g.backward, bwd * f))
        return out


def group_bytes(group, tokens) -> tuple[float, float]:
    """(forward, backward) bytes one micro-batch's kernels of `group` read and write."""
    return (float(num(group.reads + group.writes, tokens)),
            float(num(group.bwd_reads + group.bwd_writes, tokens)))


class ProgramCoster(OpCoster):
    """`OpCoster` for an FP8 plan: a program block's ops cost the generated program's
    kernels; everything else (embedding, head, MTP's own parts, blocks the program leaves
    to the eager modules) the eager modules' (the base class)."""

    def __init__(self, graph, kernels, ep: int):
        from .schedule import num_microbatches

        super().__init__(graph, kernels, ep)
        self.blocks = ProgramBlocks(graph)
        self.micro = max(1, num_microbatches(graph.spec))  # the estimator sets a candidate's
        self.two_hop = graph.spec.parallel is not None and two_hop_route(graph.spec, self.ep)
        # a program launch in eager host ops (OpCost.host counts host ops)
        self.launch = kernels.program_host_s_per_launch / kernels.host_s_per_op
        # kernel name -> [bytes, seconds, launches] over every `cost` call: what a step's
        # generated memory-bound kernels move, to set beside a profile's (by name)
        self.ledger: dict[str, list] = {}
        self._calls: list = []

    def cost(self, op, load: float = 1.0) -> OpCost:
        if not self.blocks.runs(op):
            return super().cost(op, load)
        kind = op.kind
        self._calls = []
        once = OpCost()  # what a replay does not repeat: FP8 weight copies, .grad updates
        if self.blocks.covered(op) or kind in NO_WORK:
            c = OpCost()  # the groups' kernels do its work (charged at their first op)
        elif kind == "linear":
            c = self._linear(op, once)
        elif kind == "swiglu_ffn":  # the shared experts
            c = self._shared(op, once)
        elif kind == "experts":
            c = self._routed(op, once, load)
        elif kind == "router":
            c = OpCost()
            d, E = num(op.inputs[0].shape[-1], self.T), op.attr("routed")
            self._bf16_linear(c, self.T, E, d, fp32=op.dtype == "fp32")
            c.host = dict.fromkeys(c.host, 0)  # torch ops between launches: in `launch`
        else:  # the attention core (SDPA, as the eager modules run it), unfused ops
            c = self._cost(op)
            if kind == "attention_core":
                c.host = dict.fromkeys(c.host, 0)  # in `launch`, measured with the block
                self._repeat_kv(c, op)
        for phase, kernel, nbytes in self.blocks.kernels_at(op, self.T, load):
            if kernel == "gemm":  # the residual read in the GEMM's epilogue: no launch
                t = self.k.copy(nbytes)
                c.add(phase, t, t, 0)
            else:
                self._kernel(c, phase, nbytes, kernel)
        if kind == "norm" and self.blocks.covered(op):  # the weight's fp32 gradient
            self._glue(once, "wgrad", 12 * num(op.attr("dim"), self.T))
        replay = self.blocks.replayed(op)
        if replay:
            c.add_replay(c)
        for kernel, phase, nbytes, t, launches in self._calls:
            row = self.ledger.setdefault(kernel, [0.0, 0.0, 0])
            times = 2 if replay and phase == "fwd" else 1
            row[0] += times * nbytes
            row[1] += times * t
            row[2] += times * launches
        c.absorb(once)
        return c

    # -- pieces ------------------------------------------------------------------------
    def _kernel(self, c: OpCost, phase: str, nbytes: float, kernel: str) -> None:
        """A generated memory-bound kernel moving `nbytes` (its host function's launches)."""
        t = self.k.copy(nbytes, kernel if kernel in self.k.quant else FUSED_AS.get(kernel))
        launches = LAUNCHES.get(kernel, 1)
        c.add(phase, t, t, launches * self.launch)
        self._calls.append((kernel, phase, nbytes, t, launches))

    def _gemms(self, c: OpCost, once: OpCost, m, n, k, times: int = 1) -> None:
        """`times` FP8 linears' three GEMMs each (operands already quantised), their
        weights' FP8 copies and the fp32 gradients' accumulation (in `once`)."""
        K = self.k
        for phase, (a, b, kk) in (("fwd", (m, n, k)), ("dgrad", (m, k, n)), ("wgrad", (n, k, m))):
            c.add(phase, K.fp8_gemm(a, b, kk) * times, K.fp8_gemm(a, b, kk, self.sms_c) * times,
                  self.launch * times, "fp8_gemm")
        self._weight(once, n * k * times, times)

    def _weight(self, once: OpCost, elements: float, count: int) -> None:
        """`count` weights' FP8 copies (`elements` in all), made once per step and shared by
        the step's micro-batches (and replays); their fp32 gradients accumulated (read,
        add, write)."""
        t = self.k.copy(elements * (4 + 1) / self.micro, "quantize_weight")
        once.add("fwd", t, t, count * self.launch / self.micro)
        self._glue(once, "wgrad", 12 * elements)  # autograd's accumulation

    def _glue(self, c: OpCost, phase: str, nbytes: float) -> None:
        """Torch's work between the program's launches (copies, autograd's gradient
        accumulation): its host time is in `launch`, which was measured with it."""
        t = self.k.copy(nbytes)
        c.add(phase, t, t, 0)

    def _quantize_both(self, c: OpCost, phase: str, rows, cols) -> None:
        """`quantize_act_both` of a bf16 gradient the program receives unquantised."""
        self._kernel(c, phase, rows * cols * (self.a + 2 + 2 * self.scale), "quantize_act_both")

    def _linear(self, op, once: OpCost) -> OpCost:
        """An FP8 linear (every linear of a program block is: `stage_program._kind`)."""
        c = OpCost()
        k, n = op.attr("in_features"), op.attr("out_features")
        self._gemms(c, once, self.T, n, k)
        if op.attr("role") in ("down_proj", "v_proj"):  # dy arrives in bf16
            self._quantize_both(c, "dgrad", self.T, n)
        return c

    def _shared(self, op, once: OpCost) -> OpCost:
        c, T = OpCost(), self.T
        d, inter = num(op.inputs[0].shape[-1], T), op.attr("intermediate")
        self._gemms(c, once, T, inter, d, 2)  # gate and up
        self._gemms(c, once, T, d, inter)  # down
        self._quantize_both(c, "dgrad", T, d)  # dout for the down projection
        # the weight half: the norm's output as token tiles for gate's and up's wgrad
        self._kernel(c, "wgrad", T * d * (self.a + 1 + self.scale), "quantize_act_t")
        return c

    def _routed(self, op, once: OpCost, load: float) -> OpCost:
        """The routed experts' grouped GEMMs and the program's glue around them. The rows
        a rank's experts receive scale with `load` (the busiest EP rank's share over the
        mean); the rows a rank sends for its own tokens, and the replies it sums, do not."""
        c, T, a, K = OpCost(), self.T, self.a, self.k
        d, inter, k = num(op.outputs[0].shape[-1], T), op.attr("intermediate"), op.attr("top_k")
        local = op.attr("routed") // self.ep
        rows = T * k  # a rank's own tokens' slots
        arrived = rows * load  # the slots its experts serve
        # a row as it travels: FP8 with its scales, or (bf16 dispatch) in the activation
        # dtype, quantised where it arrives
        row = d * (1 + self.scale) if self.fp8_dispatch else d * a
        if not self.fp8_dispatch:
            self._kernel(c, "fwd", arrived * d * (a + 1 + self.scale), "quantize_act")
        for n_out, k_in, times in ((inter, d, 2), (d, inter, 1)):
            f = K.fp8_grouped(arrived, local, n_out, k_in)
            f_c = K.fp8_grouped(arrived, local, n_out, k_in, self.sms_c)
            c.add("fwd", times * f, times * f_c, times * self.launch, "fp8_gemm")
            c.add("dgrad", times * f, times * f_c, times * self.launch, "fp8_gemm")
        per = arrived / max(local, 1)
        wg = 3 * K.fp8_grouped(local * inter, local, d, per)
        wg_c = 3 * K.fp8_grouped(local * inter, local, d, per, self.sms_c)
        c.add("wgrad", wg, wg_c, 3 * self.launch, "fp8_gemm")
        self._weight(once, 3 * local * inter * d, 3)
        # the rows (and their gate weights) gathered by destination; across ranks packed
        # for the exchange, the arrivals put in expert order, the replies unpacked; the
        # backward: dout's rows out and in expert order, dx's rows home. A two-hop route
        # moves each row once more inside the node (the forwarding rank's gather and sum).
        hops = 2 if self.two_hop else 1
        moves = self.ep > 1
        self._glue(c, "fwd", 2 * rows * row + (2 * rows * d * a if moves else 0))
        if moves:
            self._glue(c, "fwd", hops * 2 * arrived * row)
            self._glue(c, "dgrad", hops * (4 * rows + 2 * arrived) * d * a)
        # the weight half: the ffn norm's output rebuilt from its input, the experts' input
        # as token tiles by expert
        self._kernel(c, "wgrad", 2 * T * d * a, "rmsnorm_quant")
        self._kernel(c, "wgrad", arrived * (d * a + d + self.scale * d), "quantize_grouped")
        return c

    def _repeat_kv(self, c: OpCost, op) -> None:
        """GQA with fewer KV heads: k and v repeated to every head before the core (and
        their gradients summed back)."""
        heads, kv = op.attr("heads"), op.attr("kv_heads")
        if kv is None or kv == heads:
            return
        width = num(op.inputs[1].shape[-1], self.T)  # kv heads x head dim
        nbytes = 2 * self.T * width * self.a * (1 + heads // kv)
        self._glue(c, "fwd", nbytes)
        self._glue(c, "dgrad", nbytes)


def block_host(graph, kernels, layer: int) -> tuple[float, float]:
    """(eager host ops, program launches) the simulator counts for decoder layer `layer`'s
    forward and backward, one micro-batch with every weight quantised in it: what
    bench/host_cpu.py divides its measured host times by."""
    eager, program = OpCoster(graph, kernels, 1), ProgramCoster(graph, kernels, 1)
    program.micro = 1
    ops = launches = 0.0
    for op in graph.ops():
        if op.block == "layer" and op.layer == layer:
            ops += sum(eager.cost(op).host.values())
            launches += sum(program.cost(op).host.values()) / program.launch
    return ops, launches


def op_coster(graph, kernels, ep: int) -> OpCoster:
    """The coster of `graph`'s ops on a calibrated card: the program's where it runs blocks
    (`ProgramBlocks`: an FP8 plan after `fuse`, a run that uses the program), the eager
    modules' otherwise."""
    coster = ProgramCoster(graph, kernels, ep)
    return coster if coster.blocks.at else OpCoster(graph, kernels, ep)
