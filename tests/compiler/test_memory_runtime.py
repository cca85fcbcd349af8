"""The report's memory against the runtime's own tensors (issue 17, item 2).

Parameters, gradients and the ZeRO-1 optimizer's state: every pipeline rank's stage
modules and its `ZeroAdamW` are built from the compiled plan on the meta device (so
DeepSeek-V3's 671B parameters cost nothing), and their bytes must EQUAL the report's
per-device rows: 1F1B (the tiny example), DualPipe (DeepSeek-V3 on 2048 GPUs and the
tiny model), DualPipeV, one GPU (tests/train_specs/bench_1b.dsv); all ZeRO-1.

Activations: one micro-batch through the whole model on the CPU as a run executes it,
the build's generated stage program attached to every block whose kind it covers
(`runtime.program.attach_program`), its saved tensors counted with saved-tensor hooks
(parameters excluded), against the graph's saved bytes lowered for a CPU
(`lower(spec, device="cpu")`: torch's composite rms_norm and the math attention path,
the two places a CPU keeps other tensors than a GPU), within 10%: the tiny example in
every recompute mode and with SwiGLU's inputs in bf16, bench_1b's shapes, LLaMA-3's
grouped-query attention, and a tiny model whose MoE kind the program leaves to the eager
modules (no shared experts, a bf16 dispatch), so the eager formulas stay held to the
runtime too. The program's FP8 weight
copies, made once per step and shared by the micro-batches (`ProgramRuntime.qweight`),
are counted apart and must equal the report's per-step charge. A stage's peak is the
per-micro-batch figure times the micro-batches the schedule keeps in flight, plus those
copies.
"""

from __future__ import annotations

import types

import pytest
import torch

from dsvc import dsl
from dsvc.compiler.driver import build_plan, build_report
from dsvc.compiler.report import report_json
from dsvc.runtime.plan import parse_plan
from tests.conftest import EXAMPLES, ROOT
from tests.saved_bytes import saved_bytes

BENCH_1B = ROOT / "tests" / "train_specs" / "bench_1b.dsv"
ACTIVATION_BOUND = 0.10  # the bound on activation bytes against the runtime's


def _runtime_state_bytes(plan) -> list[dict]:
    """Per pipeline rank: bytes of the parameters, gradients (one per parameter, its dtype)
    and optimizer tensors the runtime allocates, built on the meta device."""
    from dsvc.runtime.ep import ExpertComm
    from dsvc.runtime.layers import dtype_of
    from dsvc.runtime.mesh import ProcessMesh
    from dsvc.runtime.model import StageModule
    from dsvc.runtime.optim import ZeroAdamW
    from dsvc.runtime.trainer import Trainer

    m = plan.mesh
    out = []
    for rank in range(m.pipeline):
        mesh = ProcessMesh(pp=m.pipeline, dp=m.data, ep=m.expert, pp_rank=rank,
                           device=torch.device("meta"))
        with torch.device("meta"):
            comms = {name: ExpertComm(place, 0, None, plan.precision.dispatch,
                                      plan.precision.combine)
                     for name, place in plan.experts.items()}
            modules = [StageModule(plan, s, comms) for s in plan.stages_of_rank(rank)]
            holder = types.SimpleNamespace(modules=modules)
            Trainer._tie_local(holder)  # stages on one rank share one embedding
            dense, expert = Trainer._split_params(holder)
            opt = ZeroAdamW(dense, expert, plan.train.optimizer,
                            dtype_of(plan.precision.optimizer_states), mesh)
        params = sum(p.numel() * p.element_size() for _, p in dense + expert)
        # the master shard is a view of the parameters' buffer (test_optim holds that on a
        # CPU): the optimizer allocates the two moments
        state = sum(t.numel() * t.element_size() for s in opt.shards
                    for t in (s.exp_avg, s.exp_avg_sq))
        assert all(s.master.numel() == s.shard and s.params.numel() == s.padded
                   for s in opt.shards)
        out.append({"weights": params, "grads": params, "optimizer": state,
                    "params": sum(p.numel() for _, p in dense + expert)})
    return out


PLANS = {
    "tiny_1f1b": (EXAMPLES / "tiny.dsv", []),
    "tiny_dualpipe": (EXAMPLES / "tiny.dsv", ["parallel.schedule=dualpipe"]),
    "tiny_dualpipev": (EXAMPLES / "tiny.dsv", ["parallel.schedule=dualpipev",
                                               "parallel.pipeline=1", "parallel.expert=4",
                                               "train.global_batch=16"]),
    "bench_1b": (BENCH_1B, []),
    "v3_dualpipe": (EXAMPLES / "deepseek_v3.dsv", []),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_parameters_gradients_and_optimizer_equal_the_runtimes(name):
    path, overrides = PLANS[name]
    spec = dsl.load(path, overrides)
    plan = parse_plan(build_plan(spec))
    runtime = _runtime_state_bytes(plan)
    devices = report_json(build_report(spec))["memory"]["devices"]
    assert len(devices) == len(runtime)
    for rank, (dev, rt) in enumerate(zip(devices, runtime)):
        assert dev["params"] == rt["params"], (name, rank)
        assert dev["weights"] == rt["weights"], (name, rank)
        assert dev["grads"] == rt["grads"], (name, rank)
        assert dev["master_weights"] + dev["optimizer_states"] == rt["optimizer"], (name, rank)


def _bench_1b_two_layers(overrides):
    """bench_1b's layer shapes (hidden 2048, MLA 16 heads, dense 5632, 24 + 1 experts of
    512, MTP) with one dense and one MoE layer and a vocabulary of 4096 (the head's bytes
    scale with it; a CPU's bf16 GEMMs over 32768 would take most of a minute)."""
    text = BENCH_1B.read_text().replace("1..11 = block(mla, moe)", "1 = block(mla, moe)")
    return dsl.loads(text, str(BENCH_1B), ["model.vocab=4096", *overrides])


def _small_llama3(overrides):
    """LLaMA-3's grouped-query attention (4 query heads on 2 KV heads of 64) and dense
    FFN, two layers of hidden 256."""
    path = EXAMPLES / "llama3_8b.dsv"
    text = path.read_text().replace("0..31 = block(gqa, dense)", "0..1 = block(gqa, dense)")
    return dsl.loads(text, str(path), [
        "model.vocab=512", "model.hidden=256", "model.attention.gqa.heads=4",
        "model.attention.gqa.kv_heads=2", "model.ffn.dense.intermediate=512",
        "parallel.pipeline=1", "train.seq_len=128", "train.global_batch=72", *overrides])


def _saved_by_runtime(spec, tmp_path) -> tuple[int, int, int]:
    """(bytes autograd keeps of one micro-batch's forward through the whole model, bytes of
    the FP8 weight copies the generated program makes for the step, blocks running the
    program) on the CPU, the program attached where it covers a block, as a run does."""
    from dsvc.compiler.codegen.stage_program import render_program
    from dsvc.compiler.driver import run_until
    from dsvc.runtime import program as P
    from dsvc.runtime.model import build_full_model

    plan = parse_plan(build_plan(spec))
    torch.manual_seed(0)
    model = build_full_model(plan)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    graph = run_until(spec, "fuse")
    path = tmp_path / "program.py"
    path.write_text(render_program(graph, spec_file="x.dsv", span=None, passes=graph.passes))
    attached, _ = P.attach_program([model], P.load_program(path), plan, "torch")
    copies = []
    rt = next((b.program[1] for b in model.modules() if getattr(b, "program", None)), None)
    if rt is not None:  # every weight the program quantises: one FP8 copy per step
        quantize = rt.ops.quantize_weight

        def recording(w, *args, **kwargs):
            out = quantize(w, *args, **kwargs)
            copies.extend(out)
            return out

        rt.ops.quantize_weight = recording
    tokens = torch.randint(0, plan.model.vocab, (plan.train.micro_batch, plan.train.seq_len))
    with torch.no_grad():  # an earlier micro-batch of the step made the copies
        model(tokens, tokens)
    held = (*model.parameters(), *model.buffers(), *copies)
    saved = saved_bytes(lambda: model(tokens, tokens), held)
    # a GPU's kernel allocates each copy exactly (the torch reference's may keep the
    # padded block grid's storage behind a ragged N)
    return saved, sum(t.numel() * t.element_size() for t in copies), attached


def _saved_by_graph(spec) -> tuple[float, float]:
    """(the graph's saved bytes per micro-batch, lowered for a CPU; the memory model's FP8
    weight copies per step of the whole model, as one stage)."""
    from dsvc.compiler.costs.layout import StageContents, parallel_dims
    from dsvc.compiler.costs.memory import MemoryModel
    from dsvc.compiler.costs.model_costs import build_model
    from dsvc.compiler.costs.symbols import Quantities
    from dsvc.compiler.passes.lower import lower

    g = lower(spec, device="cpu")
    q = Quantities(False)
    costs = build_model(spec, q)
    m = spec.model
    whole = StageContents(0, 0, tuple(range(m.num_layers)), embedding=True, head=True,
                          mtp=m.mtp.depth)
    _, copies = MemoryModel(spec, q, costs, parallel_dims(spec, q, costs.S)).kept_bytes(whole)
    return sum(g.num(op.saved_bytes) for op in g.ops()), copies


SPECS = {
    # one process: the whole model, experts local
    "tiny": lambda o: dsl.load(EXAMPLES / "tiny.dsv", ["train.seq_len=128",
                                                       "parallel.expert=1", *o]),
    "bench_1b": lambda o: _bench_1b_two_layers(["train.seq_len=128", "train.global_batch=1",
                                                "train.micro_batch=1", *o]),
    "llama3": _small_llama3,
}
ACTIVATION_CASES = {  # name: (model, overrides, blocks the program runs)
    "tiny_none": ("tiny", ["train.recompute=none"], 5),
    "tiny_selective": ("tiny", ["train.recompute=selective"], 5),
    "tiny_full": ("tiny", ["train.recompute=full"], 5),
    "tiny_bf16_swiglu_cache": ("tiny", ["precision.cache_fp8_activations=false"], 5),
    # the MoE kind runs eagerly (its ffn norm feeds no FP8 GEMM), the dense one the program
    "tiny_eager_moe": ("tiny", ["model.ffn.moe.shared=0", "precision.dispatch=bf16"], 1),
    "bench_1b": ("bench_1b", ["train.recompute=none"], 3),  # a CPU's FP8 emulation: one mode
    "llama3_gqa": ("llama3", ["train.recompute=none"], 2),
}


@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
def test_activations_within_ten_percent_of_the_runtimes(case, tmp_path):
    model, overrides, program_blocks = ACTIVATION_CASES[case]
    spec = SPECS[model](overrides)
    runtime, runtime_copies, attached = _saved_by_runtime(spec, tmp_path)
    graph, copies = _saved_by_graph(spec)
    # the memory model's choice of program or eager modules is the one the run makes
    assert attached == program_blocks == _blocks_run_by_program(spec)
    assert abs(graph / runtime - 1) <= ACTIVATION_BOUND, (graph, runtime)
    assert runtime_copies == copies > 0, (runtime_copies, copies)


def _blocks_run_by_program(spec) -> int:
    """Decoder blocks (MTP's included: the last layer's kind) the compiler says run the
    program."""
    from dsvc.compiler.costs.activations import Kept

    m = spec.model
    kinds = [*m.layers, *[m.layers[-1]] * m.mtp.depth]
    return sum(Kept(spec.precision).runs_program(m.ffns[lay.ffn]) for lay in kinds)


def test_the_peak_is_the_schedules_micro_batches_in_flight():
    """The simulated peak per rank is the stage's saved bytes per micro-batch times the
    micro-batch stages the schedule holds at once (1F1B over 2 ranks: 2 on rank 0)."""
    from dsvc.compiler.driver import run_until

    g = run_until(dsl.load(EXAMPLES / "tiny.dsv"), "simulate")
    per_stage = {}
    for op in g.ops():
        if op.stage is not None:
            per_stage[op.stage] = per_stage.get(op.stage, 0) + g.num(op.saved_bytes)
    sim = g.simulation
    assert sim.activations_in_flight == (2, 1)
    assert sim.peak_activation_bytes[0] == pytest.approx(2 * per_stage[0])
    assert sim.peak_activation_bytes[1] == pytest.approx(per_stage[1])
