"""Diagnostics: the one error type users see, with a source span, a caret and a hint.

Every user-reachable problem in dsvc (a malformed spec, an impossible plan, a
missing file) is reported as a `Diagnostic`. Checks collect diagnostics into a
`DiagnosticSink` and raise a single `SpecError` carrying all of them, so a user
sees every problem of a file at once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True, slots=True)
class Span:
    """A source range: 1-based line and column, end exclusive; ordered by position."""

    file: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    @property
    def short(self) -> str:
        """`file:line`, as the graph and plan cite sources."""
        return f"{self.file}:{self.line}"


def nearest_span(spans: dict[str, Span], path: str) -> Span | None:
    """The span of a dotted path, or of its nearest written parent ("a.b.c", "a.b", "a")."""
    while path:
        if path in spans:
            return spans[path]
        path = path.rpartition(".")[0]
    return None


NO_SPAN = Span("<unknown>", 0, 0)
MAX_SHOWN = 200  # diagnostics rendered per SpecError; a file with more is rarely a spec

ERROR = "error"
WARNING = "warning"
NOTE = "note"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem: severity, message, span, hint; `code` names the rule that found it.

    `source` is the text of the span's file, kept so that the caret can be
    drawn later; it takes no part in equality.
    """

    severity: str
    message: str
    span: Span | None = None
    hint: str | None = None
    source: str | None = field(default=None, compare=False)
    code: str | None = None

    def __repr__(self) -> str:
        return (f"Diagnostic({self.severity!r}, {self.message!r}, {self.span!r}, "
                f"hint={self.hint!r}, code={self.code!r})")

    def render(self) -> str:
        """`file:line:col: error: message [rule]`, the line, a caret under the span, a hint."""
        message = self.message + (f" [{self.code}]" if self.code else "")
        if self.span is None or self.span.line <= 0:
            head = f"dsvc: {self.severity}: {message}"
            if self.span is not None and self.span.file != NO_SPAN.file:
                head = f"{self.span.file}: {self.severity}: {message}"
            return head + (f"\n  hint: {self.hint}" if self.hint else "")
        out = [f"{self.span}: {self.severity}: {message}"]
        line_text = _source_line(self.source, self.span.line)
        if line_text is not None:
            shown = line_text.expandtabs(1).rstrip("\n")
            width = 1
            if self.span.end_line == self.span.line and self.span.end_col > self.span.col:
                width = self.span.end_col - self.span.col
            width = max(1, min(width, max(1, len(shown) - self.span.col + 1)))
            gutter = f"{self.span.line:>5} | "
            out.append(gutter + shown)
            out.append(" " * (len(gutter) - 2) + "| " + " " * (self.span.col - 1) + "^" * width)
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


@functools.lru_cache(maxsize=8)
def _lines(source: str) -> list[str]:
    return source.splitlines()  # once per file, however many diagnostics it has


def _source_line(source: str | None, line: int) -> str | None:
    if source is None:
        return None
    lines = _lines(source)
    if 1 <= line <= len(lines):
        text = lines[line - 1]
        if len(text) > 300:  # a pathological line: show its start only
            text = text[:300] + " ..."
        return text
    return None


class SpecError(Exception):
    """Raised by `dsl.load` / `dsl.loads` and the compiler for user errors.

    `diagnostics` holds every problem found (errors and warnings); `str(err)`
    renders them the way the CLI prints them.
    """

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        super().__init__(self.render())

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == ERROR)

    def render(self, limit: int = MAX_SHOWN) -> str:
        """Every diagnostic as the CLI prints it; past `limit`, a count of the rest."""
        shown = [d.render() for d in self.diagnostics[:limit]]
        if len(self.diagnostics) > limit:
            shown.append(f"dsvc: {len(self.diagnostics) - limit} more problems not shown")
        return "\n".join(shown)


class DiagnosticSink:
    """Collects diagnostics for one file (or one compilation) before raising them."""

    def __init__(self, source: str | None = None, sources: dict[str, str] | None = None):
        self._items: list[Diagnostic] = []
        self._source = source
        self.sources: dict[str, str] = dict(sources or {})

    def _text_for(self, span: Span | None) -> str | None:
        if span is None:
            return self._source
        return self.sources.get(span.file, self._source if not self.sources else None)

    def error(self, message: str, span: Span | None = None, hint: str | None = None,
              code: str | None = None) -> None:
        self._items.append(Diagnostic(ERROR, message, span, hint, self._text_for(span), code))

    def warning(self, message: str, span: Span | None = None, hint: str | None = None,
                code: str | None = None) -> None:
        self._items.append(Diagnostic(WARNING, message, span, hint, self._text_for(span), code))

    def add(self, diag: Diagnostic) -> None:
        self._items.append(diag)

    def extend(self, diags: Iterable[Diagnostic]) -> None:
        self._items.extend(diags)

    @property
    def has_errors(self) -> bool:
        return any(d.severity == ERROR for d in self._items)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self._items if d.severity == WARNING)

    def __iter__(self) -> Iterator[Diagnostic]:
        return iter(self.sorted())

    def __len__(self) -> int:
        return len(self._items)

    def sorted(self) -> list[Diagnostic]:
        """Source order: by file, line, column; unspanned ones last; stable otherwise."""

        def key(d: Diagnostic):
            s = d.span
            return (0, s.file, s.line, s.col) if s is not None else (1, "", 0, 0)

        return sorted(self._items, key=key)

    def raise_if_errors(self) -> None:
        if self.has_errors:
            raise SpecError(self.sorted())


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate by edit distance, when it is close enough to be a typo."""
    best, best_d = None, None
    for c in sorted(set(candidates)):
        d = _edit_distance(word.lower(), c.lower())
        if best_d is None or d < best_d:
            best, best_d = c, d
    if best is None or best_d is None:
        return None
    limit = max(1, min(3, len(word) // 3 + 1))
    return best if best_d <= limit else None


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
