"""Import names live under `dsvc` (pyproject.toml maps the top-level folders there).

An installed dsvc must add no generic top-level module (`dsl`, `compiler`, `runtime`) to a
user's environment, every module of the tree must import its siblings by those names (or,
inside the runtime, relatively: a build directory carries it as `dsvc_runtime`), and the
package list in pyproject.toml must name every package folder.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"dsl": "dsvc.dsl", "compiler": "dsvc.compiler", "runtime": "dsvc.runtime"}


def test_only_dsvc_is_importable_outside_the_tree(tmp_path):
    code = (
        "import importlib.util, dsvc.dsl, dsvc.compiler.cli, dsvc.runtime.plan\n"
        "print(sorted(n for n in ('dsl', 'compiler', 'runtime') if importlib.util.find_spec(n)))\n"
        "print(dsvc.__version__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    found, version = proc.stdout.splitlines()
    assert found == "[]", f"generic top-level modules importable: {found}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    failing = subprocess.run([sys.executable, "-c", "import compiler"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60, check=False)
    assert failing.returncode == 1 and "No module named 'compiler'" in failing.stderr


def _python_files():
    for folder in ("dsvc", *FOLDERS, "tests", "bench"):
        yield from sorted((ROOT / folder).rglob("*.py"))
    yield from sorted((ROOT / "compiler" / "codegen" / "templates").glob("*.jinja"))


BARE = re.compile(r"^\s*(?:from|import)\s+(dsl|compiler|runtime)\b", re.M)
ABSOLUTE_SELF = re.compile(r"^\s*(?:from|import)\s+dsvc\.runtime\b", re.M)


def test_no_module_imports_a_bare_folder_name():
    bad = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in _python_files()
           for m in BARE.finditer(p.read_text(encoding="utf-8"))]
    assert not bad, bad


def test_the_runtime_imports_itself_relatively():
    """A build directory carries the runtime as `dsvc_runtime/`: an absolute `dsvc.runtime`
    import inside it would reach for an installed dsvc, or fail where there is none."""
    bad = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "runtime").rglob("*.py"))
           if ABSOLUTE_SELF.search(p.read_text(encoding="utf-8"))]
    assert not bad, bad


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    on_disk = {"dsvc"}
    for folder, name in FOLDERS.items():
        assert setup["package-dir"][name] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((name, *rel)))
    assert on_disk <= listed, sorted(on_disk - listed)
