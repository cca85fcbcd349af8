"""`dsvc compile`: the build directory, golden train.py, determinism, refusals.

What must hold (issue 9): every file of a build is rendered before any is
written; compiling twice gives the same bytes; the generated Python parses and
is left unchanged by the project's formatter; user text never reaches generated
code unescaped; `-o` never replaces a directory that is not a dsvc build; the
`dsvc train` cache notices a changed spec, toolchain or build file.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from dsvc import dsl
from dsvc.compiler.cli import main as dsvc
from dsvc.compiler.codegen import build as build_mod
from dsvc.dsl.diagnostics import SpecError
from tests.golden import check_golden

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "tiny.dsv"
W1 = ROOT / "tests" / "train_specs" / "w1.dsv"
GENERATED = ("train.py", "kernels/fp8_kernels.py", "program.py")


@pytest.fixture(scope="module")
def tiny_files():
    return build_mod.render_files(dsl.load(str(TINY)))


def test_readme_launches_per_node_and_on_one_machine(tiny_files):
    """The tiny example's 4 one-"GPU" nodes: the per-node command with its placeholders
    explained, and the one-machine form `dsvc train` uses."""
    readme = tiny_files["README.md"].decode()
    assert ("torchrun --nnodes 4 --nproc-per-node 1 --node-rank <i> --rdzv-backend static "
            "--rdzv-endpoint <HOST:PORT> train.py --run-dir run") in readme
    assert "- `<i>`: this node's number, 0 to 3" in readme and "- `<HOST:PORT>`:" in readme
    assert "torchrun --standalone --nproc-per-node 4 train.py --run-dir run" in readme


def test_golden_train(tiny_files):
    assert "model.py" not in tiny_files  # the runtime's modules run; nothing repeats them
    check_golden("build/tiny_train.py.txt", tiny_files["train.py"].decode())


def test_golden_program(tiny_files):
    """The generated stage program: both block kinds of the tiny model, from its graph."""
    check_golden("build/tiny_program.py.txt", tiny_files["program.py"].decode())


def test_kernel_module_carries_the_graphs_fused_kernels(tiny_files):
    text = tiny_files["kernels/fp8_kernels.py"].decode()
    for kernel in ("_rmsnorm_quant_kernel", "_mla_rope_qkv_bwd_kernel", "_router_topk_kernel",
                   "_moe_combine_kernel", "_swiglu_bwd_quant_kernel", "_quant_bhsd_kernel"):
        assert f"def {kernel}(" in text, kernel
    assert "def _gqa_rope_kernel(" not in text  # no GQA block in the tiny model


@pytest.mark.parametrize("name", GENERATED)
def test_generated_python_parses_and_is_formatted(tiny_files, name, tmp_path):
    text = tiny_files[name].decode()
    ast.parse(text)
    path = tmp_path / pathlib.Path(name).name
    path.write_text(text)
    proc = subprocess.run(  # noqa: PLW1510 - the exit code is the test
        [
            sys.executable,
            "-m",
            "ruff",
            "format",
            "--check",
            "--config",
            str(ROOT / "pyproject.toml"),
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"ruff format would change {name}:\n{proc.stdout}{proc.stderr}"


def test_provenance_headers(tiny_files):
    train = tiny_files["train.py"].decode().splitlines()
    assert train[0] == "# generated: do not edit"
    # the block the file came from (header to last field), not only its first line
    assert train[1] == "# source: tiny.dsv lines 69-78"
    for name in GENERATED:
        head = tiny_files[name].decode().splitlines()[:6]
        assert any(line.startswith("# content hash: sha256:") for line in head), name


def test_compile_is_deterministic(tiny_files):
    again = build_mod.render_files(dsl.load(str(TINY)))
    assert sorted(again) == sorted(tiny_files)
    differ = [name for name in again if again[name] != tiny_files[name]]
    assert differ == []


def test_build_directory_contents(tmp_path):
    out = tmp_path / "b"
    assert dsvc(["compile", str(W1), "-o", str(out)]) == 0
    for name in (
        "plan.json",
        "train.py",
        "README.md",
        "report.md",
        "schedule.png",
        "kernels/fp8_kernels.py",
        "program.py",
        "dsvc_runtime/loop.py",
        build_mod.BUILD_MARKER,
    ):
        assert (out / name).is_file(), name
    runtime_src = ROOT / "runtime"
    for path in runtime_src.glob("*.py"):
        assert (out / "dsvc_runtime" / path.name).read_bytes() == path.read_bytes(), path.name
    marker = json.loads((out / build_mod.BUILD_MARKER).read_text())
    for rel, digest in marker["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel
    readme = (out / "README.md").read_text()
    assert "torchrun --standalone --nproc-per-node 1 train.py --run-dir run" in readme
    assert "--nnodes" not in readme  # one node: no per-node command
    assert (out / "schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_refuses_a_directory_that_is_not_a_build(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert dsvc(["compile", str(W1), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a dsvc build" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "precious"
    afile = tmp_path / "file"
    afile.write_text("x")
    assert dsvc(["compile", str(W1), "-o", str(afile)]) == 2
    assert afile.read_text() == "x"


def test_recompile_keeps_every_user_file_and_matches_a_fresh_build(tmp_path, capsys):
    out, fresh = tmp_path / "b", tmp_path / "fresh"
    assert dsvc(["compile", str(W1), "-o", str(out)]) == 0
    mine = {"notes.txt": b"precious\n", "mydata/a.bin": bytes(range(256)),
            "mydata/deep/b.txt": b"b", "kernels/mine.py": b"# my kernel\n"}
    for rel, data in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    (out / "train.py").write_text("edited\n")  # a generated file: dsvc's to replace
    capsys.readouterr()
    assert dsvc(["compile", str(W1), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "left alone" in err and "kernels/mine.py, mydata/, notes.txt" in err
    assert "replaced train.py" in err
    for rel, data in mine.items():  # byte for byte
        assert (out / rel).read_bytes() == data, rel
    assert dsvc(["compile", str(W1), "-o", str(fresh)]) == 0
    built = {p.relative_to(fresh).as_posix(): p.read_bytes() for p in fresh.rglob("*")
             if p.is_file()}
    assert {rel: (out / rel).read_bytes() for rel in built} == built  # the build itself
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["b", "fresh"]  # no temporary or old directory beside it
    assert not [p for p in out.rglob("*.tmp")]


def test_build_directories_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert dsvc(["compile", str(W1), "-o", str(tmp_path / "b")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "b" / "kernels").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "b" / "plan.json").stat().st_mode & 0o777 == 0o644


def test_recompile_refuses_to_overwrite_what_dsvc_did_not_write(tmp_path, capsys):
    out = tmp_path / "b"
    assert dsvc(["compile", str(W1), "-o", str(out)]) == 0
    marker = json.loads((out / build_mod.BUILD_MARKER).read_text())
    del marker["files"]["README.md"]  # as if an older dsvc had not written it
    (out / build_mod.BUILD_MARKER).write_text(json.dumps(marker))
    (out / "README.md").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert dsvc(["compile", str(W1), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'README.md' exists but dsvc did not write it" in err and len(err.splitlines()) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a manifest naming a path outside the directory is refused, nothing deleted
    (tmp_path / "victim.txt").write_text("x")
    marker["files"]["../victim.txt"] = "0" * 64
    (out / build_mod.BUILD_MARKER).write_text(json.dumps(marker))
    assert dsvc(["compile", str(W1), "-o", str(out)]) == 2
    assert (tmp_path / "victim.txt").read_text() == "x"


def _spec_copy(tmp_path, name: str, edit=lambda text: text) -> pathlib.Path:
    """w1.dsv and small.dsv copied into tmp_path, the main file under `name`."""
    src = W1.parent
    shutil.copy(src / "small.dsv", tmp_path / "small.dsv")
    path = tmp_path / name
    path.write_text(edit((src / "w1.dsv").read_text()))
    return path


def test_spec_file_name_cannot_inject_code(tmp_path):
    evil = 'x\nimport os; os.system("echo PWNED")\n#.dsv'
    spec = _spec_copy(tmp_path, evil)
    files = build_mod.render_files(dsl.load(str(spec)))
    for name in GENERATED:
        text = files[name].decode()
        tree = ast.parse(text)
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "system"]
        assert calls == [], f"{name}: the spec's file name became code"
        assert "\\nimport os" in text or name == "kernels/fp8_kernels.py"  # escaped, kept


def test_token_path_reaches_only_plan_json(tmp_path):
    path = 'data/a"); import os; #\n.bin'
    spec = _spec_copy(tmp_path, "w1.dsv", lambda t: t)
    small = (tmp_path / "small.dsv").read_text()
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    small = small.replace("data = synthetic", f'data = tokens("{escaped}", dtype = uint16)')
    (tmp_path / "small.dsv").write_text(small)
    loaded = dsl.load(str(spec))
    assert loaded.train.data.path == path
    files = build_mod.render_files(loaded)
    assert json.loads(files["plan.json"])["train"]["data"]["path"] == path
    for name in GENERATED:
        assert b"import os; #" not in files[name], name


@pytest.mark.parametrize("bad", ["class", "None", "x-y", "naïve", "import"])
def test_names_that_are_not_identifiers_are_refused_before_any_file(tmp_path, bad):
    spec = dsl.load(str(W1))
    # the parser refuses these already; build.py must refuse them on its own too
    evil = dataclasses.replace(spec, model=dataclasses.replace(spec.model, name=bad))
    out = tmp_path / "b"
    with pytest.raises(SpecError, match="cannot become a Python identifier"):
        build_mod.build(evil, str(out))
    assert not out.exists()


def test_keyword_model_name_is_a_spec_error_through_the_cli(tmp_path, capsys):
    spec = _spec_copy(tmp_path, "w1.dsv")
    small = tmp_path / "small.dsv"
    small.write_text(small.read_text().replace("model small {", "model lambda {"))
    out = tmp_path / "b"
    assert dsvc(["compile", str(spec), "-o", str(out)]) == 1
    assert "'lambda' cannot be used as a name" in capsys.readouterr().err
    assert not out.exists()


def test_build_cache_notices_changes(tmp_path, monkeypatch):
    spec = dsl.load(str(W1))
    out = tmp_path / "b"
    assert build_mod.build_cached(spec, str(out)) is not None  # compiled
    assert build_mod.build_cached(spec, str(out)) is None  # cached
    (out / "train.py").write_text("edited\n")
    assert build_mod.build_cached(spec, str(out)) is not None  # an edited file: rebuilt
    assert (out / "train.py").read_text() != "edited\n"
    monkeypatch.setattr(build_mod, "toolchain_hash", lambda: "another dsvc")
    assert build_mod.build_cached(spec, str(out)) is not None  # another toolchain: rebuilt
    other = dataclasses.replace(spec, content_hash="0" * 64)
    assert not build_mod.is_current_build(str(out), other.content_hash)


def test_a_compile_runs_the_pass_list_once(monkeypatch):
    """`dsvc compile` is one run of driver.PASSES, lower to emit_build, each pass once; the
    build's schedule.png is drawn from that run's simulated step, and its report.md is the
    report of that same graph (no pass runs again)."""
    from dsvc.compiler import driver
    from dsvc.compiler.codegen import emit_build

    calls: dict[str, int] = {}
    for p in driver.PASSES:
        name = p.run.__code__.co_names[0]  # the pass function each runner calls
        real = getattr(driver, name)

        def counted(*args, _real=real, _name=p.name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(driver, name, counted)
    drawn = []
    real_draw = emit_build.draw_timeline
    monkeypatch.setattr(emit_build, "draw_timeline",
                        lambda sim, path, **kw: (drawn.append(sim), real_draw(sim, path, **kw)))
    real_report = emit_build.report_of
    reported = []
    monkeypatch.setattr(emit_build, "report_of",
                        lambda spec, graph: (reported.append(graph), real_report(spec, graph))[1])
    files = build_mod.render_files(dsl.load(str(TINY)))
    assert calls == {p.name: 1 for p in driver.PASSES}
    assert len(drawn) == 1 and drawn[0].timeline  # the simulated step, with its timeline
    assert reported[0].simulation.sim is drawn[0]
    plan = json.loads(files["plan.json"])
    assert plan["source"]["passes"] == [p.name for p in driver.PASSES][:-1]  # up to emit_plan
    assert "# passes: " + ", ".join(p.name for p in driver.PASSES) in files["train.py"].decode()
