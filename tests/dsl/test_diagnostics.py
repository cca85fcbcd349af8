"""Golden diagnostics: the exact text `dsvc check` prints for one small bad spec per check.

Each tests/dsl/cases/NAME.dsv says on its first line what it checks; its
output is tests/golden/dsl/cases/NAME.txt. Every rule in `dsl.rules.RULES` must
be exercised by some case (its id appears as `[rule-id]` in a golden).
"""

from __future__ import annotations

import contextlib
import io
import pathlib

import pytest

from dsvc.compiler.cli import main
from dsvc.dsl.rules import RULES
from tests.golden import check_golden

ROOT = pathlib.Path(__file__).resolve().parents[2]
CASES = sorted((ROOT / "tests" / "dsl" / "cases").glob("*.dsv"))


def run_check(path: str) -> tuple[int, str]:
    """`dsvc check PATH` in-process: (exit code, the text a user sees)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", path])
    text = f"$ dsvc check {path}\n[exit {code}]\n"
    if err.getvalue():
        text += "--- stderr\n" + err.getvalue()
    if out.getvalue():
        text += "--- stdout\n" + out.getvalue()
    return code, text


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_case_golden(case, monkeypatch):
    monkeypatch.chdir(ROOT)
    rel = case.relative_to(ROOT).as_posix()
    code, text = run_check(rel)
    first = case.read_text(errors="replace").split("\n", 1)[0]
    if first.startswith("# check (warning)"):
        assert code == 0 and ": warning: " in text and ": error: " not in text
    elif first.startswith("# check"):
        assert code == 1 and ": error: " in text
    assert "Traceback" not in text and "internal error" not in text
    check_golden(f"dsl/cases/{case.stem}.txt", text)


def test_every_rule_has_a_case():
    goldens = "".join(p.read_text() for p in (ROOT / "tests/golden/dsl/cases").glob("*.txt"))
    missing = [rule_id for rule_id, _ in RULES if f"[{rule_id}]" not in goldens]
    assert not missing, f"rules without a golden case: {missing}"


@pytest.mark.parametrize("case", ["routing_device_limited_v2", "routing_nvl72"])
def test_no_routing_warning_inside_one_nvlink_domain(case, monkeypatch):
    """DeepSeek-V2's device-limited routing (EP 8 in a node) and V3's routing inside one
    72-GPU NVL72 domain send nothing over the network: nothing to warn about."""
    monkeypatch.chdir(ROOT)
    code, text = run_check(f"tests/dsl/cases/{case}.dsv")
    assert code == 0 and "warning" not in text and ": ok (model" in text


def test_cluster_files_check_on_their_own(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples/clusters").glob("*.dsv"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", *files])
    assert code == 0 and err.getvalue() == "", err.getvalue()
    assert "examples/clusters/h800_2048.dsv: ok (cluster h800_2048: 256 nodes x 8 GPUs, no " \
           "model: a file to include)" in out.getvalue()
    assert out.getvalue().count(": ok (cluster ") == len(files) >= 4
    assert len(CASES) >= 25


def test_all_errors_reported_at_once(monkeypatch):
    monkeypatch.chdir(ROOT)
    code, text = run_check("tests/dsl/cases/many_errors.dsv")
    assert code == 1
    assert text.count(": error: ") == 6
    assert "many_errors.dsv: 6 errors" in text


@pytest.mark.parametrize("case, needles", [
    # The rules of docs/language.md, with the numbers a user needs to fix them.
    ("dualpipe_odd_ranks", ["DualPipe needs an even number of pipeline ranks, got 1"]),
    ("dualpipe_micro_batches", ["DualPipe over 4 ranks needs an even number of at least 8 "
                                "micro-batches; global_batch gives 7",
                                "global_batch = 128 would give 8"]),
    ("dualpipev_micro_batches", ["DualPipeV over 4 ranks needs at least 8 micro-batches; "
                                 "global_batch gives 6", "global_batch = 128 would give 8"]),
    ("world_size", ["pipeline 3 does not divide the world size 64 (8 nodes x 8 GPUs)",
                    "divisors near 3: 2, 4"]),
    ("global_batch_divisible", ["global_batch 100 is not divisible by data 32 x micro_batch 2 "
                                "= 64"]),
    ("ep_inside_dp", ["expert parallelism 32 is not inside data parallelism 16"]),
    ("experts_divide_ep", ["16 experts do not divide over 32 EP ranks", "use 8 or 16"]),
    ("fp8_tile_divides_k", ["FP8 tile of 128 does not divide K = 300 of the down projection "
                            "(intermediate) of ffn 'dense'", "pad = true"]),
    ("node_limited_routing", ["spans 2 NVLink domains of 8 GPUs",
                              "set groups = 2 (one group per NVLink domain)"]),
    ("unit_unknown", ["10:15: error: unknown unit 'Gbps'", "did you mean `Gb/s`?",
                      "11:20: error: unknown unit 'gb/s'", "`GB/s` (bytes per second) or "
                      "`Gb/s` (bits per second)", "8:28: error: unknown unit 'Gbit/s'",
                      "7:27: error: unknown unit 'TFLOP/s'", "did you mean `TFLOPS`?",
                      "GB/s, TB/s, PB/s, KiB/s, MiB/s, GiB/s, TiB/s, PiB/s, Kb/s, Mb/s, Gb/s"]),
    ("unit_missing_nic", ["'nic' needs a unit: a bandwidth such as 400 Gb/s", "Gb/s"]),
    ("nic_bandwidth", ["NIC line rate 400 GB/s (3.2 Tb/s) per GPU is above", "`400 Gb/s`?",
                       "NVLink bandwidth 400 TB/s per GPU is above", "`400 GB/s`?"]),
    ("unknown_key", ["unknown key 'top_groupz'", "did you mean `top_groups`?"]),
    ("unit_wrong_kind", ["'bf16' must be a compute rate such as 989 TFLOPS, got GB/s "
                         "(a bandwidth)"]),
    ("include_cycle", ["include cycle: tests/dsl/cases/include_cycle.dsv -> "
                       "tests/dsl/cases/inc/cycle_b.dsv -> tests/dsl/cases/include_cycle.dsv"]),
    ("layer_gap", ["layer 3 is not assigned"]),
    ("layer_overlap", ["layer 1 is assigned twice"]),
])
def test_design_rule_messages(case, needles, monkeypatch):
    monkeypatch.chdir(ROOT)
    _, text = run_check(f"tests/dsl/cases/{case}.dsv")
    for needle in needles:
        assert needle in text
