"""`--set key=value` overrides: a spec value replaced before elaboration, checked like the file.

`report`, `plan`, `inspect` and `compile` take `--set parallel.pipeline=32 --set
cluster.nodes=128`. An override is applied to the syntax tree the files gave, before
elaboration: the dotted key walks the spec as it is written (top block, nested
blocks by kind and label, `kind { ... }` values, keyword arguments of calls such as
`adamw(lr = ...)`), and the value is parsed as the right-hand side of `=` in a
.dsv file (numbers with units, names, strings, calls, `kind { ... }`). So every
rule checks it as if it were written in the file, and a diagnostic about it points
at it: the overrides are the lines of a pseudo-file named `--set` (line N is the
N-th override), shown with a caret like any source line.

    spec = dsl.load("examples/deepseek_v3.dsv", overrides=["cluster.nodes=128"])

A key that does not exist yet is added (`parallel.recompute=full`); an unknown key
or block is reported by the block's reader with its usual did-you-mean. Overrides
never modify the parsed files: the blocks along a key's path are copied.
"""

from __future__ import annotations

from dsvc.dsl import ast
from dsvc.dsl.diagnostics import Diagnostic, DiagnosticSink, Span, SpecError

OVERRIDE_FILE = "--set"


class OverrideSyntaxError(ValueError):
    """An override that is not `key=value` (a usage error: the command line is malformed)."""


class Override:
    """One parsed `key=value`: its dotted key, value node and where both are written."""

    __slots__ = ("text", "line", "path", "key_span", "value", "span")

    def __init__(self, text: str, line: int, path: tuple[str, ...], key_span: Span, value,
                 span: Span):
        self.text, self.line, self.path = text, line, path
        self.key_span, self.value, self.span = key_span, value, span


def split_override(text: str) -> tuple[str, str]:
    """(key, value) of `key=value`; `OverrideSyntaxError` when it is not one."""
    key, eq, value = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not eq or not value.strip():
        raise OverrideSyntaxError(f"--set {text!r}: expected KEY=VALUE, e.g. parallel.pipeline=8")
    if not key or not all(p.isidentifier() for p in parts):
        raise OverrideSyntaxError(f"--set {text!r}: the key must be dotted names, e.g. "
                                  "cluster.gpu.memory")
    return key, value


def source_of(texts) -> str:
    """The pseudo-file the overrides are read from: one override per line."""
    return "\n".join(texts)


def parse_overrides(texts, sink: DiagnosticSink) -> list[Override]:
    """Parse each `key=value` (validated by `split_override` first); syntax errors in a value
    go to `sink` as diagnostics pointing into the override."""
    from dsvc.dsl.parser import parse_value

    source = source_of(texts)
    sink.sources[OVERRIDE_FILE] = source
    out = []
    for i, text in enumerate(texts):
        line = i + 1
        try:
            key, _ = split_override(text)
        except OverrideSyntaxError as err:  # the CLI refuses these first (a usage error)
            sink.error(str(err), Span(OVERRIDE_FILE, line, 1, line, len(text) + 1),
                       code="override")
            continue
        lead = len(text) - len(text.lstrip())
        value_col = text.index("=") + 2
        padded = "\n" * i + " " * (value_col - 1) + text[value_col - 1:]
        try:
            value = parse_value(padded, OVERRIDE_FILE)
        except SpecError as err:
            for d in err.diagnostics:
                sink.add(Diagnostic(d.severity, d.message, d.span, d.hint, source, d.code))
            continue
        key_span = Span(OVERRIDE_FILE, line, lead + 1, line, lead + 1 + len(key))
        out.append(Override(text, line, tuple(key.split(".")), key_span, value,
                            Span(OVERRIDE_FILE, line, lead + 1, line, len(text) + 1)))
    return out


def apply_overrides(items: list, overrides: list[Override], sink: DiagnosticSink) -> list:
    """The top-level items of a spec with every override applied, in order (a later override
    of the same key wins). Items along an override's path are copied, never changed."""
    items = list(items)
    for o in overrides:
        top, rest = o.path[0], o.path[1:]
        if not rest:
            sink.error(f"`{top}` is a block; an override sets a key inside it", o.key_span,
                       f"e.g. --set {top}.KEY=VALUE", code="override")
            continue
        at = next((i for i, it in enumerate(items)
                   if isinstance(it, ast.Block) and it.kind == top), None)
        if at is None:  # a block the files lack: the override brings it (readers check it)
            items.append(_set_in(ast.Block(top, o.key_span, None, None, [], o.span), rest, o,
                                 sink))
        else:
            items[at] = _set_in(items[at], rest, o, sink)
    return items


def _set_in(block, path: tuple[str, ...], o: Override, sink: DiagnosticSink):
    """A copy of `block` (an ast.Block or a TypedBlock) with `path` set to the override."""
    entries = list(block.entries)
    head, rest = path[0], path[1:]
    assign = next((i for i, e in enumerate(entries)
                   if isinstance(e, ast.Assign) and e.key == head), None)
    if assign is not None:
        e = entries[assign]
        if not rest:
            entries[assign] = ast.Assign(head, o.key_span, o.value, o.span)
        elif isinstance(e.value, ast.TypedBlock):
            entries[assign] = ast.Assign(e.key, e.key_span, _set_in(e.value, rest, o, sink),
                                         e.span)
        elif isinstance(e.value, ast.Call) and len(rest) == 1:
            entries[assign] = ast.Assign(e.key, e.key_span, _set_kwarg(e.value, rest[0], o),
                                         e.span)
        else:
            sink.error(f"`{head}` is a value, not a block: `{'.'.join(o.path)}` names nothing",
                       o.key_span, f"set `{'.'.join(o.path[:len(o.path) - len(rest)])}` itself",
                       code="override")
        return _copy(block, entries)
    blocks = [i for i, e in enumerate(entries) if isinstance(e, ast.Block) and e.kind == head]
    labelled = [i for i in blocks if rest and entries[i].label == rest[0]]
    if labelled:  # `model.ffn.moe.top_k`: the block `ffn moe { ... }`
        i, rest = labelled[0], rest[1:]
    elif len(blocks) == 1:  # `cluster.network.effective`: the one `network` block
        i = blocks[0]
    else:
        i = None
    if i is not None and rest:
        entries[i] = _set_in(entries[i], rest, o, sink)
    elif i is not None:
        sink.error(f"`{'.'.join(o.path)}` is a block; an override sets a key inside it",
                   o.key_span, code="override")
    elif blocks:
        labels = ", ".join(sorted(str(entries[j].label) for j in blocks))
        sink.error(f"`{head}` names several blocks; say which: {labels}", o.key_span,
                   f"e.g. --set {'.'.join(o.path[:o.path.index(head) + 1])}."
                   f"{entries[blocks[0]].label}.KEY=VALUE", code="override")
    elif rest:  # a block the spec lacks: added, and its reader says whether it belongs here
        entries.append(_set_in(ast.Block(head, o.key_span, None, None, [], o.span), rest, o,
                               sink))
    else:
        entries.append(ast.Assign(head, o.key_span, o.value, o.span))
    return _copy(block, entries)


def _set_kwarg(call, name: str, o: Override):
    kwargs = [k for k in call.kwargs if k.name != name]
    kwargs.append(ast.KwArg(name, o.key_span, o.value, o.span))
    return ast.Call(call.func, call.func_span, list(call.args), kwargs, call.span)


def _copy(block, entries):
    if isinstance(block, ast.TypedBlock):
        return ast.TypedBlock(block.kind, block.kind_span, entries, block.span)
    return ast.Block(block.kind, block.kind_span, block.label, block.label_span, entries,
                     block.span)

