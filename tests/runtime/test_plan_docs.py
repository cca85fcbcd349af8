"""docs/plan.md's field tables are generated from the plan's records (runtime/plan.py).

Each `<!-- plan-table: NAME -->` ... `<!-- end plan-table -->` block must hold exactly
`plan_tables()[NAME]`; `pytest --update-golden` rewrites the blocks. Every table is
on the page once, so a new record or field cannot go undocumented.
"""

from __future__ import annotations

import re

from dsvc.runtime.plan import plan_tables
from tests import golden
from tests.conftest import ROOT

DOC = ROOT / "docs" / "plan.md"
BLOCK = re.compile(r"(<!-- plan-table: (\S+) -->\n)(.*?)(<!-- end plan-table -->)", re.S)


def test_plan_doc_tables_are_generated_from_the_schema():
    tables = plan_tables()
    text = DOC.read_text(encoding="utf-8")
    found = [m.group(2) for m in BLOCK.finditer(text)]
    assert sorted(found) == sorted(tables), "docs/plan.md must hold each table exactly once"
    fresh = BLOCK.sub(lambda m: m.group(1) + tables[m.group(2)] + m.group(4), text)
    if golden.UPDATE:
        DOC.write_text(fresh, encoding="utf-8")
        return
    assert fresh == text, "docs/plan.md's tables are stale: rerun pytest with --update-golden"
