"""The .dsv syntax tree: what was written, with a source span on every node.

Produced by `dsl.parser`, consumed by `dsl.elaborate` (meaning) and `dsl.fmt`
(layout). Values are kept unevaluated (constants, arithmetic and units are
resolved by elaboration) so the formatter can print them as written.
"""

from __future__ import annotations

import dataclasses
from typing import Union

from dsl.diagnostics import Span


@dataclasses.dataclass
class Num:
    text: str  # as written, e.g. "1e-6", "129_280"
    span: Span

    @property
    def value(self) -> int | float:
        t = self.text.replace("_", "")
        if any(c in t for c in ".eE"):
            return float(t)
        return int(t)


@dataclasses.dataclass
class Name:
    id: str
    span: Span


@dataclasses.dataclass
class Str:
    value: str  # unescaped
    span: Span


@dataclasses.dataclass
class Quantity:
    expr: "Expr"
    unit: str
    span: Span


@dataclasses.dataclass
class BinOp:
    op: str  # + - * / // %
    left: "Expr"
    right: "Expr"
    span: Span


@dataclasses.dataclass
class Neg:
    operand: "Expr"
    span: Span


@dataclasses.dataclass
class KwArg:
    name: str
    name_span: Span
    value: "Expr"
    span: Span


@dataclasses.dataclass
class Call:
    func: str
    func_span: Span
    args: list["Expr"]
    kwargs: list[KwArg]
    span: Span


@dataclasses.dataclass
class Tuple:
    items: list["Expr"]
    span: Span


@dataclasses.dataclass
class List:
    items: list["Expr"]
    span: Span


@dataclasses.dataclass
class TypedBlock:
    """A value with a kind and fields: `h800 { bf16 = 989 TFLOPS }`."""

    kind: str
    kind_span: Span
    entries: list["Entry"]
    span: Span


Expr = Union[Num, Name, Str, Quantity, BinOp, Neg, Call, Tuple, List]
Value = Union[Expr, TypedBlock]


@dataclasses.dataclass
class Assign:
    key: str
    key_span: Span
    value: Value
    span: Span


@dataclasses.dataclass
class RangeAssign:
    """`0..2 = value` (hi inclusive) or `5 = value` (hi is None)."""

    lo: Expr
    hi: Expr | None
    value: Value
    span: Span


@dataclasses.dataclass
class Const:
    name: str
    name_span: Span
    value: Expr
    span: Span


@dataclasses.dataclass
class Block:
    kind: str
    kind_span: Span
    label: str | None
    label_span: Span | None
    entries: list["Entry"]
    span: Span


Entry = Union[Assign, RangeAssign, Block, Const]


@dataclasses.dataclass
class Include:
    path: str
    span: Span


@dataclasses.dataclass
class Comment:
    text: str  # including the leading '#'
    line: int
    col: int
    end_col: int


@dataclasses.dataclass
class File:
    path: str
    items: list[Union[Include, Const, Block]]
    comments: list[Comment]
    source: str
    span: Span


def dump(node, indent: int = 0) -> str:
    """A stable, readable dump of a syntax tree (used by golden tests)."""
    pad = "  " * indent
    if isinstance(node, list):
        return "\n".join(dump(n, indent) for n in node)
    if not dataclasses.is_dataclass(node):
        return pad + repr(node)
    name = type(node).__name__
    fields = []
    children = []
    for f in dataclasses.fields(node):
        if f.name in ("span", "source", "comments") or f.name.endswith("_span"):
            continue
        v = getattr(node, f.name)
        if dataclasses.is_dataclass(v) or (isinstance(v, list) and v and dataclasses.is_dataclass(v[0])):
            children.append((f.name, v))
        elif isinstance(v, list) and not v:
            continue
        else:
            fields.append(f"{f.name}={v!r}")
    span = getattr(node, "span", None)
    where = f" @{span.line}:{span.col}" if isinstance(span, Span) else ""
    out = [f"{pad}{name}({', '.join(fields)}){where}"]
    for fname, v in children:
        out.append(f"{pad}  .{fname}:")
        items = v if isinstance(v, list) else [v]
        for item in items:
            out.append(dump(item, indent + 2))
    return "\n".join(out)
