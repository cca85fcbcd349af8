"""A spec reads only the .dsv files it includes, runs no code, and names no unsafe identifier."""

from __future__ import annotations

import json
import keyword
import pathlib
import subprocess
import sys

import pytest

from dsvc import dsl

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Records, with Python's audit hooks, every file opened and every code-running event while
# one spec loads (the dsl modules are imported first, by loading another spec).
_AUDIT = """
import json, sys
from dsvc import dsl
dsl.load("examples/tiny.dsv")
events = []
watching = False
def hook(event, args):
    if watching and event in ("open", "exec", "compile", "os.system", "subprocess.Popen",
                              "os.exec", "os.posix_spawn", "import", "socket.connect"):
        events.append([event, str(args[0]) if args else ""])
sys.addaudithook(hook)
watching = True
try:
    dsl.load(sys.argv[1])
    outcome = "spec"
except dsl.SpecError as err:
    outcome = err.render()
watching = False
print(json.dumps({"outcome": outcome, "events": events}))
"""


def audited_load(path: pathlib.Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _AUDIT, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_only_named_includes_are_read(tmp_path):
    (tmp_path / "cluster.dsv").write_text((ROOT / "examples/clusters/cpu4.dsv").read_text())
    (tmp_path / "load.json").write_text("{}")
    (tmp_path / "other.dsv").write_text("model other { vocab = 1 }")
    spec = (ROOT / "examples/tiny.dsv").read_text().replace("clusters/cpu4.dsv", "cluster.dsv")
    spec = spec.replace("  expert = 2\n", '  expert = 2\n  expert_load = "load.json"\n')
    spec = spec.replace("data = synthetic", 'data = tokens("data.bin")')
    path = tmp_path / "spec.dsv"
    path.write_text(spec)
    got = audited_load(path)
    assert got["outcome"] == "spec", got["outcome"]
    opened = [pathlib.Path(arg).resolve() for event, arg in got["events"] if event == "open"]
    assert set(opened) == {path.resolve(), (tmp_path / "cluster.dsv").resolve()}
    assert not [e for e in got["events"] if e[0] != "open"], got["events"]


@pytest.mark.parametrize("include", ["/etc/passwd", "../../../../etc/shadow", "load.json",
                                     "x.dsv.py"])
def test_includes_must_be_dsv_files(tmp_path, include):
    (tmp_path / "load.json").write_text("{}")
    path = tmp_path / "spec.dsv"
    path.write_text(f'include "{include}"\n')
    got = audited_load(path)
    assert "can only include .dsv files" in got["outcome"]
    assert [e for e in got["events"] if e[0] == "open"] == [["open", str(path)]]


@pytest.mark.parametrize("value", [
    '__import__("os").system("touch PWNED")', 'system("touch PWNED")', 'eval("1")',
    'exec("import os")', '"; import os; os.system("touch PWNED")', 'open("/etc/passwd")',
])
def test_no_code_runs(tmp_path, value):
    path = tmp_path / "spec.dsv"
    path.write_text(f"model m {{\n  vocab = {value}\n}}\n")
    got = audited_load(path)
    assert got["outcome"] != "spec"
    assert [e[0] for e in got["events"]] == ["open"]
    assert not (ROOT / "PWNED").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("word", keyword.kwlist)
def test_python_keywords_are_not_names(word):
    with pytest.raises(dsl.SpecError) as info:
        dsl.loads(f"model {word} {{\n  vocab = 256\n}}\n", "k.dsv")
    assert f"'{word}' cannot be used as a name" in info.value.render()


@pytest.mark.parametrize("name", ['a"); import os', "a.b", "a-b", "é", "1abc", "a b"])
def test_non_identifiers_are_not_names(name):
    with pytest.raises(dsl.SpecError):
        dsl.loads(f"model {name} {{\n  vocab = 256\n}}\n", "k.dsv")
