"""`dsvc report`: golden text per example, the JSON schema, side by side, the CLI's exit
codes, and what it must not import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dsvc.dsl.spec  # noqa: F401  (pydantic Specs for this session; the CLI alone would choose light ones)
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
    # V3's plan fits 2048 H800 (DeepSeek trained it so), and `fits` is the comparison it states
    assert mem["fits"] is True and mem["max_gpu_bytes"] <= mem["usable_bytes"] < mem["gpu_bytes"]
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
