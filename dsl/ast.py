"""The .dsv syntax tree: what was written, with a source span on every node.

Produced by `dsl.parser`, consumed by `dsl.elaborate` (meaning) and `dsl.fmt`
(layout). Values are kept unevaluated (constants, arithmetic and units are
resolved by elaboration) so the formatter can print them as written. Each
class is a dataclass whose fields are in constructor order.
"""

from __future__ import annotations

import dataclasses

from dsvc.dsl.diagnostics import Span


def _node(name: str, fields: str, doc: str):
    cls = dataclasses.make_dataclass(name, fields.split(), slots=True)
    cls.__module__ = __name__
    cls.__doc__ = doc
    return cls


# ----------------------------------------------------------------------------- expressions


@dataclasses.dataclass(slots=True)
class Num:
    """A number as written (`text`: "1e-6", "129_280"), evaluated on demand."""

    text: str
    span: Span

    @property
    def value(self) -> int | float:
        t = self.text.replace("_", "")
        if any(c in t for c in ".eE"):
            return float(t)
        return int(t)


Name = _node("Name", "id span", "A bare word: a constant, an enum value or a reference.")
Str = _node("Str", "value span", "A string literal, unescaped.")
Quantity = _node("Quantity", "expr unit span", "`expr UNIT`, e.g. `400 GB/s`.")
BinOp = _node("BinOp", "op left right span", "`left op right`; op is one of + - * / // %.")
Neg = _node("Neg", "operand span", "`-operand`.")
KwArg = _node("KwArg", "name name_span value span", "`name = value` inside a call.")
Call = _node("Call", "func func_span args kwargs span",
             "`func(args..., kwargs...)`: positional args and keyword args in two lists.")
Tuple = _node("Tuple", "items span", "`(a, b)`.")
List = _node("List", "items span", "`[a, b]`.")
TypedBlock = _node("TypedBlock", "kind kind_span entries span",
                   "A value with a kind and fields: `h800 { bf16 = 989 TFLOPS }`.")

# ----------------------------------------------------------------------------- entries and items

Assign = _node("Assign", "key key_span value span", "`key = value`.")
RangeAssign = _node("RangeAssign", "lo hi value span",
                    "`0..2 = value` (hi inclusive) or `5 = value` (hi is None).")
Const = _node("Const", "name name_span value span", "`const NAME = expr`.")
Block = _node("Block", "kind kind_span label label_span entries span",
              "`kind [label] { entries }`, at the top level or nested.")
Include = _node("Include", "path span", '`include "file.dsv"`; span is the path string.')
Comment = _node("Comment", "text line col end_col", "`# ...` (text includes the '#').")
File = _node("File", "path items comments source span", "One parsed file.")

Expr = (Num, Name, Str, Quantity, BinOp, Neg, Call, Tuple, List)  # for isinstance
Value = Expr + (TypedBlock,)
Entry = (Assign, RangeAssign, Block, Const)


def dump(node, indent: int = 0, spans: bool = False) -> str:
    """A stable, readable dump of a syntax tree (golden tests; `spans=True` shows every span)."""
    pad = "  " * indent
    if isinstance(node, list):
        return "\n".join(dump(n, indent, spans) for n in node)
    if not _is_node(node):
        return pad + repr(node)
    fields, children = [], []
    for name in (f.name for f in dataclasses.fields(node)):
        if name in ("source", "comments"):
            continue
        v = getattr(node, name)
        if name == "span" or name.endswith("_span"):
            if spans and v is not None:
                fields.append(f"{name}={v.line}:{v.col}-{v.end_line}:{v.end_col}")
            continue
        if _is_node(v) or (isinstance(v, list) and v and _is_node(v[0])):
            children.append((name, v))
        elif not (isinstance(v, list) and not v):
            fields.append(f"{name}={v!r}")
    span = getattr(node, "span", None)
    where = f" @{span.line}:{span.col}" if isinstance(span, Span) and not spans else ""
    out = [f"{pad}{type(node).__name__}({', '.join(fields)}){where}"]
    for name, v in children:
        out.append(f"{pad}  .{name}:")
        for item in v if isinstance(v, list) else [v]:
            out.append(dump(item, indent + 2, spans))
    return "\n".join(out)


def _is_node(v) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, (type, Span))
