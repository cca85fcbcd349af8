"""`dsvc schedule`: formats, the documented JSON keys, goldens, and usage errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from dsvc.compiler.cli import main
from dsvc.compiler.schedules import build_schedule, published_bubble
from tests.golden import check_golden

KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@pytest.mark.parametrize("kind", KINDS)
def test_text_golden(kind, capsys):
    assert main(["schedule", "--kind", kind, "--stages", "4", "--micro-batches", "8"]) == 0
    check_golden(f"schedules/{kind}_pp4_mb8.txt", capsys.readouterr().out)


@pytest.mark.parametrize("kind", KINDS)
def test_json_keys_and_values(kind, capsys):
    args = ["schedule", "--kind", kind, "--stages", "8", "--micro-batches", "16"]
    args += ["--f", "2", "--b", "3", "--w", "1", "--fb", "4", "--format", "json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    devices = 4 if kind == "dualpipev" else 8
    for key in ("bubble", "makespan", "activations_in_flight", "actions"):
        assert key in doc
    assert len(doc["bubble"]) == len(doc["activations_in_flight"]) == len(doc["actions"]) == devices
    assert max(doc["bubble"]) == published_bubble(kind, 8, 2, 3, 1, 4)
    assert doc["published"]["bubble_matches"] is True
    assert max(doc["activations_in_flight"]) == (8 if kind in ("1f1b", "zb1p") else 9)
    expected = build_schedule(kind, 8, 16)
    assert doc["actions"] == [[str(a) for a in acts] for acts in expected.actions]
    assert doc["costs"] == {"f": 2, "b": 3, "w": 1, "fb": 4}


def test_png_and_chrome_files(tmp_path, capsys):
    png, trace = tmp_path / "s.png", tmp_path / "s.json"
    base = ["schedule", "--kind", "dualpipev", "--stages", "4", "--micro-batches", "6"]
    assert main([*base, "--format", "png", "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main([*base, "--format", "chrome", "-o", str(trace)]) == 0
    assert json.loads(trace.read_text())["traceEvents"]
    assert "wrote" in capsys.readouterr().out


def test_fractional_times_stay_exact(capsys):
    args = ["schedule", "--kind", "dualpipe", "--stages", "4", "--micro-batches", "8"]
    assert main([*args, "--f", "1/3", "--b", "2/3", "--w", "1/3", "--fb", "5/6"]) == 0
    out = capsys.readouterr().out
    assert "(exact)" in out


@pytest.mark.parametrize(
    "args,words",
    [
        (
            ["--kind", "dualpipe", "--stages", "5", "--micro-batches", "10"],
            ["even number of stages", "hint:"],
        ),
        (
            ["--kind", "dualpipe", "--stages", "4", "--micro-batches", "6"],
            ["at least 2 x PP = 8", "hint:"],
        ),
        (["--kind", "dualpipev", "--stages", "8", "--micro-batches", "4"], ["at least PP = 8"]),
        (["--kind", "zb1p", "--stages", "4", "--micro-batches", "8", "--w", "5"], ["W <= B"]),
        (
            ["--kind", "1f1b", "--stages", "4", "--micro-batches", "8", "--format", "png"],
            ["needs -o"],
        ),
        (["--kind", "1f1b", "--stages", "4", "--micro-batches", "8", "--f", "-1"], ["negative"]),
        (["--kind", "gpipe", "--stages", "4", "--micro-batches", "8"], ["invalid choice"]),
        (["--kind", "1f1b", "--micro-batches", "8"], ["--stages"]),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(args, words, capsys):
    assert main(["schedule", *args]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert "Traceback" not in err


def test_cli_kinds_are_the_generator_kinds():
    from dsvc.compiler.cli.cmd_schedule import KIND_CHOICES
    from dsvc.compiler.schedules import KINDS as GENERATED

    assert KIND_CHOICES == GENERATED
