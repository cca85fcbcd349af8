"""Shared checks for the dsl tests: diagnostics must point inside the files they name."""

from __future__ import annotations

import pathlib
import re

from dsvc.dsl.diagnostics import SpecError


def assert_valid_diagnostics(err: SpecError, texts: dict[str, str]) -> None:
    """Every diagnostic has a message and a span inside its file (line 0: the whole file).

    `texts` maps file names to their text; files not in it are read from disk.
    """
    assert err.diagnostics, "a SpecError without diagnostics"
    for d in err.diagnostics:
        assert d.message and d.severity in ("error", "warning")
        assert not d.message.startswith("internal"), d.render()
        s = d.span
        if s is None or s.line == 0:
            continue
        text = texts.get(s.file)
        if text is None:
            text = pathlib.Path(s.file).read_text(encoding="utf-8", errors="replace")
        lines = re.split(r"\r\n|\r|\n", text)  # line breaks as the lexer counts them
        assert 1 <= s.line <= len(lines), (d.render(), len(lines))
        assert 1 <= s.col <= len(lines[s.line - 1]) + 1, d.render()
        d.render()  # renders without raising
