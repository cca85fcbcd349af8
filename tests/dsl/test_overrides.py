"""`--set key=value` overrides: applied to the spec as written, checked like the file, and
diagnosed at the override (dsl/overrides.py)."""

from __future__ import annotations

import contextlib
import io

import pytest

from dsvc import dsl
from tests.conftest import EXAMPLES

V3 = EXAMPLES / "deepseek_v3.dsv"


def _cli(*argv) -> tuple[int, str, str]:
    from dsvc.compiler.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_values_reach_every_kind_of_place():
    base = dsl.load(V3)
    spec = dsl.load(V3, overrides=[
        "cluster.nodes=128",                 # a key of a top block (in an included file)
        "cluster.gpu.memory=141 GB",         # inside a `kind { ... }` value, with a unit
        "cluster.network.effective=30 GB/s",  # a nested block with a label (`network infiniband`)
        "model.ffn.moe.top_k=6",             # a block named by kind and label
        "train.optimizer.lr=1e-4",           # a keyword argument of a call
        "parallel.schedule=dualpipev",       # a name
    ])
    assert spec.cluster.world_size == 1024 and spec.parallel.data == 64  # derived again
    assert spec.cluster.gpu.memory == 141e9
    assert spec.cluster.network.effective == 30e9
    assert spec.model.ffns["moe"].top_k == 6 and spec.model.ffns["moe"].routed == 256
    assert spec.train.optimizer.lr == 1e-4
    assert spec.train.optimizer.betas == base.train.optimizer.betas  # the other kwargs stay
    assert spec.parallel.schedule == "dualpipev"
    assert spec.content_hash != base.content_hash  # another spec (builds are cached by it)
    assert dsl.load(V3).content_hash == base.content_hash  # the files were not touched


def test_a_later_override_wins_and_a_missing_key_is_added():
    spec = dsl.load(V3, overrides=["parallel.pipeline=8", "parallel.pipeline=32"])
    assert spec.parallel.pipeline == 32
    assert dsl.load(V3).parallel.two_hop is True  # not written: the default
    assert dsl.load(V3, overrides=["parallel.two_hop=false"]).parallel.two_hop is False
    spec = dsl.load(EXAMPLES / "tiny.dsv", overrides=["decode.link=nvlink"])  # a new block
    assert spec.decode is not None and spec.decode.link == "nvlink"


def _errors(overrides) -> str:
    with pytest.raises(dsl.SpecError) as err:
        dsl.load(V3, overrides=overrides)
    return err.value.render()


def test_diagnostics_point_at_the_override():
    text = _errors(["parallel.pipeline=16", "parallel.pipelin=8"])
    assert "--set:2:1: error: unknown key 'pipelin' in `parallel`" in text
    assert "    2 | parallel.pipelin=8" in text and "did you mean `pipeline`?" in text
    text = _errors(["parallel.schedule=dualpip"])
    assert "--set:1:19: error:" in text and "did you mean `dualpipe`?" in text
    text = _errors(["parallel.pipeline=7"])  # a rule, as for the same value in the file
    assert "--set:1:1: error: pipeline 7 does not divide the world size 2048" in text
    text = _errors(["paralel.pipeline=4"])
    assert "unknown block 'paralel'" in text and "did you mean `parallel`?" in text
    text = _errors(["cluster.nvlink.bandwidth=300 Gbps"])
    assert "--set:1:30: error: unknown unit 'Gbps'" in text
    text = _errors(["model.ffn.top_k=3"])
    assert "`ffn` names several blocks; say which: dense, moe" in text
    text = _errors(["parallel.pipeline=(8"])
    assert "--set:1:" in text and "')'" in text


def test_cli_takes_set_on_report_inspect_and_compile(tmp_path):
    rc, out, _ = _cli("report", str(V3), "--json", "--set", "parallel.overlap=none")
    assert rc == 0
    import json

    assert json.loads(out)["step"]["time_s"] > dsl_step_time(V3)
    rc, out, _ = _cli("inspect", str(EXAMPLES / "tiny.dsv"), "--schedule", "--set",
                      "train.global_batch=16")
    assert rc == 0 and "8 micro-batches" in out
    rc, _, err = _cli("compile", str(EXAMPLES / "tiny.dsv"), "-o", str(tmp_path / "b"),
                      "--set", "foo")
    assert rc == 2 and "expected KEY=VALUE" in err and not (tmp_path / "b").exists()
    rc, _, err = _cli("compile", str(EXAMPLES / "tiny.dsv"), "-o", str(tmp_path / "b"),
                      "--set", "parallel.pipeline=3")
    assert rc == 1 and "--set:1:1: error:" in err and not (tmp_path / "b").exists()


def test_report_compares_a_spec_with_its_override():
    rc, out, _ = _cli("report", str(V3), str(V3), "--set-b", "parallel.overlap=none")
    assert rc == 0 and "step time (simulated)" in out
    rc, _, err = _cli("report", str(V3), "--set-b", "parallel.overlap=none")
    assert rc == 2 and "--set-b" in err


def dsl_step_time(path) -> float:
    from dsvc.compiler.driver import simulate_step

    return simulate_step(dsl.load(path)).step_time_s
