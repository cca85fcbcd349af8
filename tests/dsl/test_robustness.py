"""Whatever the input, `dsvc check` answers with diagnostics and an exit code, never a traceback."""

from __future__ import annotations

import contextlib
import io
import pathlib
import random
import shutil
import subprocess
import sys
import time

import pytest

from dsvc import dsl
from dsvc.compiler.cli import main
from dsvc.dsl.spec import as_dict
from tests.dsl.helpers import assert_valid_diagnostics

ROOT = pathlib.Path(__file__).resolve().parents[2]


def bad_inputs(tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    """name -> path of a file (or not-a-file) that is not a valid spec."""
    shutil.copytree(ROOT / "examples", tmp / "examples")
    made = {
        "empty": b"",
        "whitespace": b"\n\n   \t\n",
        "binary_junk": bytes(range(256)) * 8,
        "random_bytes": random.Random(0).randbytes(4096),
        "nul_byte": b"model m {\x00}\n",
        "ten_mb_of_nesting": b"(" * 10_000_000,
        "deep_parens_under_the_size_limit": b"model m { x = " + b"(" * 1_900_000 + b" }",
        "deep_braces": b"model m {" + b" a {" * 200_000,
        "long_expression": b"const X = " + b"1 + " * 400_000 + b"1\n",
        "long_minus_chain": b"const X = " + b"-" * 1_000_000 + b"1\n",
        "one_huge_line": b"model m { x = " + b"a" * 1_900_000 + b" }",
        "only_comments": b"# nothing here\n# at all\n",
        "bom_and_garbage": b"\xef\xbb\xbf}}}}",
    }
    out = {}
    for name, data in made.items():
        p = tmp / f"{name}.dsv"
        p.write_bytes(data)
        out[name] = p
    for ex in ("deepseek_v3", "tiny"):  # truncated files, includes still resolvable
        data = (tmp / "examples" / f"{ex}.dsv").read_bytes()
        for frac in (0.3, 0.7):
            p = tmp / "examples" / f"{ex}_truncated_{int(frac * 100)}.dsv"
            p.write_bytes(data[: int(len(data) * frac)])
            out[p.stem] = p
    out["directory"] = tmp / "examples"
    out["missing"] = tmp / "no_such_file.dsv"
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return bad_inputs(tmp_path_factory.mktemp("bad"))


def test_every_bad_input_is_a_diagnostic(inputs):
    for name, path in inputs.items():
        start = time.perf_counter()
        with pytest.raises(dsl.SpecError) as info:
            dsl.load(path)
        assert time.perf_counter() - start < 5, f"{name} took too long"
        texts = {}
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
        assert_valid_diagnostics(info.value, texts)


def test_cli_exit_1_and_no_traceback(inputs):
    for name, path in inputs.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["check", str(path)])
        assert code == 1, name
        assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue(), name
        assert ": error: " in err.getvalue() or "error:" in err.getvalue(), name


def test_crlf_and_tabs_are_fine(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    path = tmp_path / "examples" / "tiny.dsv"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n").replace(b"  ", b"\t"))
    a, b = as_dict(dsl.load(path)), as_dict(dsl.load(ROOT / "examples/tiny.dsv"))
    for d in (a, b):
        for key in ("file", "files", "content_hash"):
            d.pop(key)
    assert a == b


def dsvc() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "dsvc"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dsvc.compiler.cli"]


def test_real_subprocess(inputs):
    cmd = dsvc() + ["check", str(inputs["binary_junk"]), str(inputs["directory"]),
                    str(inputs["missing"]), "examples/tiny.dsv"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "not UTF-8 text" in proc.stderr and "is a directory" in proc.stderr
    assert "file not found" in proc.stderr
    assert "examples/tiny.dsv: ok (model tiny: 4 layers)" in proc.stdout


@pytest.mark.parametrize("argv, code", [
    (["check", "examples/tiny.dsv"], 0),
    (["check", "-q", "examples/deepseek_v3.dsv", "examples/deepseek_v2_lite.dsv"], 0),
    (["check", "tests/dsl/cases/moe_top_k.dsv"], 1),
    (["check", "--werror", "tests/dsl/cases/mtp_weight.dsv"], 1),
    (["check"], 2),
    (["check", "--no-such-flag", "examples/tiny.dsv"], 2),
    (["fmt"], 2),
    (["import-hf"], 2),
    ([], 2),
])
def test_exit_codes(argv, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == code
    assert "Traceback" not in err.getvalue()


def test_check_imports_nothing_heavy():
    code = ("import sys\nfrom dsvc.compiler.cli import main\n"
            "rc = main(['check', '-q', 'examples/deepseek_v3.dsv'])\n"
            "heavy = {'torch', 'sympy', 'pydantic', 'lark', 'numpy', 'networkx', 'jinja2'}\n"
            "print(rc, sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == "0 []", proc.stdout + proc.stderr


def test_thousands_of_errors_stay_fast_and_short(tmp_path):
    path = tmp_path / "many.dsv"
    path.write_text("model m {\n" + "".join(f"  key{i} = {i}\n" for i in range(5000)) + "}\n")
    start = time.perf_counter()
    with pytest.raises(dsl.SpecError) as info:
        dsl.load(path)
    text = info.value.render()
    assert time.perf_counter() - start < 10
    assert len(info.value.diagnostics) > 5000
    assert text.count(": error: ") == 200 and "more problems not shown" in text
