"""`dsvc plan`: the candidates are plans the language accepts, the search is deterministic,
its front is a Pareto front, its choice fits and is what the written spec simulates to,
its one-line rejection, its usage errors, and the V2-Lite plan on 64 H800 against the
spec as written (the V3 search's 60 s is bench/plan_speed.py's)."""

from __future__ import annotations

import pytest

from dsvc import dsl
from dsvc.compiler.cli import main
from dsvc.compiler.driver import build_report
from dsvc.compiler.plan_search.search import search
from dsvc.compiler.plan_search.space import candidates
from dsvc.compiler.plan_search.write import spec_text
from tests.conftest import EXAMPLES

TINY = EXAMPLES / "tiny.dsv"
V3 = EXAMPLES / "deepseek_v3.dsv"


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory):
    """`dsvc plan examples/tiny.dsv -o plan.dsv`, run once: (exit code, stdout, written path)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("plan") / "plan.dsv"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["plan", str(TINY), "-o", str(out), "--top", "3"])
    return code, buf.getvalue(), out


def test_every_candidate_is_a_plan_the_language_accepts():
    spec = dsl.load(TINY)
    found = candidates(spec)
    assert len(found) == len(set(found)) > 50
    for c in found:  # each loads: every rule of the language checks it
        s = dsl.load(TINY, c.overrides())
        assert (s.parallel.pipeline, s.parallel.expert, s.train.recompute) == \
            (c.pipeline, c.expert, c.recompute)
    big = candidates(dsl.load(V3, ["cluster.nodes=128"]))
    for c in big[::97]:  # a spread of V3's on 1,024 GPUs (the schedule-chunk limit included)
        dsl.load(V3, ["cluster.nodes=128", *c.overrides()])


def test_search_chooses_the_fastest_fitting_and_the_front_is_pareto(tiny_cli):
    code, text, out = tiny_cli
    assert code == 0
    r = search(TINY)
    again = search(TINY)  # deterministic: the same candidates, order and numbers
    assert [(o.candidate, o.estimate_s, o.step_s, o.peak_bytes, o.rejected)
            for o in r.outcomes] == [(o.candidate, o.estimate_s, o.step_s, o.peak_bytes,
                                      o.rejected) for o in again.outcomes]
    fits = [o for o in r.simulated if o.rejected is None]
    assert r.chosen.step_s == min(o.step_s for o in fits)
    assert r.chosen.peak_bytes <= r.usable_bytes
    front = r.pareto()
    assert front[0] is r.chosen
    for a, b in zip(front, front[1:]):
        assert a.step_s <= b.step_s and a.peak_bytes > b.peak_bytes
    for o in fits:  # every fitting plan is on the front or beaten on both by one that is
        assert o in front or any(f.step_s <= o.step_s and f.peak_bytes <= o.peak_bytes
                                 for f in front)
    assert f"chosen: {r.chosen.candidate.label(4)}" in text
    assert "Pareto front" in text and "headroom" in text


def test_written_spec_simulates_to_the_chosen_plan(tiny_cli):
    code, text, out = tiny_cli
    written = out.read_text()
    assert written.startswith("# Written by `dsvc plan`")
    assert "# trains on two CPU cores" in written  # the input's comments kept
    r = search(TINY)
    report = build_report(dsl.load(out))
    assert report.value("step.time_s") == r.chosen.step_s
    assert report.value("memory.max_gpu_bytes") == r.chosen.peak_bytes


def test_a_changed_included_block_is_inlined_and_a_cluster_file_replaces(tmp_path):
    out = tmp_path / "sub" / "v3.dsv"
    out.parent.mkdir()
    text = spec_text(V3, ["cluster.nodes=128", "train.recompute=full", "parallel.overlap=none",
                          "cluster.network.latency=3 us"], [], str(out), [])
    assert "include" not in text and "nodes = 128" in text
    assert "  recompute = full\n" in text  # the comment on the old value dropped
    spec = dsl.loads(text, str(out))
    assert spec.cluster.world_size == 1024 and spec.train.recompute == "full"
    text = spec_text(V3, ["parallel.expert=4", "train.micro_batch=8"],
                     [EXAMPLES / "clusters" / "h800_64.dsv"], str(out), [])
    assert dsl.loads(text, str(out)).cluster.world_size == 64
    kept = spec_text(V3, ["parallel.pipeline=8"], [], str(out), [])
    assert 'include "../../' in kept  # the cluster stays included, re-pointed from sub/
    spec = dsl.loads(kept, str(out))
    assert spec.cluster.world_size == 2048 and spec.parallel.pipeline == 8


def test_gpus_replans_a_spec_whose_own_plan_does_not_divide_them(capsys):
    # tiny's pipeline 2 x EP 2 does not suit 2 GPUs (EP outside DP 1); the search replans
    assert main(["plan", str(TINY), "--gpus", "2", "--simulate", "2"]) == 0
    out = capsys.readouterr().out
    assert " on 2 " in out and "chosen: " in out


def test_nothing_fits_names_the_best_rejected_in_one_line(capsys):
    assert main(["plan", str(TINY), "--max-memory", "1MB"]) == 1
    out = capsys.readouterr().out
    assert "no plan fits" in out
    line = next(x for x in out.splitlines() if x.startswith("best rejected: "))
    assert "needs" in line and "GB per GPU" in line


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0"], "not a whole number of nodes"),
    (["--max-memory", "lots"], "expected a size"),
    (["--top", "0"], "positive count"),
    (["--cluster", "/nonexistent.dsv"], "--cluster"),
    (["--set", "parallel.pipeline"], "KEY=VALUE"),
])
def test_usage_errors_are_one_line_exit_2(argv, message, capsys, tmp_path):
    assert main(["plan", str(TINY), *argv, "-o", str(tmp_path / "x.dsv")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.dsv").exists()


def test_v2_lite_on_64_h800_fits_and_beats_the_spec_as_written():
    r = search(EXAMPLES / "deepseek_v2_lite.dsv", [],
               [EXAMPLES / "clusters" / "h800_64.dsv"])
    assert r.spec.cluster.world_size == 64 and r.chosen is not None
    written = build_report(dsl.load(EXAMPLES / "deepseek_v2_lite.dsv"))
    assert r.chosen.peak_bytes <= r.usable_bytes
    assert r.chosen.step_s <= written.value("step.time_s")
    # and at least as fast as PP 2 DualPipeV, EP 16, which the estimate without the SMs an
    # in-flight all-to-all takes from compute once ranked below the six simulated by default
    pp2 = build_report(dsl.load(EXAMPLES / "deepseek_v2_lite.dsv", (
        "parallel.pipeline=2", "parallel.schedule=dualpipev", "parallel.expert=16",
        "parallel.overlap=dual_microbatch")))
    assert r.chosen.step_s <= pp2.value("step.time_s")


def test_the_estimate_charges_the_compute_an_all_to_all_slows():
    # under dual micro-batch overlap the simulator runs compute beside an all-to-all in
    # flight on the SMs the communication kernels leave; the estimate charges it too
    import dataclasses

    from dsvc.compiler.plan_search.estimate import Estimator
    from dsvc.compiler.plan_search.search import load_base
    from dsvc.compiler.plan_search.space import Candidate

    base = load_base(EXAMPLES / "deepseek_v2_lite.dsv", [], [EXAMPLES / "clusters" / "h800_64.dsv"])
    est = Estimator(base)
    assert est.contended > 1.0  # the calibrated card: 20 of its SMs go to communication
    c = Candidate(pipeline=2, schedule="dualpipev", expert=32, micro_batch=1, recompute="none",
                  overlap="dual_microbatch")
    slowed = est.step_s(c)
    est.contended = 1.0
    assert slowed > est.step_s(c)
    assert est.step_s(dataclasses.replace(c, overlap="none")) > slowed  # overlap still pays


def test_the_estimate_costs_a_layer_as_the_simulator_does():
    """The estimate's decoder layer is the simulator's: the same graph (formats assigned,
    fused) and the same coster (an FP8 plan's blocks: the generated program's kernels),
    so its linears are FP8 GEMMs and its memory-bound work the fused kernels'."""
    from dsvc.compiler.driver import run_until
    from dsvc.compiler.passes.simulate import kernel_model
    from dsvc.compiler.passes.simulate_program import ProgramCoster
    from dsvc.compiler.plan_search.estimate import Estimator
    from dsvc.compiler.plan_search.search import load_base

    base = load_base(EXAMPLES / "deepseek_v2_lite.dsv", [], [])
    ep = base.parallel.expert
    est = Estimator(base)
    units = est.units(base.train.micro_batch, base.train.recompute, ep)
    lay = base.model.layers[1]  # the first MoE layer: the instance the estimate costs
    key = f"layer:{lay.attention}+{lay.ffn}"
    layer = units[key]
    # a candidate with more micro-batches a step shares each weight's FP8 copy among more
    many = est.units(base.train.micro_batch, base.train.recompute, ep, micro=64)[key]
    assert many.fwd < layer.fwd and many.dgrad == layer.dgrad
    g = run_until(base, "insert_comm")
    kernels = kernel_model(base)
    coster = ProgramCoster(g, kernels, ep)
    gpu, host = dict.fromkeys(("fwd", "dgrad", "wgrad"), 0.0), dict.fromkeys(("fwd", "dgrad", "wgrad"), 0.0)
    for op in g.ops():
        if op.block == "layer" and op.layer == 1 and op.kind not in (
                "input", "dispatch", "combine", "send", "recv", "collective"):
            cost = coster.cost(op)
            for phase in gpu:
                gpu[phase] += cost.gpu[phase]
                host[phase] += cost.host[phase] * kernels.host_s_per_op
    for phase in gpu:  # the longer of GPU and host time, per phase
        assert getattr(layer, phase) == pytest.approx(max(gpu[phase], host[phase]), rel=1e-9)
    assert all(op.dtype.startswith("fp8") for op in g.ops()
               if op.kind == "linear" and op.block == "layer")
