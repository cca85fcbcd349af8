"""`dsvc report`: golden text per example, the JSON schema, side by side, the CLI's exit
codes, and what it must not import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsvc import dsl
from dsvc.compiler.cli import main
from dsvc.compiler.driver import build_report
from dsvc.compiler.report import (
    REQUIRED,
    SCHEMA,
    SCHEMA_VERSION,
    compare_json,
    render_text,
    report_json,
)
from tests.conftest import EXAMPLES, ROOT
from tests.golden import check_golden

SPECS = ROOT / "tests" / "compiler" / "specs"
EXAMPLE_SPECS = sorted(p.name for p in EXAMPLES.glob("*.dsv"))
ALL_SPECS = [f"examples/{n}" for n in EXAMPLE_SPECS] + \
    [f"tests/compiler/specs/{p.name}" for p in sorted(SPECS.glob("*.dsv"))]


def run_cli(capsys, monkeypatch, *argv):
    monkeypatch.chdir(ROOT)
    code = main(["report", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", EXAMPLE_SPECS)
def test_golden_text(name, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, f"examples/{name}")
    assert code == 0
    check_golden(f"report/{name.removesuffix('.dsv')}.txt", out)


def test_golden_symbolic_tiny(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "examples/tiny.dsv", "--symbolic")
    assert code == 0 and "= 2*L*(d_c + d_r)" in out  # KV = L (d_c + d_r) x 2 B
    check_golden("report/tiny_symbolic.txt", out)


def test_golden_side_by_side(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "examples/deepseek_v2_lite.dsv",
                           "examples/deepseek_v3.dsv")
    assert code == 0
    check_golden("report/compare_v2_lite_v3.txt", out)


def test_golden_compare_on_the_same_device(capsys, monkeypatch):
    """FP8 against BF16 and DualPipe against DualPipeV on DeepSeek-V3: each side's busiest
    device differs (5 and 2), so the rows say which it is on each side, memory is also
    compared device by device, and rows whose settings differ carry both
    ("(dualpipe | dualpipev)"); a change across zero gets no percentage."""
    code, out, _ = run_cli(capsys, monkeypatch, "examples/deepseek_v3.dsv",
                           "examples/deepseek_v3.dsv", "--set-b", "precision.linear=bf16",
                           "--set-b", "precision.dispatch=bf16", "--set-b",
                           "parallel.schedule=dualpipev")
    assert code == 0
    assert "(A: device 5, B: device 2)" in out and "on device 5 (A's most loaded):" in out
    assert "(dualpipe | dualpipev)" in out
    check_golden("report/compare_v3_fp8_bf16.txt", out)


def test_no_percentage_across_zero():
    from dsvc.compiler.costs.quantities import format_delta

    assert format_delta(21.77e9, -127.77e9, "B")[1] == ""  # headroom turning negative
    assert format_delta(0, 5.0, "s")[1] == ""
    assert format_delta(2.0, 3.0, "s")[1] == "+50.0%"
    assert format_delta(-2.0, -3.0, "B")[1] == "+50.0%"  # both negative: a relative change


def test_golden_overlap_under_1f1b_is_refused_with_a_note(capsys, monkeypatch):
    """DeepSeek-V3's overlap setting under 1F1B: no F&B pairs, so the roofline no longer hides
    the all-to-all and the report says why (the simulated step never overlapped it)."""
    code, out, _ = run_cli(capsys, monkeypatch, "examples/deepseek_v3.dsv", "--set",
                           "parallel.schedule=1f1b")
    assert code == 0
    step = out[out.index("training step:"):]
    assert "EP all-to-all not hidden" in step and "EP all-to-all not hidden  0 s" not in step
    check_golden("report/v3_1f1b_overlap_note.txt", step)


@pytest.mark.parametrize("path", ALL_SPECS)
def test_json_has_every_required_key(path, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, path, "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["schema"], data["version"]) == (SCHEMA, SCHEMA_VERSION)
    for key in REQUIRED:
        section, name = key.split(".")
        assert name in data[section], key
        value = data[section][name]
        assert value is None or isinstance(value, (int, float, bool)), key


def test_json_values_in_base_units(capsys, monkeypatch):
    _, out, _ = run_cli(capsys, monkeypatch, "examples/deepseek_v3.dsv", "--json")
    data = json.loads(out)
    assert data["model"]["kv_cache_bytes_per_token"] == 70272
    assert data["network"]["endpoints"] == 16384 and data["network"]["used_endpoints"] == 2048
    assert 120e-6 < data["decode"]["comm_s_per_stage"] < 130e-6  # seconds
    mem = data["memory"]
    # DeepSeek's plan does not fit this trainer on 2048 H800 (fp32 parameters and gradients
    # on every rank, an FP8 weight copy and the expert rows kept per micro-batch in flight);
    # `fits` is the comparison it states
    assert mem["fits"] is False and mem["usable_bytes"] < mem["max_gpu_bytes"]
    assert mem["usable_bytes"] < mem["gpu_bytes"]
    assert mem["max_gpu_bytes"] == max(d["total"] for d in mem["devices"]) == mem["max"]["total"]
    assert mem["headroom_bytes"] == mem["usable_bytes"] - mem["max_gpu_bytes"]
    assert len(data["memory"]["devices"]) == 16  # per-device rows are a list
    assert data["memory"]["devices"][0]["stages"] == [0, 31]
    assert 0 < data["step"]["mfu"] < 1  # a fraction, not a percentage


def test_json_symbolic_carries_formulas(capsys, monkeypatch):
    _, out, _ = run_cli(capsys, monkeypatch, "examples/deepseek_v3.dsv", "--json", "--symbolic")
    data = json.loads(out)
    assert data["formulas"]["model.kv_cache_bytes_per_token"] == "2*L*(d_c + d_r)"
    assert data["symbols"]["d_c"]["value"] == 512
    assert data["symbols"]["d_c"]["source"].endswith("deepseek_v3.dsv:18")
    assert data["derived"]["M"]["value"] == 120


def test_side_by_side_json_deltas():
    a = build_report(dsl.load(EXAMPLES / "deepseek_v2_lite.dsv"))
    b = build_report(dsl.load(EXAMPLES / "deepseek_v3.dsv"))
    data = compare_json(a, b)
    assert data["delta"]["model.kv_cache_bytes_per_token"] == 70272 - 27 * 576 * 2
    assert data["a"]["model_name"] == "deepseek_v2_lite"
    assert "memory.fits" not in data["delta"]  # booleans have no delta
    # which device each side's busiest figures describe; same-index rows have deltas
    assert data["busiest"]["memory.max_device"] == {"a": 0, "b": 5}
    assert data["delta"]["memory.devices.0.total"] == (
        data["b"]["memory"]["devices"][0]["total"] - data["a"]["memory"]["devices"][0]["total"])


def test_two_reports_of_one_spec_are_identical():
    spec = dsl.load(EXAMPLES / "deepseek_v3.dsv")
    assert render_text(build_report(spec)) == render_text(build_report(spec))
    assert report_json(build_report(spec)) == report_json(build_report(spec))


def test_cli_errors(capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(capsys, monkeypatch, "examples/nope.dsv")
    assert code == 1 and "nope.dsv" in err
    code, _, err = run_cli(capsys, monkeypatch, "examples/deepseek_v3.dsv", "--expert-load",
                           str(tmp_path / "missing.json"))
    assert code == 2 and "no such file" in err
    # a malformed histogram: a diagnostic naming the file and the JSON position, exit 1,
    # the same as inspect and compile give
    (tmp_path / "bad.json").write_text('{"layers.3": [1,\n  oops]}')
    code, _, err = run_cli(capsys, monkeypatch, "examples/deepseek_v3.dsv", "--expert-load",
                           str(tmp_path / "bad.json"))
    assert code == 1 and f"{tmp_path / 'bad.json'}:2:3: error: expert load file is not valid JSON" in err
    code, _, _ = run_cli(capsys, monkeypatch)
    assert code == 2  # no SPEC


def test_bad_expert_load_named_in_the_spec_is_a_spec_error(capsys, monkeypatch, tmp_path):
    (tmp_path / "load.json").write_text("[1, 2]")
    text = (EXAMPLES / "deepseek_v3.dsv").read_text().replace(
        'include "clusters/h800_2048.dsv"', f'include "{EXAMPLES}/clusters/h800_2048.dsv"')
    text = text.replace("pipeline = 16", 'pipeline = 16\n  expert_load = "load.json"')
    (tmp_path / "v3.dsv").write_text(text)
    code, _, err = run_cli(capsys, monkeypatch, str(tmp_path / "v3.dsv"))
    assert code == 1
    assert "v3.dsv:" in err and "2 entries" in err  # points at the spec line


def test_report_imports_neither_torch_nor_pydantic():
    # sympy and networkx come in with the graph (the partition and the simulated step)
    code = ("import sys; from dsvc.compiler.cli import main; "
            "rc = main(['report', 'examples/deepseek_v3.dsv']); "
            "bad = [m for m in ('torch', 'pydantic', 'matplotlib') if m in sys.modules]; "
            "sys.exit(rc or (3 if bad else 0))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "memory per GPU" in done.stdout


def test_published_json_schema_is_current_and_every_example_validates():
    """docs/report.schema.json is generated from the report's tables (pydantic); every example's
    `--json` document validates, and a document missing a required key does not."""
    import pydantic

    from dsvc.compiler.report_schema import json_schema, validate_report
    from tests import golden

    schema = json_schema()
    path = ROOT / "docs" / "report.schema.json"
    if golden.UPDATE:
        path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")

    def essentials(s: dict) -> dict:  # what a consumer relies on, not pydantic's wording
        parts = {"": s, **s.get("$defs", {})}
        return {name: (sorted(d.get("properties", {})), sorted(d.get("required", [])),
                       d.get("additionalProperties")) for name, d in parts.items()}

    published = json.loads(path.read_text())
    assert essentials(published) == essentials(schema), (
        "docs/report.schema.json is stale: rerun with --update-golden")
    for spec in ALL_SPECS:
        validate_report(report_json(build_report(dsl.load(ROOT / spec))))
    doc = report_json(build_report(dsl.load(EXAMPLES / "tiny.dsv")))
    del doc["step"]["mfu"]
    with pytest.raises(pydantic.ValidationError, match="step.mfu"):
        validate_report(doc)
