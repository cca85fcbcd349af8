"""`dsl.fmt` and `dsvc fmt`: canonical, idempotent, meaning-preserving, comments kept, atomic."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsvc import dsl
from dsvc.compiler.cli import main
from dsvc.dsl import ast, parser
from dsvc.dsl.diagnostics import SpecError
from dsvc.dsl.formatter import format_source
from dsvc.dsl.spec import as_dict
from tests.dsl import spec_gen

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/**/*.dsv"))
CASES = sorted(ROOT.glob("tests/dsl/cases/**/*.dsv"))


def shape(text: str) -> str:
    """The tree without positions."""
    return re.sub(r" @\d+:\d+", "", ast.dump(parser.parse(text, "f").items))


def comments(text: str) -> list[str]:
    return sorted(c.text.rstrip() for c in parser.parse(text, "f").comments)


def assert_faithful(text: str) -> str:
    out = format_source(text, "f")
    assert format_source(out, "f") == out, "not idempotent"
    assert shape(out) == shape(text), "meaning changed"
    assert comments(out) == comments(text), "comments lost or changed"
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_canonical(path):
    text = path.read_text()
    assert format_source(text, str(path)) == text, f"run `dsvc fmt {path}`"


@pytest.mark.parametrize("path", EXAMPLES + CASES, ids=[p.name for p in EXAMPLES + CASES])
def test_faithful_on_every_spec_file(path):
    try:
        text = parser.decode_source(str(path), path.read_bytes())
        parser.parse(text, "f")
    except SpecError:
        return  # the syntax-error cases
    assert_faithful(text)


def _spec_dump(spec) -> dict:
    d = as_dict(spec)
    for key in ("file", "content_hash", "spans"):
        d.pop(key, None)
    return d


@pytest.mark.parametrize("path", sorted(ROOT.glob("examples/*.dsv")), ids=lambda p: p.name)
def test_round_trip_gives_an_equal_spec(path):
    squashed = re.sub(r"\n\s*", "\n", path.read_text())  # no indentation at all
    spec = dsl.loads(squashed, filename=str(path))
    again = dsl.loads(format_source(squashed, str(path)), filename=str(path))
    assert _spec_dump(again) == _spec_dump(spec) == _spec_dump(dsl.load(path))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.booleans())
def test_faithful_on_generated_text(rnd, mutated):
    text = spec_gen.spec(rnd)
    if mutated:
        text = spec_gen.mutate(rnd, text)
    try:
        parser.parse(text, "f")
    except SpecError:
        return
    assert_faithful(text)


def test_layout_rules():
    src = """# header

include "a.dsv"
include "b.dsv"
const N = 2*(3+4)
model m {


  vocab=129_280,hidden = 7168   # trailing
  # own line, before rope

  rope = yarn(theta=1e4, factor = 40)
  mtp {depth = 1, loss_weight = 0.3}
  nvlink { domain = 8, bandwidth = 400 GB/s, effective = 160 GB/s, latency = 3.33 us }
  norm = rmsnorm(
    # inside a call
    eps = 1e-6)
  gpu = h800 { bf16 = 989 TFLOPS }
  layers { 0..N = block(a, b) }
  x = "q\\"uote"
  # before the closing brace
}
"""
    expected = """# header

include "a.dsv"
include "b.dsv"

const N = 2 * (3 + 4)

model m {
  vocab = 129_280
  hidden = 7168  # trailing
  # own line, before rope

  rope = yarn(theta = 1e4, factor = 40)
  mtp { depth = 1, loss_weight = 0.3 }
  nvlink {
    domain = 8
    bandwidth = 400 GB/s
    effective = 160 GB/s
    latency = 3.33 us
  }
  # inside a call
  norm = rmsnorm(eps = 1e-6)
  gpu = h800 { bf16 = 989 TFLOPS }
  layers {
    0..N = block(a, b)
  }
  x = "q\\"uote"
  # before the closing brace
}
"""
    assert assert_faithful(src) == expected


def test_long_typed_block_and_aligned_comments():
    src = ("p {\n  linear = fp8_e4m3 { act = tile(1, 128), weight = block(128, 128), "
           "accumulate = fp32, promote_every = 128 }\n  a = 1  # one\n  bb = 22 # two\n}\n")
    out = assert_faithful(src)
    assert "  linear = fp8_e4m3 {\n    act = tile(1, 128)\n" in out
    assert "  a = 1    # one\n  bb = 22  # two\n" in out
    assert all(len(line) <= 100 for line in out.splitlines())


@pytest.mark.parametrize("expr_text", ["a - (b - c)", "(a - b) - c", "-(a + b)", "(1 + 2) GB",
                                       "--1", "2 * -3", "(a // b) % c", "a * (b + c)", "(-1) s"])
def test_parentheses_kept_where_needed(expr_text):
    out = assert_faithful(f"model m {{ x = {expr_text} }}\n")
    assert expr_text.replace("(a - b) - c", "a - b - c").replace("(a // b) % c", "a // b % c") \
        in out


# ----------------------------------------------------------------------------- the command


def run_fmt(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["fmt", *args])
    return code, out.getvalue() + err.getvalue()


UGLY = "model m {\nvocab=256, hidden=128 }\n"


def test_check_names_files_and_writes_nothing(tmp_path):
    ugly, good = tmp_path / "ugly.dsv", tmp_path / "good.dsv"
    ugly.write_text(UGLY)
    good.write_text(format_source(UGLY))
    before = ugly.stat().st_mtime_ns
    code, text = run_fmt("--check", str(ugly), str(good))
    assert code == 1
    assert f"would reformat {ugly}" in text and str(good) not in text.replace("2 files", "")
    assert ugly.read_text() == UGLY and ugly.stat().st_mtime_ns == before
    assert run_fmt("--check", str(good))[0] == 0


def test_rewrites_changed_files_only_and_atomically(tmp_path):
    ugly, good = tmp_path / "ugly.dsv", tmp_path / "good.dsv"
    ugly.write_text(UGLY)
    ugly.chmod(0o640)
    good.write_text(format_source(UGLY))
    good_inode = good.stat().st_ino
    good_mtime = good.stat().st_mtime_ns
    code, text = run_fmt(str(ugly), str(good))
    assert code == 0 and f"reformatted {ugly}" in text
    assert ugly.read_text() == format_source(UGLY)
    assert ugly.stat().st_mode & 0o777 == 0o640  # permissions kept across the rename
    assert good.stat().st_ino == good_inode and good.stat().st_mtime_ns == good_mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.dsv", "ugly.dsv"]  # no temp files


def test_syntax_error_changes_nothing(tmp_path):
    bad = tmp_path / "bad.dsv"
    bad.write_text("model m {\n  vocab = \n")
    code, text = run_fmt(str(bad))
    assert code == 1 and "unexpected end of file" in text and "Traceback" not in text
    assert bad.read_text() == "model m {\n  vocab = \n"


def test_missing_file_and_directory(tmp_path):
    code, text = run_fmt(str(tmp_path / "nope.dsv"), str(tmp_path))
    assert code == 1 and "file not found" in text and "is a directory" in text


def test_unwritable_directory_reports_and_keeps_the_file(tmp_path):  # as a normal user
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ugly = tmp_path / "ugly.dsv"
    ugly.write_text(UGLY)
    tmp_path.chmod(0o500)
    try:
        code, text = run_fmt(str(ugly))
    finally:
        tmp_path.chmod(0o700)
    assert code == 1 and "cannot write" in text and ugly.read_text() == UGLY


def test_failed_rename_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    ugly = tmp_path / "ugly.dsv"
    ugly.write_text(UGLY)

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    code, text = run_fmt(str(ugly))
    assert code == 1 and "cannot write" in text and "No space left" in text
    assert ugly.read_text() == UGLY
    assert [p.name for p in tmp_path.iterdir()] == ["ugly.dsv"]


@pytest.mark.parametrize("src, kept", [
    ("m {\n  x = 1.5, B = 2\n}\n", "  x = 1.5,\n  B = 2\n"),  # B would be read as a unit
    ("m {\n  x = a, -1 = y\n}\n", "  x = a,\n  -1 = y\n"),  # a subtraction
    ("m {\n  x = f, (1, 2)..3 = y\n}\n", "  x = f,\n  (1, 2)..3 = y\n"),  # a call
    ("m {\n  x = 1, y = 2\n}\n", "  x = 1\n  y = 2\n"),  # an ordinary comma goes
])
def test_commas_kept_only_where_they_separate(src, kept):
    assert kept in assert_faithful(src)


def test_large_file_formats_quickly():
    import time

    body = "".join(f"  key{i} = {i}  # comment {i}\n\n" for i in range(20_000))
    src = f"model m {{\n{body}}}\n"
    start = time.perf_counter()
    out = format_source(src)
    assert time.perf_counter() - start < 10  # linear, not quadratic, in the comments
    assert out.count("# comment") == 20_000
