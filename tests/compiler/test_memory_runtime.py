"""The report's memory against the runtime's own tensors (issue 17, item 2).

Parameters, gradients and the ZeRO-1 optimizer's state: every pipeline rank's stage
modules and its `ZeroAdamW` are built from the compiled plan on the meta device (so
DeepSeek-V3's 671B parameters cost nothing), and their bytes must EQUAL the report's
per-device rows: 1F1B (the tiny example), DualPipe (DeepSeek-V3 on 2048 GPUs and the
tiny model), DualPipeV, one GPU (tests/train_specs/bench_1b.dsv); all ZeRO-1.

Activations: one micro-batch through the whole model on the CPU, its saved tensors
counted with saved-tensor hooks (parameters excluded), against the graph's saved bytes
lowered for a CPU (`lower(spec, device="cpu")`: torch's composite rms_norm and the math
attention path, the two places a CPU keeps other tensors than a GPU), within 10%, for
the tiny example in every recompute mode and bench_1b's shapes. A stage's peak is this
per-micro-batch figure times the micro-batches the schedule keeps in flight.
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
        state = sum(t.numel() * t.element_size() for s in opt.shards
                    for t in (s.master, s.exp_avg, s.exp_avg_sq, s.decay, s.counted))
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


def _saved_by_runtime(spec) -> int:
    """Bytes autograd keeps of one micro-batch's forward through the whole model (CPU)."""
    from dsvc.runtime.model import build_full_model

    plan = parse_plan(build_plan(spec))
    torch.manual_seed(0)
    model = build_full_model(plan)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    tokens = torch.randint(0, plan.model.vocab, (plan.train.micro_batch, plan.train.seq_len))
    return saved_bytes(lambda: model(tokens, tokens), (*model.parameters(), *model.buffers()))


def _saved_by_graph(spec) -> float:
    from dsvc.compiler.passes.lower import lower

    g = lower(spec, device="cpu")
    return sum(g.num(op.saved_bytes) for op in g.ops())


@pytest.mark.parametrize("model, mode", [
    ("tiny", "none"), ("tiny", "selective"), ("tiny", "full"),
    ("bench_1b", "none"),  # its FP8 emulation on a CPU takes a while: one mode
])
def test_activations_within_ten_percent_of_the_runtimes(model, mode):
    if model == "tiny":  # one process: the whole model, experts local
        spec = dsl.load(EXAMPLES / "tiny.dsv", [f"train.recompute={mode}", "train.seq_len=128",
                                               "parallel.expert=1"])
    else:
        spec = _bench_1b_two_layers([f"train.recompute={mode}", "train.seq_len=128",
                                     "train.global_batch=1", "train.micro_batch=1"])
    runtime, graph = _saved_by_runtime(spec), _saved_by_graph(spec)
    assert abs(graph / runtime - 1) <= ACTIVATION_BOUND, (graph, runtime)


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
