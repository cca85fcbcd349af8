"""bench/step_profile.py: a profiled step's GPU time by kind of kernel, and its idle time."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.bench_scripts import load_bench


@pytest.fixture(scope="module")
def sp():
    return load_bench("step_profile")


GENERATED = {"_gemm_kernel_static", "_grouped_wgrad_kernel", "_rmsnorm_quant_kernel"}


@pytest.mark.parametrize(
    "name, kind",
    [
        ("_gemm_kernel_static", "FP8 GEMMs (generated)"),
        ("_grouped_wgrad_kernel", "FP8 GEMMs (generated)"),
        ("_rmsnorm_quant_kernel", "fused and quantisation kernels (generated)"),
        ("flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4>>", "attention core (SDPA)"),
        # memory-efficient attention names carry "cutlass": attention before GEMMs
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)",
         "attention core (SDPA)"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7",
         "attention core (SDPA)"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1",
         "BF16 GEMMs (cuBLAS)"),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN", "BF16 GEMMs (cuBLAS)"),
        ("triton_poi_fused__to_copy_add_mul_0", "torch.compile kernels"),
        # inductor names a kernel after what it fuses, SDPA's glue included: not attention
        ("triton_poi_fused__scaled_dot_product_efficient_attention_0", "torch.compile kernels"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
         "torch element-wise and reductions"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication (NCCL)"),
    ],
)  # fmt: skip
def test_kernels_are_sorted_by_kind(sp, name, kind):
    assert sp.kernel_kind(name, GENERATED) == kind


def _kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def test_busy_time_is_the_union_of_device_intervals(sp):
    trace = {
        "traceEvents": [
            _kernel("_gemm_kernel_static", 1000.0, 300.0),
            _kernel("_gemm_kernel_static", 1200.0, 200.0),  # overlaps the first by 100 us
            _kernel("_rmsnorm_quant_kernel", 2000.0, 50.0),
            _kernel("Memcpy HtoD (Pageable -> Device)", 2100.0, 10.0, "gpu_memcpy"),
            _kernel("cudaLaunchKernel", 990.0, 5.0, "cuda_runtime"),
            _kernel("cuLaunchKernelEx", 1190.0, 5.0, "cuda_driver"),
            _kernel("cudaMalloc", 900.0, 5.0, "cuda_runtime"),  # not a launch
            _kernel("aten::mm", 980.0, 40.0, "cpu_op"),
            {"ph": "i", "cat": "kernel", "name": "marker", "ts": 5000.0},  # not a span
        ]
    }
    s = sp.summarise(trace, wall_s=0.002, generated=GENERATED)
    assert s["gpu_busy_s"] == pytest.approx((400 + 50 + 10) / 1e6)
    assert s["gpu_idle_s"] == pytest.approx(0.002 - 460e-6)
    assert s["kernels"] == 3 and s["device_events"] == 4 and s["host_launch_calls"] == 2
    gemm = s["by_kind"]["FP8 GEMMs (generated)"]
    assert gemm["events"] == 2 and gemm["gpu_s"] == pytest.approx(500e-6)
    assert s["by_kind"]["copies and fills"]["events"] == 1
    assert "BF16 GEMMs (cuBLAS)" not in s["by_kind"]  # kinds without events are left out
    assert [r["name"] for r in s["top"]][:2] == ["_gemm_kernel_static", "_rmsnorm_quant_kernel"]
    assert s["top"][0]["calls"] == 2
    text = sp.format_summary("fp8", s)
    assert "GPU busy 0.000 s (23%)" in text and "| FP8 GEMMs (generated) | 2 | 0.5 | 108.7% |" in text


def test_a_host_only_step_says_so(sp, tmp_path):
    import torch

    x = torch.randn(64, 64)
    keep = tmp_path / "trace.json.gz"
    s = sp.profile_step(lambda: (x @ x).sum(), set(), keep=str(keep))
    assert s["device_events"] == 0 and s["wall_s"] > 0
    with gzip.open(keep, "rt", encoding="utf-8") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert "aten::mm" in names  # the kept trace is the profiled step's
    assert "no GPU activity recorded (host-only run)" in sp.format_summary("bf16", s)
    # on a CUDA machine no device events means the profiler saw none: said so
    assert "CUPTI" in sp.format_summary("bf16", {**s, "cuda": True})


def test_generated_kernel_names_come_from_the_module(sp, tmp_path):
    from dsvc.compiler.codegen.kernels import generic_config, render_kernels
    from dsvc.runtime.fp8_triton import load_kernel_module

    path = tmp_path / "fp8_kernels.py"
    path.write_text(render_kernels(generic_config()))
    names = sp.generated_kernels(load_kernel_module(path))
    # the autotuned GEMM (an autotuner around the JIT function), the static one, a quantiser
    assert {"_gemm_kernel", "_gemm_kernel_static", "_quant_act_kernel"} <= names
    assert "torch" not in names and "triton" not in names


def test_trainer_bench_profiles_a_mode(tmp_path, capsys):
    """bench/trainer_gpu.py --profile on the CPU smoke build: the profiled mode's summary
    is printed and written with the results."""
    out = tmp_path / "r.json"
    trainer = load_bench("trainer_gpu")
    rc = trainer.main(["--cpu-smoke", "--modes", "bf16", "--profile", "bf16", "--json", str(out)])
    assert rc == 0
    (res,) = json.loads(out.read_text())["results"]
    assert res["profile"]["wall_s"] > 0 and res["profile"]["device_events"] == 0
    assert "bf16: one step under the profiler" in capsys.readouterr().out


def test_simulate_vs_measured_sets_a_profile_beside_the_model():
    """A run with a profiled step gets the simulator's GPU time by kind beside the
    measured one (the measured kinds folded into the model's four, idle as host)."""
    bench = load_bench("simulate_vs_measured")
    profile = {
        "device_events": 29,
        "gpu_idle_s": 0.1,
        "by_kind": {
            "FP8 GEMMs (generated)": {"events": 10, "gpu_s": 0.05},
            "fused and quantisation kernels (generated)": {"events": 10, "gpu_s": 0.02},
            "torch element-wise and reductions": {"events": 5, "gpu_s": 0.01},
            "attention core (SDPA)": {"events": 2, "gpu_s": 0.04},
        },
    }
    measured = bench.measured_by_kind(profile)
    assert measured == pytest.approx(
        {"fp8_gemm": 0.05, "bf16_gemm": 0.0, "attention": 0.04, "memory": 0.03, "host": 0.1}
    )
    sim = {"by_kind": {"fp8_gemm": 0.1, "attention": 0.02, "memory": 0.03, "host": 0.0}}
    run = {"spec": "s.dsv", "mode": "fp8", "profile": profile}
    lines = bench.breakdown(run, sim)
    assert "| fp8_gemm | 0.1000 | 0.0500 | 2.00 |" in lines
    assert "| bf16_gemm | 0.0000 | 0.0000 |  |" in lines  # nothing measured: no ratio
    assert "| memory | 0.0300 | 0.0300 | 1.00 |" in lines
    unprofiled = bench.breakdown({"spec": "s.dsv", "mode": "fp8"}, sim)
    assert "| attention | 0.0200 | not profiled | |" in unprofiled
    empty = {**run, "profile": {**profile, "device_events": 0}}  # no GPU activity seen
    assert "| attention | 0.0200 | not profiled | |" in bench.breakdown(empty, sim)


def test_trainer_bench_refuses_unknown_profile_modes(capsys):
    trainer = load_bench("trainer_gpu")
    with pytest.raises(SystemExit, match="unknown mode 'fp9'"):
        trainer.main(["--cpu-smoke", "--modes", "bf16", "--profile", "fp9"])
    with pytest.raises(SystemExit, match="--trace-dir"):
        trainer.main(["--cpu-smoke", "--trace-dir", "/nonexistent"])


def test_every_kernel_is_summarised_by_name(sp):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "_rmsnorm_bwd_kernel", "ts": 0, "dur": 30},
        {"ph": "X", "cat": "kernel", "name": "_rmsnorm_bwd_kernel", "ts": 40, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "_moe_combine_kernel", "ts": 60, "dur": 5},
    ]}
    s = sp.summarise(trace, 1e-4, {"_rmsnorm_bwd_kernel", "_moe_combine_kernel"}, top=1)
    assert len(s["top"]) == 1 and set(s["by_name"]) == {"_rmsnorm_bwd_kernel", "_moe_combine_kernel"}
    assert s["by_name"]["_rmsnorm_bwd_kernel"]["calls"] == 2
    assert s["by_name"]["_rmsnorm_bwd_kernel"]["gpu_s"] == pytest.approx(40e-6)


def test_the_fused_kernels_the_bench_names_are_the_modules(tmp_path):
    """simulate_vs_measured's map from the simulator's fused kernels to the Triton kernels
    a profile names: each a kernel of the generated module, each a kernel the simulator
    charges."""
    from dsvc.compiler.codegen.kernels import generic_config, render_kernels
    from dsvc.compiler.passes.simulate_program import FUSED_AS
    from dsvc.runtime.fp8_triton import load_kernel_module

    bench = load_bench("simulate_vs_measured")
    path = tmp_path / "fp8_kernels.py"
    path.write_text(render_kernels(generic_config()))
    names = load_bench("step_profile").generated_kernels(load_kernel_module(path))
    assert set(bench.FUSED_TRITON) <= set(FUSED_AS)
    assert set(bench.FUSED_TRITON.values()) <= names


def test_a_profiled_run_calibrates_the_fused_kernels(tmp_path, monkeypatch):
    """A profile of bench_1b's program whose fused kernels took twice what the simulator
    charged: the table says so, --calibrate writes half the assumed shares for the card,
    and a kernel model read from the written file charges those kernels twice the time."""
    from dsvc import dsl
    from dsvc.compiler.costs.kernel_rates import KernelModel

    bench = load_bench("simulate_vs_measured")
    run = {"spec": "tests/train_specs/bench_1b.dsv", "overrides": [], "mode": "fp8",
           "card": "NVIDIA H200", "gpu": "h200", "date": "2026-12-07", "commit": "x"}
    sim = bench.simulate(run)
    assert sim["fused"]["rmsnorm_bwd"][2] > 0  # one launch per norm per micro-batch
    by_name = {triton: {"kind": "fused", "calls": round(sim["fused"][k][2]),
                        "gpu_s": 2 * sim["fused"][k][1]}
               for k, triton in bench.FUSED_TRITON.items() if k in sim["fused"]}
    by_name["_moe_combine_kernel"]["calls"] += 1  # a launch the simulator did not count
    run["profile"] = {"device_events": 100, "by_name": by_name}
    rows = bench.fused_rows(run, sim)
    norm = next(r for r in rows if r["kernel"] == "rmsnorm_bwd")
    assert norm["share"] == pytest.approx(norm["assumed"] / 2)
    assert any("| rmsnorm_bwd |" in line for line in bench.fused_table(run, rows))
    cal = tmp_path / "calibration.json"
    cal.write_text(bench.CALIBRATION.read_text())
    monkeypatch.setattr(bench, "CALIBRATION", cal)
    skipped = bench.calibrate(run, rows)
    combine = next(r for r in rows if r["kernel"] == "moe_combine")
    assert skipped == [f"moe_combine: {combine['launches']:.0f} simulated launches, "
                       f"{combine['calls']} profiled"]
    data = json.loads(cal.read_text())
    written = data["cards"]["h200"]["fused_fraction_of_copy"]
    assert "moe_combine" not in written and written["rmsnorm_bwd"] == round(norm["share"], 3)
    assert data["cards"]["h200"]["fused_run"]["date"] == "2026-12-07"
    gpu = dsl.load(str(bench.ROOT / run["spec"])).cluster.gpu
    model = KernelModel("h200", data["cards"]["h200"], data["constants"], gpu)
    before = KernelModel.for_gpu(gpu)
    assert model.copy(1e9, "rmsnorm_bwd") == pytest.approx(
        before.copy(1e9, "quantize_act_both") * norm["assumed"] / round(norm["share"], 3))
