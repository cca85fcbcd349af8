"""Every figure the docs quote that dsvc computes is checked against dsvc's output here.

Convention: a figure is followed by a marker naming where it comes from,
`51.5%<!-- fig: report examples/deepseek_v3.dsv | step.mfu * 100 -->`. The number
right before the marker (same line, no other digit between) must equal the
expression evaluated on the source's JSON, rounded to the decimals the doc shows.
Sources: `report SPEC` (`dsvc report --json`) and `schedule SPEC` (`dsvc inspect
--schedule --format json`), each optionally with `key=value` overrides of the spec
(`--set`'s: `parallel.overlap=none`, `decode.hidden=7000`), `even_split`,
`expert_load=FILE` or `program=eager` (`--program eager`); `json FILE` for a golden file
the tests hold to dsvc's output
(a loss curve); `kernels SPEC` for the calibrated kernel model of the spec's
GPU (`KernelModel.summary()`: constants fitted to bench/kernels_gpu.py's runs).
Expressions: numbers, dotted keys (`memory.devices[5].total`), + - * / and
parentheses. Timings (how long a command takes) are not figures dsvc
computes; the docs state them loosely and bench/ scripts measure them.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"(\d[\d,]*(?:\.\d+)?)[^\d<\n]{0,40}?<!-- fig: (.+?) \| (.+?) -->")
KEY = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*")


def markers():
    out = []
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "<!-- fig:" in line:
                found = MARKER.findall(line)
                assert len(found) == line.count("<!-- fig:"), (
                    f"{path.name}:{n}: a marker without a number right before it")
                out += [(f"{path.relative_to(ROOT)}:{n}", *m) for m in found]
    return out


@functools.cache
def source(text: str) -> dict:
    from dsvc import dsl

    kind, spec_path, *options = text.split()
    if kind == "json":
        import json

        return json.loads((ROOT / spec_path).read_text())
    if kind == "kernels":  # the calibrated kernel model of a spec's GPU (docs/simulate.md)
        from dsvc.compiler.costs.kernel_rates import KernelModel

        return KernelModel.for_gpu(dsl.load(str(ROOT / spec_path)).cluster.gpu).summary()
    even, load, program, overrides = False, None, "generated", []
    for opt in options:
        if opt == "even_split":
            even = True
        elif opt.startswith("expert_load="):
            load = str(ROOT / opt.split("=", 1)[1])
        elif opt.startswith("program="):
            program = opt.split("=", 1)[1]
        else:  # the `--set key=value` the CLI takes
            overrides.append(opt)
    spec = dsl.load(str(ROOT / spec_path), overrides)
    if kind == "report":
        from dsvc.compiler.driver import build_report
        from dsvc.compiler.report import report_json

        return report_json(build_report(spec, expert_load=load, even_split=even,
                                        program=program))
    assert kind == "schedule", kind
    from dsvc.compiler.cli.inspect_schedule import step_json
    from dsvc.compiler.driver import simulate_step

    return step_json(simulate_step(spec, expert_load=load, program=program))


def lookup(doc: dict, key: str):
    value = doc
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        value = value[int(part[1:-1])] if part.startswith("[") else value[part]
    return value


def evaluate(doc: dict, expr: str) -> float:
    names = {}

    def name_of(m):
        names[f"_k{len(names)}"] = float(lookup(doc, m.group()))
        return f"_k{len(names) - 1}"

    tree = ast.parse(KEY.sub(name_of, expr), mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load,
               ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub)
    assert all(isinstance(n, allowed) for n in ast.walk(tree)), expr
    return eval(compile(tree, "<figure>", "eval"), {"__builtins__": {}}, names)  # noqa: S307


MARKERS = markers()


@pytest.mark.parametrize("where, shown, src, expr", MARKERS, ids=[m[0] for m in MARKERS])
def test_figure(where, shown, src, expr):
    value = evaluate(source(src.strip()), expr.strip())
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    number = float(shown.replace(",", ""))
    assert abs(value - number) <= 0.5 * 10 ** -decimals * (1 + 1e-9), (
        f"{where}: the doc says {shown}, dsvc computes {value:.{decimals + 3}f} ({expr})")


def test_the_markers_cover_the_docs_figures():
    """The figures this convention was introduced for (issue 14), among others."""
    files = {m[0].split(":")[0] for m in MARKERS}
    assert {"docs/report.md", "docs/simulate.md", "docs/ir.md"} <= files
    assert len(MARKERS) >= 40


def transcripts():
    """(where, command, shown lines) of every fenced block that starts with `$ dsvc ...`."""
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if line.startswith("```") and n + 1 < len(lines) and lines[n + 1].startswith("$ dsvc "):
                body = []
                for shown in lines[n + 2:]:
                    if shown.startswith("```"):
                        break
                    body.append(shown.rstrip())
                out.append((f"{path.relative_to(ROOT)}:{n + 2}", lines[n + 1][2:], body))
    return out


TRANSCRIPTS = transcripts()


@pytest.mark.parametrize("where, command, shown", TRANSCRIPTS, ids=[t[0] for t in TRANSCRIPTS])
def test_transcript(where, command, shown, monkeypatch):
    """A command's output quoted in the docs is what it prints: every line shown, in order
    (`...` stands for lines left out)."""
    import contextlib
    import io
    import shlex

    from dsvc.compiler.cli import main

    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        main(shlex.split(command)[1:])
    printed = iter(line.rstrip() for line in out.getvalue().splitlines())
    for line in shown:
        if line.strip() in ("...", ""):
            continue
        assert any(p == line for p in printed), f"{where}: `{line}` is not in `{command}`'s output"
    assert len(TRANSCRIPTS) >= 1, "no transcript found"
