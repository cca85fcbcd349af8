"""The simulator's costs of the generated stage program (compiler/passes/simulate_program.py).

An FP8 plan's decoder blocks run the generated program: the simulator charges its fused
kernels (the `fuse` pass's groups, with their bytes), its GEMMs and its launches, where
the eager modules' kernels were charged before. The eager costs stay for everything the
program does not run.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from dsvc import dsl
from dsvc.compiler.costs.kernel_rates import KernelModel
from dsvc.compiler.driver import run_until
from dsvc.compiler.passes.simulate_costs import Rates, op_times, roofline_times
from dsvc.compiler.passes.simulate_ops import OpCoster
from dsvc.compiler.passes.simulate_program import (
    FUSED_AS,
    ProgramBlocks,
    ProgramCoster,
    block_host,
    group_bytes,
    op_coster,
)
from tests.conftest import EXAMPLES, ROOT

BENCH = ROOT / "tests" / "train_specs" / "bench_1b.dsv"
TINY = EXAMPLES / "tiny.dsv"


def graph_of(path, *overrides):
    return run_until(dsl.load(str(path), list(overrides)), "insert_comm")


def kernels_of(g) -> KernelModel:
    """The card's kernel model; tiny's CPU "card" borrows the measured H200's rates."""
    return KernelModel.for_gpu_or_measured(g.spec.cluster.gpu)


@pytest.fixture(scope="module")
def bench():
    g = graph_of(BENCH)
    return g, kernels_of(g)


def block_cost(coster, g, prefix: str) -> tuple[dict, dict]:
    """(seconds by kind of kernel, host ops by phase) of one block's ops."""
    kinds, host = defaultdict(float), defaultdict(float)
    for op in g.ops():
        if op.name.startswith(prefix + "."):
            c = coster.cost(op)
            for (_, kind), t in c.by_kind.items():
                kinds[kind] += t
            for phase, n in c.host.items():
                host[phase] += n
    return kinds, host


def test_the_program_runs_an_fp8_plans_decoder_blocks_only():
    g = graph_of(TINY)
    blocks = ProgramBlocks(g)
    runs = {op.name: blocks.runs(op) for op in g.ops()}
    assert runs["L0.attn_norm"] and runs["L1.moe.experts"] and runs["L1.attn.core"]
    assert runs["mtp0.attn_norm"]  # an MTP module's decoder block is its kind's program
    assert not any(v for n, v in runs.items() if n.split(".")[0] in ("embed", "head"))
    own = [n for n in runs if n.startswith("mtp0.") and n.split(".")[1] not in (
        "attn_norm", "attn", "attn_add", "ffn_norm", "ffn", "moe", "ffn_add")]
    assert own and not any(runs[n] for n in own)  # its own norms and projection: eager
    # a BF16 plan has no groups, and a policy the program refuses keeps the eager modules
    for overrides in (["precision.linear=bf16"],
                      ["precision.keep.bf16=[embedding,head,router,attention_core,norm]",
                       "precision.keep.fp32=[]"]):
        g2 = graph_of(TINY, *overrides)
        assert not any(ProgramBlocks(g2).runs(op) for op in g2.ops()), overrides
    bf16 = graph_of(TINY, "precision.linear=bf16")
    assert type(op_coster(bf16, kernels_of(bf16), 1)) is OpCoster


def test_a_program_block_costs_its_groups_not_its_ops(bench):
    g, k = bench
    program, eager = ProgramCoster(g, k, 1), OpCoster(g, k, 1)
    fused, _ = block_cost(program, g, "L1")
    unfused, _ = block_cost(eager, g, "L1")
    # the same GEMMs and attention; the memory-bound work is the groups' kernels
    for kind in ("fp8_gemm", "attention"):
        assert fused[kind] == pytest.approx(unfused[kind], rel=1e-9), kind
    assert fused["memory"] < 0.6 * unfused["memory"]
    # a norm's forward is its group's kernel: the bytes the fuse pass counted, at the
    # measured rate of the quantiser it resembles
    group = next(gr for gr in g.fusion if gr.name == "L1.attn_norm+quant")
    fwd, bwd = group_bytes(group, g.tokens)
    cost = program.cost(g.op("L1.attn_norm"))
    assert cost.gpu["fwd"] == pytest.approx(k.copy(fwd, FUSED_AS["rmsnorm_quant"]))
    assert cost.gpu["dgrad"] == pytest.approx(k.copy(bwd, FUSED_AS["rmsnorm_bwd"]))
    # its quantize op and the residual add the GEMM's epilogue does cost nothing of their own
    for name in ("L1.attn_norm.quant", "L1.attn_add"):
        assert sum(program.cost(g.op(name)).gpu.values()) == 0, name


def test_a_kernel_measured_under_its_own_name_replaces_the_borrowed_rate(bench, monkeypatch):
    g, k = bench
    program = ProgramCoster(g, k, 1)
    before = program.cost(g.op("L1.attn_norm")).gpu["dgrad"]
    monkeypatch.setattr(k, "quant", {**k.quant, "rmsnorm_bwd": 2 * k.quant[FUSED_AS["rmsnorm_bwd"]]})
    assert program.cost(g.op("L1.attn_norm")).gpu["dgrad"] == pytest.approx(before / 2)


def test_weights_are_quantised_once_per_step_not_per_micro_batch():
    g = graph_of(TINY)
    k = kernels_of(g)
    one, many = ProgramCoster(g, k, 1), ProgramCoster(g, k, 1)
    assert many.micro > 1  # tiny runs several micro-batches a step
    one.micro = 1
    op = g.op("L0.attn.o_proj")
    weight = k.copy(op.attr("in_features") * op.attr("out_features") * 5, "quantize_weight")
    saved = one.cost(op).gpu["fwd"] - many.cost(op).gpu["fwd"]
    assert saved == pytest.approx(weight * (1 - 1 / many.micro))


def test_selective_recomputation_replays_the_mla_chunk_up_to_the_core():
    g = graph_of(TINY, "train.recompute=selective")
    none = graph_of(TINY, "train.recompute=none")
    k = kernels_of(g)
    sel, base = ProgramCoster(g, k, 1), ProgramCoster(none, k, 1)
    # q_down and kv_down too: the program replays the whole chunk up to the core, where
    # the eager modules' selective rule replays only the up-projections
    for name in ("L1.attn_norm", "L1.attn.q_down", "L1.attn.q_up", "L1.attn.kv_down",
                 "L1.attn.kv_up", "L1.attn.rope"):
        a, b = sel.cost(g.op(name)), base.cost(none.op(name))
        assert a.gpu["dgrad"] == pytest.approx(b.gpu["dgrad"] + a.gpu["fwd"] - _once(sel, g, name))
    for name in ("L1.attn.core", "L1.attn.o_proj", "L1.ffn_norm", "L1.moe.experts"):
        assert sel.cost(g.op(name)).gpu["dgrad"] == pytest.approx(
            base.cost(none.op(name)).gpu["dgrad"]), name  # the core's outputs are kept


def _once(coster, g, name) -> float:
    """An op's forward work done once per micro-batch however often it is replayed (its
    weight's FP8 copy)."""
    op = g.op(name)
    if op.kind != "linear":
        return 0.0
    return coster.k.copy(op.attr("in_features") * op.attr("out_features") * 5 / coster.micro,
                         "quantize_weight")


def test_a_bf16_dispatch_quantises_the_rows_where_they_arrive():
    """With shared experts and a bf16 dispatch the program still runs the MoE block, its
    rows travel in bf16 and are quantised on arrival: one kernel more, more bytes moved."""
    costs = {}
    for dispatch in ("fp8_e4m3", "bf16"):
        g = graph_of(BENCH, f"precision.dispatch={dispatch}")
        coster = ProgramCoster(g, kernels_of(g), 1)
        cost = coster.cost(g.op("L1.moe.experts"))
        costs[dispatch] = (cost, dict(coster.ledger))
    fp8, bf16 = costs["fp8_e4m3"], costs["bf16"]
    assert "quantize_act" in bf16[1] and "quantize_act" not in fp8[1]
    assert sum(bf16[0].host.values()) == pytest.approx(
        sum(fp8[0].host.values()) + ProgramCoster(graph_of(BENCH), kernels_of(graph_of(BENCH)),
                                                  1).launch)
    assert bf16[0].gpu["fwd"] > fp8[0].gpu["fwd"]


def test_the_roofline_charges_the_groups_on_an_uncalibrated_card():
    g = graph_of(TINY)
    rates = Rates.of(g.spec.cluster.gpu)
    blocks = ProgramBlocks(g)
    norm = g.op("L1.attn_norm")
    fwd, dgrad, _ = roofline_times(norm, blocks, g.tokens, rates)
    group = blocks.at["L1.attn_norm"][0]
    assert fwd == pytest.approx(group_bytes(group, g.tokens)[0] / rates.hbm)
    assert dgrad == pytest.approx(group_bytes(group, g.tokens)[1] / rates.hbm)
    assert roofline_times(g.op("L1.attn_norm.quant"), blocks, g.tokens, rates) == (0, 0, 0)
    emb = g.op("embed.tokens") if "embed.tokens" in {o.name for o in g.ops()} else next(
        o for o in g.ops() if o.kind == "embedding")
    assert roofline_times(emb, blocks, g.tokens, rates) == op_times(emb, g.tokens, rates)


def test_the_simulated_step_charges_what_the_trainer_runs(bench):
    """bench_1b's step with the program (the trainer's default) against the same step with
    `--program eager`: faster by exactly the ops' memory-bound difference, the same GEMMs."""
    from dsvc.compiler.driver import simulate_step

    g, k = bench
    program = simulate_step(g.spec).gpu_by_kind[0]
    eager = simulate_step(g.spec, program="eager").gpu_by_kind[0]

    def memory(coster):
        return sum(t for op in g.ops() if op.stage is not None and op.block != "step"
                   for (_, kind), t in coster.cost(op).by_kind.items() if kind == "memory")

    saved = memory(OpCoster(g, k, 1)) - memory(ProgramCoster(g, k, 1))
    assert saved > 0.3 * eager["memory"]
    assert eager["memory"] - program["memory"] == pytest.approx(saved)
    assert program["fp8_gemm"] == pytest.approx(eager["fp8_gemm"])


def test_the_eager_choice_keeps_and_costs_the_eager_modules(capsys):
    """`dsvc report --program eager`: the eager modules' kernels and saved tensors, said in
    the report's notes; the generated program's by default."""
    from dsvc.compiler.cli import main
    from dsvc.compiler.driver import build_report

    spec = dsl.load(str(BENCH))
    eager, program = build_report(spec, program="eager"), build_report(spec)
    assert eager.value("step.time_s") > program.value("step.time_s")
    # the eager modules keep more for the backward and make no FP8 weight copies
    assert eager.value("memory.max_gpu_bytes") > program.value("memory.max_gpu_bytes")
    g = run_until(spec, "insert_comm", program="eager")
    assert g.program == "eager" and not any(ProgramBlocks(g).runs(op) for op in g.ops())
    assert type(op_coster(g, kernels_of(g), 1)) is OpCoster
    saved = {op.name: op.saved_bytes for op in g.ops()}
    fused = {op.name: op.saved_bytes for op in graph_of(BENCH).ops()}
    assert saved["L1.moe.experts"] != fused["L1.moe.experts"]  # each keeps what its code keeps
    assert main(["report", str(BENCH), "--program", "eager"]) == 0
    assert "decoder blocks: the runtime's eager modules" in capsys.readouterr().out
    assert main(["report", str(BENCH)]) == 0
    assert "eager modules" not in capsys.readouterr().out
    # what the program buys, side by side: B is the same spec with the eager modules
    assert main(["report", str(BENCH), str(BENCH), "--program-b", "eager"]) == 0
    out = capsys.readouterr().out
    assert "B = " in out and "decoder blocks: eager modules)" in out.splitlines()[1]
    assert "decoder blocks" not in out.splitlines()[0]
    step = next(line for line in out.splitlines() if "step time (simulated)" in line)
    assert "+" in step.split()[-1]  # B (eager) is slower
    assert main(["report", str(BENCH), "--program-b", "eager"]) == 2
    assert "--program-b applies to SPEC2" in capsys.readouterr().err


def test_launches_match_the_generated_programs_run(tmp_path):
    """The simulator's launches of tiny's MLA + MoE block against the generated kernels
    bench/fusion_cpu.py counts in a run of that block (weights quantised in the run)."""
    import json

    from tests.bench_scripts import load_bench

    bench = load_bench("fusion_cpu")
    out = tmp_path / "fusion.json"
    bench.main(["--spec", str(EXAMPLES / "tiny.dsv"), "--tokens", "8", "--json", str(out)])
    res = json.loads(out.read_text())
    ran = res["runs"]["after (program)"]["triton_launches"]
    g = graph_of(TINY)
    _, launches = block_host(g, kernels_of(g), res["layer"])
    assert round(launches) == ran, (launches, ran)


def test_a_hot_expert_rank_scales_its_experts_work_not_its_tokens(bench):
    """Under a measured load histogram the busiest EP rank's experts serve `load` times the
    mean rank's rows: the grouped GEMMs and the experts' SwiGLU kernels scale, the combine
    and the norm's rebuild on the tokens' own rank do not (the eager costs scale whole)."""
    g, k = bench
    op = g.op("L1.moe.experts")
    program = ProgramCoster(g, k, 1)
    one, two = program.cost(op), ProgramCoster(g, k, 1).cost(op, 2.0)

    def kind(c, name):
        return sum(t for (_, kk), t in c.by_kind.items() if kk == name)

    assert 1.5 < kind(two, "fp8_gemm") / kind(one, "fp8_gemm") <= 2.0 + 1e-9
    assert 1.0 < kind(two, "memory") / kind(one, "memory") < 2.0
    combine = ProgramCoster(g, k, 1)
    combine.cost(op, 2.0)
    program.ledger.clear()
    program.cost(op)
    assert combine.ledger["moe_combine"][0] == pytest.approx(program.ledger["moe_combine"][0])
    assert combine.ledger["swiglu_quant"][0] == pytest.approx(2 * program.ledger["swiglu_quant"][0])
    eager = OpCoster(g, k, 1)
    assert eager.cost(op, 2.0).gpu["fwd"] == pytest.approx(2 * eager.cost(op).gpu["fwd"])
