"""The chosen plan as a spec: the input file's text with its values changed, comments kept.

`dsvc plan -o FILE` writes what the search simulated: the input file, each `--set`
override and each value of the chosen candidate (`Candidate.overrides`) written in
place of the value it replaces (or added before its block's closing brace), the
blocks of a `--cluster` file in place of the spec's. A block that comes from an
`include` and changes (`--set cluster.nodes=128` on an included cluster file) is
inlined where the `include` stood; every include left is re-pointed from the output
file's folder. The text is then loaded again and must give the spec the search
scored (`check_written`): what is written is what was simulated.
"""

from __future__ import annotations

import os

from dsvc.dsl import ast, parser
from dsvc.dsl.files import read_source
from dsvc.dsl.overrides import split_override
from dsvc.dsl.spec import as_dict


def spec_text(path, overrides, replace_from, out_path: str, header: list[str]) -> str:
    """The text of the spec at `path` with `overrides` (`key=value`, in order) and the blocks
    of `replace_from` files, to be written at `out_path`; `header` lines become comments."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    text = _rebase(read_source(str(path)), os.path.dirname(os.path.abspath(path)), out_dir)
    for other in replace_from:
        other = os.path.abspath(str(other))
        other_text = _rebase(read_source(other), os.path.dirname(other), out_dir)
        tree = parser.parse(other_text, other)
        for block in (b for b in tree.items if isinstance(b, ast.Block)):
            text = _replace_block(text, out_dir, block.kind, _slice(other_text, block.span))
    for o in overrides:
        key, value = split_override(o)
        text = _set(text, out_dir, tuple(key.split(".")), value.strip())
    lead = "".join(f"# {line}\n" if line else "#\n" for line in header)
    return lead + ("\n" if lead else "") + text


# ----------------------------------------------------------------------------- text edits


def _offset(text: str, line: int, col: int) -> int:
    """The string index of 1-based (line, col)."""
    start = 0
    for _ in range(line - 1):
        start = text.index("\n", start) + 1
    return start + col - 1


def _slice(text: str, span) -> str:
    return text[_offset(text, span.line, span.col):_offset(text, span.end_line, span.end_col)]


def _splice(text: str, span, new: str) -> str:
    a, b = _offset(text, span.line, span.col), _offset(text, span.end_line, span.end_col)
    return text[:a] + new + text[b:]


def _rebase(text: str, from_dir: str, to_dir: str) -> str:
    """`text` with each include's path re-pointed from `to_dir` (later ones first, so the
    earlier spans stay valid)."""
    tree = parser.parse(text, "<plan>")
    for inc in reversed([i for i in tree.items if isinstance(i, ast.Include)]):
        target = os.path.normpath(os.path.join(from_dir, inc.path))
        rel = os.path.relpath(target, to_dir)
        text = _splice(text, inc.span, '"' + rel.replace("\\", "/") + '"')
    return text


def _included_kinds(inc, out_dir: str, seen=()) -> set[str]:
    """The block kinds an include brings (through its own includes too)."""
    target = os.path.normpath(os.path.join(out_dir, inc.path))
    if target in seen:
        return set()
    tree = parser.parse(read_source(target), target)
    kinds = {b.kind for b in tree.items if isinstance(b, ast.Block)}
    for sub in (i for i in tree.items if isinstance(i, ast.Include)):
        kinds |= _included_kinds(ast.Include(os.path.relpath(
            os.path.normpath(os.path.join(os.path.dirname(target), sub.path)), out_dir),
            sub.span), out_dir, (*seen, target))
    return kinds


def _inline(text: str, out_dir: str, kind: str) -> str | None:
    """`text` with the include that brings a `kind` block replaced by that file's text (its
    own includes re-pointed), or None when no include brings one."""
    tree = parser.parse(text, "<plan>")
    for inc in (i for i in tree.items if isinstance(i, ast.Include)):
        if kind in _included_kinds(inc, out_dir):
            target = os.path.normpath(os.path.join(out_dir, inc.path))
            body = _rebase(read_source(target), os.path.dirname(target), out_dir).strip("\n")
            start = _offset(text, inc.span.line, 1)  # the whole `include "..."` line
            end = text.find("\n", _offset(text, inc.span.end_line, inc.span.end_col))
            end = len(text) if end < 0 else end
            return text[:start] + body + text[end:]
    return None


def _top_block(text: str, out_dir: str, kind: str):
    """(text, the `kind` block of its tree) with an include inlined when it brings the block;
    (text, None) when the spec has none."""
    while True:
        tree = parser.parse(text, "<plan>")
        block = next((b for b in tree.items if isinstance(b, ast.Block) and b.kind == kind),
                     None)
        if block is not None:
            return text, block
        inlined = _inline(text, out_dir, kind)
        if inlined is None:
            return text, None
        text = inlined


def _replace_block(text: str, out_dir: str, kind: str, new: str) -> str:
    text, block = _top_block(text, out_dir, kind)
    if block is None:
        return text.rstrip("\n") + "\n\n" + new + "\n"
    return _splice(text, block.span, new)


def _set(text: str, out_dir: str, path: tuple[str, ...], value: str) -> str:
    """`text` with `path` (a dotted key, as `--set` walks it) set to `value`."""
    text, block = _top_block(text, out_dir, path[0])
    if block is None:
        return text.rstrip("\n") + "\n\n" + _nested(path, value, "") + "\n"
    node, rest = block, path[1:]
    while True:
        head, rest = rest[0], rest[1:]
        entries = node.entries
        assign = next((e for e in entries if isinstance(e, ast.Assign) and e.key == head), None)
        if assign is not None:
            if not rest:
                return _drop_comment(_splice(text, assign.value.span, value),
                                     assign.value.span, value)
            if isinstance(assign.value, ast.TypedBlock):
                node = assign.value
                continue
            call = assign.value  # `optimizer.lr`: a keyword argument of the call
            kw = next((k for k in call.kwargs if k.name == rest[0]), None)
            if kw is not None:
                return _splice(text, kw.value.span, value)
            close = _offset(text, call.span.end_line, call.span.end_col) - 1
            return text[:close] + f", {rest[0]} = {value}" + text[close:]
        blocks = [e for e in entries if isinstance(e, ast.Block) and e.kind == head]
        labelled = [b for b in blocks if rest and b.label == rest[0]]
        if labelled:
            node, rest = labelled[0], rest[1:]
            if rest:
                continue
        elif len(blocks) == 1 and rest:
            node = blocks[0]
            continue
        return _insert(text, node, _nested((head, *rest), value, ""))


def _drop_comment(text: str, span, value: str) -> str:
    """`text` without the comment after a replaced value on its line: it spoke of the old."""
    end = _offset(text, span.line, span.col) + len(value)
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    if text[end:line_end].strip().startswith("#"):
        return text[:end] + text[line_end:]
    return text


def _nested(path: tuple[str, ...], value: str, indent: str) -> str:
    """`a { b = v }` written out over lines for a path the spec lacks."""
    if len(path) == 1:
        return f"{indent}{path[0]} = {value}"
    inner = _nested(path[1:], value, indent + "  ")
    return f"{indent}{path[0]} {{\n{inner}\n{indent}}}"


def _insert(text: str, node, entry: str) -> str:
    """`entry` added as the last entry of block `node`, before its closing brace."""
    close = _offset(text, node.span.end_line, node.span.end_col) - 1  # the `}`
    line_start = text.rfind("\n", 0, close) + 1
    if text[line_start:close].strip():  # `{ a = 1 }` on one line
        return text[:close].rstrip() + ", " + entry.strip() + " " + text[close:]
    indent = text[line_start:close] + "  "
    lines = entry.split("\n")
    return text[:line_start] + "\n".join(indent + x for x in lines) + "\n" + text[line_start:]


def check_written(text: str, out_path: str, expected) -> None:
    """Load the written text as the file it will be and require the spec the search scored
    (its parallel, train and cluster values)."""
    from dsvc import dsl

    got = dsl.loads(text, out_path)
    for part in ("parallel", "train", "cluster"):
        if _plain(getattr(got, part)) != _plain(getattr(expected, part)):
            raise AssertionError(f"the written spec's {part} differs from the plan searched")


def _plain(record):
    """A record's values without source positions, for comparison."""
    dump = as_dict(record)
    return {k: v for k, v in dump.items() if k not in ("span", "source", "sources")}
