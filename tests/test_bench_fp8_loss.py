"""bench/fp8_loss_gpu.py's own machinery, on a CPU: the natural-text token file it builds,
the plan it trains, and its three runs end to end at a size a test can afford."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsvc.compiler.tokenizer import BYTE_EOS
from tests.bench_scripts import load_bench
from tests.tolerances import tol


def test_stdlib_tokens_are_text_bytes_with_document_ends(tmp_path):
    bench = load_bench("fp8_loss_gpu")
    path = tmp_path / "t.bin"
    assert bench.stdlib_tokens(str(path), 200_000) == 200_000
    ids = np.fromfile(path, dtype=np.uint16)
    assert ids.size == 200_000 and ids.max() == BYTE_EOS  # documents end in the EOS id
    text = bytes(int(i) for i in ids[:4000] if i < 256).decode("utf-8", errors="strict")
    assert "def " in text or "import " in text  # Python sources, as text


def test_the_plan_reads_the_text_and_stretches_its_schedule():
    bench = load_bench("fp8_loss_gpu")
    raw = {"model": {"vocab": 320}, "train": {
        "data": {"kind": "synthetic"},
        "lr_schedule": {"kind": "warmup_cosine", "warmup_steps": 5, "total_steps": 20}}}
    r = bench.with_text(raw, "x.bin", 30)
    assert r["train"]["data"] == {"kind": "tokens", "path": os.path.abspath("x.bin"),
                                  "dtype": "uint16"}
    assert r["train"]["lr_schedule"] == {"kind": "warmup_cosine", "warmup_steps": 3,
                                         "total_steps": 30}
    assert raw["train"]["data"] == {"kind": "synthetic"}  # the input is left alone


def test_cpu_smoke_runs_the_three_trainings(tmp_path, capsys):
    import importlib.util
    import sys

    bench = load_bench("fp8_loss_gpu")
    out = tmp_path / "r.json"
    path_before = list(sys.path)
    assert bench.main(["--cpu-smoke", "--json", str(out)]) == 0
    # the build's runtime was imported without its folder on sys.path (whose kernels/
    # would shadow any `kernels` package for the rest of the process)
    assert sys.path == path_before and "dsvc-fp8loss" in sys.modules["dsvc_runtime"].__file__
    found = importlib.util.find_spec("kernels")
    assert found is None or "dsvc-fp8loss" not in str(found.origin)
    rec = json.loads(out.read_text())
    runs = {r["run"]: r for r in rec["results"]}
    assert list(runs) == ["fp8", "bf16", "bf16-other"]
    assert runs["fp8"]["blocks"].endswith("blocks generated")  # the generated program ran
    # same initial weights and batches: FP8 and BF16 start within FP8's rounding; the other
    # data order starts elsewhere
    first = {k: r["curve"][0] for k, r in runs.items()}
    rtol = tol("fp8_vs_bf16_first_loss")[0]
    assert abs(first["fp8"] / first["bf16"] - 1) < rtol < abs(first["bf16-other"] / first["bf16"] - 1)
    assert rec["gap"] == runs["fp8"]["held_out"] / runs["bf16"]["held_out"] - 1
    assert "noise floor" in capsys.readouterr().out


def test_cpu_mode_trains_the_program_beside_the_eager_modules(tmp_path, capsys):
    # --cpu: FP8 through the kernels' torch references on the CPU spec, the generated
    # program against the eager modules (same weights and batches: they start within FP8
    # rounding of each other), the seed recorded
    bench = load_bench("fp8_loss_gpu")
    out = tmp_path / "r.json"
    argv = ["--cpu", "--steps", "1", "--eval-batches", "1", "--runs", "fp8,fp8-eager",
            "--seed", "3", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    rec = json.loads(out.read_text())
    runs = {r["run"]: r for r in rec["results"]}
    assert list(runs) == ["fp8", "fp8-eager"] and rec["seed"] == 3
    assert runs["fp8"]["blocks"].endswith("blocks generated") and runs["fp8-eager"]["blocks"] == ""
    rtol = tol("fp8_vs_bf16_first_loss")[0]
    assert abs(runs["fp8"]["curve"][0] / runs["fp8-eager"]["curve"][0] - 1) < rtol
    assert rec["program_vs_eager"] == runs["fp8"]["held_out"] / runs["fp8-eager"]["held_out"] - 1
    assert rec["gap"] is None  # no bf16 run, no claim
    assert "generated program) / fp8-eager" in capsys.readouterr().out


def test_runs_must_be_known():
    bench = load_bench("fp8_loss_gpu")
    with pytest.raises(SystemExit):
        bench.parse_args(["--runs", "fp8,fp16"])
