"""docs/language.md documents every key of every block, every rule and every unit."""

from __future__ import annotations

import pathlib

import pytest

from dsvc.dsl import blocks, blocks_run
from dsvc.dsl.checks import CODES
from dsvc.dsl.units import UNITS

DOC = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "language.md").read_text()
TABLES = {f"{m.__name__}.{n}": getattr(m, n) for m in (blocks, blocks_run) for n in dir(m)
          if n.endswith("_KEYS")}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_key_is_documented(table):
    missing = [k for k in TABLES[table] if f"`{k}`" not in DOC and f"| `{k}` |" not in DOC]
    assert not missing, f"{table}: undocumented keys {missing}"


def test_every_rule_is_documented():
    assert not [r for r in CODES if f"`{r}`" not in DOC]


def test_every_unit_is_documented():
    words = DOC.replace("`", " ").replace("|", " ").replace(",", " ").split()
    assert not [u for u in UNITS if u not in words and u not in ("KiB/s", "MiB/s", "GiB/s",
                                                                "TiB/s", "PiB/s", "KB/s",
                                                                "MB/s", "GB/s", "TB/s")]
