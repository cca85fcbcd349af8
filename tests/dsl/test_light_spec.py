"""`dsvc check` builds Specs on a pydantic-free base (dsl/records.py); it must mean the same.

A subprocess loads every example and every error case with the light base and
prints each Spec's `model_dump()` or its diagnostics; this process does the
same with the pydantic models; both must agree exactly.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from dsvc import dsl

ROOT = pathlib.Path(__file__).resolve().parents[2]
FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.dsv")) + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "tests/dsl/cases").glob("*.dsv"))

_SCRIPT = """
import json, sys
from dsvc import dsl
assert dsl.use_light_spec()
from tests.dsl.test_light_spec import outcome
print(json.dumps([outcome(f) for f in sys.argv[1:]]))
assert "pydantic" not in sys.modules
"""


def outcome(path: str) -> list:
    """What loading `path` gives, as comparable plain data."""
    try:
        spec, warnings = dsl.load_with_warnings(path)
    except dsl.SpecError as err:
        return ["error", err.render()]
    dump = spec.model_dump()
    dump.pop("spans", None)
    return ["spec", repr(dump), [w.render() for w in warnings]]


def test_light_base_agrees_with_pydantic(monkeypatch):
    from pydantic import BaseModel

    monkeypatch.chdir(ROOT)
    light = subprocess.run([sys.executable, "-c", _SCRIPT, *FILES], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert light.returncode == 0, light.stderr
    got = json.loads(light.stdout)
    assert isinstance(dsl.load("examples/tiny.dsv"), BaseModel)  # this process: pydantic
    assert len(got) == len(FILES)
    for path, lite in zip(FILES, got):
        assert lite == outcome(path), path
    assert sum(1 for g in got if g[0] == "spec") >= 3 + 10  # examples and warning-only cases


def test_light_records_are_frozen_and_coerce():
    from dsvc.dsl import records

    class Rec(records.BaseModel):
        x: float
        t: tuple[int, int] = (1, 2)
        d: dict = records.Field(default_factory=dict, exclude=True)

    r = Rec(x=1, t=[3, 4])
    assert r.x == 1.0 and isinstance(r.x, float) and r.t == (3, 4)
    assert r.model_dump() == {"x": 1.0, "t": (3, 4)}
    try:
        r.x = 2.0
    except TypeError:
        pass
    else:
        raise AssertionError("light records must be frozen")
    for bad in ({}, {"x": 1.0, "y": 2}):
        try:
            Rec(**bad)
        except TypeError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_light_records_copy_and_fields():
    from dsvc.dsl import records

    class Rec(records.BaseModel):
        a: int
        b: int = 2

    r = Rec(a=1)
    assert r.model_copy(update={"b": 5}) == Rec(a=1, b=5) and r.b == 2
    assert list(Rec.model_fields) == ["a", "b"]
