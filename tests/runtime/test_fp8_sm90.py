"""The generated kernels' GPU-only code paths, compiled for sm_90 on this CPU machine.

The interpreter runs the kernels' numerics (test_fp8_triton.py) but never the code a
GPU compiles: the fp32 -> e4m3 cast of the hardware path, TMA descriptors feeding
wgmma, the persistent and split-K GEMMs, register and shared-memory budgets. Triton's
NVIDIA backend compiles all of it without a driver, so bench/kernels_sm90.py --check is
run here in a subprocess (a process where triton is imported without TRITON_INTERPRET),
with --self-test: a GEMM ptxas serialises must be reported as serialised.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "kernels_sm90.py"


def _run(*args):
    env = {
        k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DSVC_FP8_SOFT_ROUND")
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def sm90():
    probe = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
         "import kernels_sm90; print(kernels_sm90.available() or '')"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if probe.returncode != 0 or probe.stdout.strip():
        pytest.skip(f"no sm_90 compilation here: {probe.stdout.strip() or probe.stderr[-300:]}")
    proc = _run("--check", "--quick", "--self-test")
    return proc


def test_every_kernel_compiles_for_hopper_without_spills(sm90):
    assert sm90.returncode == 0, sm90.stdout[-3000:] + sm90.stderr[-3000:]
    assert "FAILED" not in sm90.stdout
    # every GEMM row is a wgmma kernel; the plain and grouped GEMMs load by TMA
    gemm_rows = [line for line in sm90.stdout.splitlines() if "wgmma" in line]
    assert len(gemm_rows) >= 5, sm90.stdout
    assert all(row.split("|")[4].strip() == "0" for row in gemm_rows)  # spilled bytes
    assert any("TMA" in row and row.startswith("| gemm 4096") for row in gemm_rows)


def test_mmas_of_a_k_step_share_one_wait(sm90):
    # ptxas keeps each K-step's four k32 wgmmas in one group (one WARPGROUP.DEPBAR); had
    # it serialised them (its note C7514/C7515), --check would fail, and --self-test
    # proves that a kernel ptxas does serialise is reported as such
    groups = re.findall(r"SASS: (\d+) MMAs in (\d+) groups", sm90.stdout)
    assert len(groups) >= 5, sm90.stdout
    assert all(int(groups_) < int(mmas) for mmas, groups_ in groups), groups
    assert "serialised" not in sm90.stdout


def test_warp_specialised_configs_compile_to_two_consumer_warpgroups(sm90):
    # the WS configs (plain GEMM and the dense wgrad) are split by triton's Hopper pass:
    # setmaxnreg in the PTX, two groups of MMAs per K-step (one per consumer warpgroup),
    # no spills; the others are not split
    rows = [line for line in sm90.stdout.splitlines() if "wgmma" in line]
    ws = [row for row in rows if row.split("|")[2].strip().endswith(" ws")]
    assert len(ws) >= 2, sm90.stdout
    for row in ws:
        assert "warp-specialised (setmaxnreg" in row, row
        assert "8 MMAs in 2 groups" in row, row
        assert row.split("|")[4].strip() == "0", row
    assert not any("warp-specialised" in row for row in rows if row not in ws)


def test_the_cast_path_saves_the_integer_rounding(sm90):
    rows = {}
    for line in sm90.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith(("quantize", "swiglu")):
            rows[cells[0].split(" (")[0]] = (float(cells[2]), float(cells[3]))
    assert set(rows) == {"quantize_act 1x128", "quantize_act_both 1x128 + 128x1",
                         "quantize_weight 128x128", "swiglu_quant",
                         "swiglu_quant, g and u kept in FP8",
                         "swiglu_quant, FP8 g and u, gate-weighted rows"}, rows  # fmt: skip
    for name, (cast, integer) in rows.items():
        # what a GPU runs is well under the interpreter's integer rounding (~12 per value)
        assert integer - cast >= 8, (name, cast, integer)
    assert rows["quantize_act 1x128"][0] < 14  # the H200 run's 77% of copy was at ~24


def test_every_fused_launch_of_a_generated_program_compiles_for_hopper(sm90, tmp_path):
    """bench/program_sm90.py: the launches tiny's generated program makes (recorded under
    the interpreter, forward and backward of an MLA + dense and an MLA + MoE block) each
    compile for sm_90 within their spill budgets; the RMSNorm and RoPE backwards launch
    with 8 warps (whole tiles with 4 spilled 1.2-7.1 KB per thread)."""
    import json

    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "program_sm90.py"), "--spec",
         str(ROOT / "examples" / "tiny.dsv"), "--check", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    kernels = {r["kernel"] for r in rows}
    assert {
        "_rmsnorm_quant_kernel", "_rmsnorm_bwd_kernel", "_mla_rope_qkv_kernel",
        "_mla_rope_qkv_bwd_kernel", "_swiglu_quant_kernel", "_swiglu_bwd_quant_kernel",
        "_router_topk_kernel", "_router_bwd_kernel", "_moe_combine_kernel",
        "_moe_dispatch_bwd_kernel", "_quant_bhsd_kernel", "_quant_act_t_grouped_kernel",
    } <= kernels  # fmt: skip
    assert all("error" not in r for r in rows)
    for r in rows:
        if r["kernel"] in ("_rmsnorm_bwd_kernel", "_mla_rope_qkv_bwd_kernel"):
            assert r["warps"] == 8 and r["spill"] <= 384, r
    blocks = {b for r in rows for b in r["blocks"]}
    assert blocks == {"mla + dense (layer 0)", "mla + moe (layer 1)"}


def test_program_launch_findings():
    """What --check refuses: a compile error, shared memory past sm_90's 227 KB, spills
    past a kernel's budget (none for kernels without one)."""
    from tests.bench_scripts import load_bench

    program_sm90 = load_bench("program_sm90")
    ok = {"kernel": "_moe_combine_kernel", "constexprs": "", "regs": 40, "spill": 0,
          "shared": 1024}  # fmt: skip
    assert program_sm90.problems([ok]) == []
    found = program_sm90.problems([
        {**ok, "spill": 8},
        {**ok, "kernel": "_rmsnorm_bwd_kernel", "spill": 184},  # within its budget
        {**ok, "kernel": "_rmsnorm_bwd_kernel", "spill": 400},
        {**ok, "shared": 228 * 1024},
        {**ok, "error": "CompilationError: at 1:2"},
    ])  # fmt: skip
    assert len(found) == 4
    assert "spills 8 B" in found[0] and "spills 400 B" in found[1]
    assert "shared memory" in found[2] and "does not compile" in found[3]
