"""AST -> Spec: resolve includes, constants, units and defaults; check every rule.

Every problem found is collected (with a span) before anything is raised, so a
user sees all the errors of a spec at once. Block readers are in
`dsl/blocks.py`; cross-field rules in `dsl/rules.py`.
"""

from __future__ import annotations

import functools
import keyword
import os

from dsvc.dsl import ast, parser
from dsvc.dsl.diagnostics import ERROR, Diagnostic, DiagnosticSink, Span, SpecError, did_you_mean
from dsvc.dsl.files import read_source
from dsvc.dsl.struct import Frozen
from dsvc.dsl.values import Evaluator

TOP_BLOCKS = ("model", "precision", "cluster", "parallel", "train", "decode")
# blocks that mean something without a model: a file of only these is a fragment, shared by
# `include` (examples/clusters/*.dsv), which `dsvc check` checks on its own
FRAGMENT_BLOCKS = ("precision", "cluster")
MAX_INCLUDE_DEPTH = 16


class Fragment(Frozen):
    """A checked file of shared blocks and no model: its cluster and precision (None where
    absent), the names of the blocks it has, and spans as a Spec keeps them."""

    _fields = ("file", "blocks", "cluster", "precision", "spans", "files")
    __slots__ = _fields

    def span(self, path: str) -> Span | None:
        from dsvc.dsl.spec import Spec

        return Spec.span(self, path)


class _Sources:
    """Every file read for one spec, in load order; includes resolved relative to their includer."""

    def __init__(self, sink: DiagnosticSink):
        self.sink = sink
        self.texts: dict[str, str] = {}
        self.order: list[str] = []

    def read(self, path: str, span: Span | None) -> str | None:
        try:
            text = read_source(path, span)
        except SpecError as err:
            for d in err.diagnostics:  # at an include: shown with the including line
                if d.source is None and d.span is not None and d.span.line > 0:
                    self.sink.error(d.message, d.span, d.hint, d.code)
                else:
                    self.sink.add(d)
            return None
        self.texts[path] = text
        self.sink.sources[path] = text
        self.order.append(path)
        return text


def _collect(
    path: str,
    text: str,
    sources: _Sources,
    sink: DiagnosticSink,
    stack: list[str],
    items: list,
) -> None:
    """Parse `path` and its includes depth-first, appending top-level items in order."""
    try:
        tree = parser.parse(text, path)
    except SpecError as err:
        sink.extend(err.diagnostics)
        return
    base = os.path.dirname(path)
    for item in tree.items:
        if not isinstance(item, ast.Include):
            items.append(item)
            continue
        target = os.path.normpath(os.path.join(base, item.path))
        if not item.path.endswith(".dsv"):
            sink.error(f"can only include .dsv files, not '{item.path}'", item.span,
                       "an include names another spec file ending in .dsv")
            continue
        if target in stack:
            cycle = " -> ".join(stack[stack.index(target):] + [target])
            sink.error(f"include cycle: {cycle}", item.span, "remove one of these includes")
            continue
        if len(stack) >= MAX_INCLUDE_DEPTH:
            sink.error(f"includes nested deeper than {MAX_INCLUDE_DEPTH}", item.span)
            continue
        if target in sources.texts:
            continue  # included twice along different paths: read once
        sub = sources.read(target, item.span)
        if sub is not None:
            _collect(target, sub, sources, sink, stack + [target], items)


def elaborate_text(text: str, file: str, sources: _Sources | None = None,
                   fragment_ok: bool = False):
    """(Spec, warnings) of a spec's text, or with `fragment_ok`, (Fragment, warnings) of a
    file that has only FRAGMENT_BLOCKS. Raises SpecError with every problem."""
    from dsvc.dsl import blocks, rules

    sink = DiagnosticSink(text, {file: text})
    if sources is None:
        sources = _Sources(sink)
        sources.texts[file] = text
        sources.order.append(file)
    else:
        sources.sink = sink
        sink.sources.update(sources.texts)
    items: list = []
    _collect(file, text, sources, sink, [file], items)

    ev = Evaluator(sink)
    by_kind: dict[str, ast.Block] = {}
    for item in items:
        if isinstance(item, ast.Const):
            if item.name in ev.constants:
                sink.error(f"constant '{item.name}' is defined twice", item.name_span)
                continue
            if item.name in ("true", "false"):
                sink.error(f"'{item.name}' cannot be a constant name", item.name_span)
                continue
            ev.constants[item.name] = ev.evaluate(item.value)
            continue
        block = item
        if block.kind not in TOP_BLOCKS:
            guess = did_you_mean(block.kind, TOP_BLOCKS)
            sink.error(f"unknown block '{block.kind}'", block.kind_span,
                       f"did you mean `{guess}`?" if guess else
                       f"a spec has blocks: {', '.join(TOP_BLOCKS)}")
            continue
        if block.kind in by_kind:
            first = by_kind[block.kind].kind_span
            sink.error(f"a second '{block.kind}' block", block.kind_span,
                       f"the first is at {first.file}:{first.line}; a spec has one of each")
            continue
        by_kind[block.kind] = block
    check_names(items, sink)

    spans: dict[str, Span] = {}
    spec = None
    spec_parts = blocks.read_all(by_kind, sink, ev, spans, file)
    ev.report_unread_units()
    if not text.strip() and not sink.has_errors:
        sink.error("the file is empty", Span(file, 1, 1),
                   "a spec describes a model: `model NAME { vocab = ..., hidden = ... }`")
    elif "model" not in by_kind and not sink.has_errors:
        if fragment_ok and by_kind and set(by_kind) <= set(FRAGMENT_BLOCKS):
            fragment = Fragment(file, frozenset(by_kind), spec_parts.get("cluster"),
                                spec_parts.get("precision"), spans, tuple(sources.order))
            rules.check(fragment, sink)
            if sink.has_errors:
                raise SpecError(sink.sorted())
            return fragment, sink.warnings
        shared = " and ".join(f"`{b}`" for b in FRAGMENT_BLOCKS)
        sink.error("no `model` block", Span(file, 1, 1),
                   "a spec describes a model: `model NAME { vocab = ..., hidden = ... }` "
                   f"(a file to include may hold only {shared} blocks)")
    elif spec_parts is not None and not sink.has_errors:
        from dsvc.dsl.spec import Spec

        digest = _sha256()
        for f in sources.order:
            digest.update(f.encode() + b"\0" + sources.texts[f].encode() + b"\0")
        try:
            spec = Spec(file=file, spans=spans, files=tuple(sources.order),
                        content_hash=digest.hexdigest(), **spec_parts)
        except Exception as err:  # noqa: BLE001 - our bug, reported as a diagnostic
            sink.error(f"internal: spec model rejected the elaborated values: {err}",
                       Span(file, 1, 1), "this is a bug in dsvc; please report it")
        if spec is not None:
            rules.check(spec, sink)
    if spec is None and not sink.has_errors:  # every failed read reports why; guard our own bug
        sink.error("internal: the spec could not be built, but no problem was reported",
                   Span(file, 1, 1), "this is a bug in dsvc; please report it")
    if sink.has_errors:
        raise SpecError(sink.sorted())
    return spec, sink.warnings


@functools.lru_cache(maxsize=1)
def _sha256_type():
    """hashlib's sha256 without OpenSSL's import cost, where the builtin module exists."""
    try:
        from _sha2 import sha256  # Python >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # Python 3.10, 3.11
        except ImportError:
            from hashlib import sha256
    return sha256


def _sha256():
    return _sha256_type()()


def check_names(items: list, sink: DiagnosticSink) -> None:
    """Names reach generated code: they must be identifiers that are not Python keywords.

    The grammar already makes every name an identifier; this rejects the rest:
    keywords (`class`) and dunder names, for block labels and typed-block kinds.
    """
    def bad(name: str) -> bool:
        return keyword.iskeyword(name) or name.startswith("__")

    def visit(entries):
        for e in entries:
            if isinstance(e, ast.Block):
                if e.label is not None and bad(e.label):
                    sink.error(f"'{e.label}' cannot be used as a name", e.label_span,
                               "names become Python identifiers in generated code; pick another")
                visit(e.entries)
            elif isinstance(e, (ast.Assign, ast.RangeAssign)) \
                    and isinstance(e.value, ast.TypedBlock):
                if bad(e.value.kind):
                    sink.error(f"'{e.value.kind}' cannot be used as a name", e.value.kind_span,
                               "names become Python identifiers in generated code; pick another")
                visit(e.value.entries)

    visit([i for i in items if isinstance(i, ast.Block)])


def load_with_warnings(path: str | os.PathLike, fragment_ok: bool = False):
    p = str(path)
    sink = DiagnosticSink()
    sources = _Sources(sink)
    text = sources.read(p, None)
    if text is None:
        raise SpecError(sink.sorted())
    return elaborate_text(text, p, sources, fragment_ok)


def loads_with_warnings(text: str, filename: str = "<string>"):
    return elaborate_text(text, filename)


def internal_error(file: str, err: BaseException) -> SpecError:
    return SpecError([Diagnostic(ERROR, f"internal error: {type(err).__name__}: {err}",
                                 Span(file, 0, 0), "this is a bug in dsvc; please report it")])
