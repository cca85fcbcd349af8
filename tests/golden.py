"""Golden-file comparison: `check_golden("dsl/errors/foo.txt", text)`.

Run pytest with `--update-golden` to (re)write goldens; a missing golden fails
with a hint saying so.
"""

from __future__ import annotations

import difflib
import pathlib

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"
UPDATE = False


def check_golden(relpath: str, actual: str) -> None:
    path = GOLDEN_DIR / relpath
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    if not path.exists():
        raise AssertionError(
            f"golden file {path.relative_to(GOLDEN_DIR.parent.parent)} is missing; "
            "run pytest with --update-golden to create it, then review it"
        )
    expected = path.read_text(encoding="utf-8")
    if expected != actual:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile=f"golden/{relpath}",
                tofile="actual",
            )
        )
        raise AssertionError(
            f"output differs from golden/{relpath} (rerun with --update-golden if intended):\n{diff}"
        )
