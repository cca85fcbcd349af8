"""`dsvc inspect`: formats, filters, the JSON schema, and errors as exit codes."""

from __future__ import annotations

import json

import pytest

from dsvc.compiler.cli import main
from tests.conftest import EXAMPLES

V3 = str(EXAMPLES / "deepseek_v3.dsv")
TINY = str(EXAMPLES / "tiny.dsv")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def v3_json():
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["inspect", V3, "--format", "json"]) == 0
    return json.loads(buf.getvalue())


def test_v3_json_schema_and_figures(v3_json):
    d = v3_json
    assert d["format"] == "dsvc-graph" and d["version"] == 1
    node = next(n for n in d["nodes"] if n["id"] == "L7.attn.q_up")
    assert {"id", "op", "layer", "stage", "flops", "param_bytes", "source"} <= set(node)
    assert node["op"] == "linear" and node["layer"] == 7 and node["stage"] == 1
    assert node["source"].endswith("deepseek_v3.dsv:15")  # the `attention mla` line
    assert node["flops"] == 3 * 2 * 4096 * 1536 * 24576
    assert node["outputs"][0] == {"shape": ["T", 24576], "dtype": "bf16"}
    assert {"src", "dst"} <= set(d["edges"][0])
    stages = d["stages"]
    assert len(stages) == 32 and d["pipeline"]["stages_per_copy"] == 16
    assert {"index", "device", "layers", "flops", "param_bytes"} <= set(stages[0])
    by_index = {s["index"]: s for s in stages}
    assert by_index[0]["device"] == by_index[31]["device"] == 0  # copy A stage 0, copy B stage 15
    assert by_index[31]["copy"] == "B" and by_index[31]["copy_stage"] == 15 and by_index[31]["head"]
    assert d["pipeline"]["imbalance"]["device"] <= 1.10
    ex = d["experts"]
    assert len(ex["per_rank"]) == 64 and {len(r) for r in ex["per_rank"]} == {4}
    assert {(g["group"], g["node"]) for g in ex["groups"]} == {(g, g) for g in range(8)}
    assert d["totals"]["param_count"] == sum(n["param_count"] for n in d["nodes"])


def test_filters_keep_only_matching_ops(capsys):
    code, out, _ = _run(capsys, TINY, "--format", "json", "--stage", "1")
    d = json.loads(out)
    assert code == 0 and d["nodes"] and {n["stage"] for n in d["nodes"]} == {1}
    ids = {n["id"] for n in d["nodes"]}
    assert all(e["src"] in ids and e["dst"] in ids for e in d["edges"])
    code, out, _ = _run(capsys, TINY, "--format", "json", "--layer", "3", "--rank", "1")
    assert {n["layer"] for n in json.loads(out)["nodes"]} == {3}
    code, out, _ = _run(capsys, TINY, "--rank", "0", "--after", "partition_stages")
    assert code == 0 and "stage 0  (copy A stage 0 on pipeline rank 0)" in out
    assert "\nstage 1 " not in out


def test_after_an_early_pass(capsys):
    code, out, _ = _run(capsys, TINY, "--after", "lower", "--format", "json")
    d = json.loads(out)
    assert code == 0 and d["passes"] == ["lower"] and "stages" not in d
    assert not [n for n in d["nodes"] if n["op"] == "quantize"]
    code, _, err = _run(capsys, TINY, "--after", "lower", "--stage", "0")
    assert code == 2 and "need the partition" in err
    code, _, err = _run(capsys, TINY, "--after", "shard")
    assert code == 2 and "no such graph pass" in err


def test_dot_and_graphviz_formats(capsys, monkeypatch, tmp_path):
    code, out, _ = _run(capsys, TINY, "--format", "dot", "--layer", "0")
    assert code == 0 and out.startswith("digraph dsvc {") and '"L0.attn.q_down"' in out
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    code, _, err = _run(capsys, TINY, "--format", "png", "-o", str(tmp_path / "g.png"))
    assert code == 2 and "graphviz" in err and "apt-get install graphviz" in err
    assert not (tmp_path / "g.png").exists()


def test_output_file(capsys, tmp_path):
    path = tmp_path / "ir.txt"
    code, out, _ = _run(capsys, TINY, "-o", str(path))
    assert code == 0 and out == "" and path.read_text().startswith("# dsvc IR of model tiny")


def test_usage_and_spec_errors(capsys, tmp_path):
    code, _, err = _run(capsys, TINY, "--stage", "7")
    assert code == 2 and "2 stage(s) per model copy (0..1)" in err
    code, _, err = _run(capsys, TINY, "--layer", "9")
    assert code == 2 and "layers are 0..4" in err
    code, _, err = _run(capsys, TINY, "--expert-load", str(tmp_path / "none.json"))
    assert code == 2 and "no such file" in err
    bad = tmp_path / "load.json"
    bad.write_text("[1, 2")
    code, _, err = _run(capsys, TINY, "--expert-load", str(bad))
    assert code == 1 and "not valid JSON" in err
    spec = tmp_path / "bad.dsv"
    spec.write_text("model m { vocab = 0 }\n")
    code, _, err = _run(capsys, str(spec))
    assert code == 1 and "bad.dsv:1" in err
    code, _, err = _run(capsys, TINY, "--format", "chrome")
    assert code == 2 and "--schedule" in err


def test_schedule_hook_hands_over_to_the_schedule_view(capsys, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("dsvc.compiler.cli.inspect_schedule")
    fake.run = lambda args: 7 if args.schedule and args.format == "chrome" else 8
    monkeypatch.setitem(sys.modules, "dsvc.compiler.cli.inspect_schedule", fake)
    assert main(["inspect", TINY, "--schedule", "--format", "chrome"]) == 7
    monkeypatch.setitem(sys.modules, "dsvc.compiler.cli.inspect_schedule", None)  # not built
    code, _, err = _run(capsys, TINY, "--schedule")
    assert code == 2 and "not available" in err
