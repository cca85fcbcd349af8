"""The normative grammar (`dsl/grammar.lark`) run through lark: the oracle for `dsl.parser`.

dsvc parses with a hand-written parser for start-up speed; this module turns
lark's tree for the same text into `dsl.ast` nodes so the tests can require
identical trees (spans included). Only tests import it.
"""

from __future__ import annotations

import functools
import importlib.resources

import lark

from dsvc.dsl import ast
from dsvc.dsl.diagnostics import Span


@functools.lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    grammar = importlib.resources.files("dsl").joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _unescape(raw: str) -> str:
    out, i, body = [], 0, raw[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append({"n": "\n", "t": "\t"}.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def _transformer(file: str) -> lark.Transformer:
    def tspan(tok) -> Span:
        return Span(file, tok.line, tok.column, tok.end_line, tok.end_column)

    def mspan(meta) -> Span:
        return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)

    def binop(op):
        @lark.v_args(meta=True)
        def f(self, meta, items):
            return ast.BinOp(op, items[0], items[1], mspan(meta))

        return f

    class ToAst(lark.Transformer_NonRecursive):
        def start(self, items):
            return items

        def include(self, items):
            return ast.Include(_unescape(items[0]), tspan(items[0]))

        def const(self, items):
            name, value = items
            end = value.span
            return ast.Const(str(name), tspan(name), value,
                             Span(file, name.line, name.column, end.end_line, end.end_col))

        @lark.v_args(meta=True)
        def block(self, meta, items):
            kind, label, *entries = items
            return ast.Block(str(kind), tspan(kind), None if label is None else str(label),
                             None if label is None else tspan(label), entries, mspan(meta))

        @lark.v_args(meta=True)
        def assign(self, meta, items):
            return ast.Assign(str(items[0]), tspan(items[0]), items[1], mspan(meta))

        @lark.v_args(meta=True)
        def range_assign(self, meta, items):
            if len(items) == 4:
                return ast.RangeAssign(items[0], items[2], items[3], mspan(meta))
            return ast.RangeAssign(items[0], None, items[1], mspan(meta))

        @lark.v_args(meta=True)
        def typed_block(self, meta, items):
            return ast.TypedBlock(str(items[0]), tspan(items[0]), items[1:], mspan(meta))

        add, sub, mul = binop("+"), binop("-"), binop("*")
        div, floordiv, mod = binop("/"), binop("//"), binop("%")

        @lark.v_args(meta=True)
        def neg(self, meta, items):
            return ast.Neg(items[0], mspan(meta))

        @lark.v_args(meta=True)
        def quantity(self, meta, items):
            return ast.Quantity(items[0], str(items[1]), mspan(meta))

        def number(self, items):
            return ast.Num(str(items[0]), tspan(items[0]))

        def name(self, items):
            return ast.Name(str(items[0]), tspan(items[0]))

        def string(self, items):
            return ast.Str(_unescape(items[0]), tspan(items[0]))

        @lark.v_args(meta=True)
        def call(self, meta, items):
            func, *rest = items
            args = [a for a in rest if a is not None and not isinstance(a, ast.KwArg)]
            kwargs = [a for a in rest if isinstance(a, ast.KwArg)]
            return ast.Call(str(func), tspan(func), args, kwargs, mspan(meta))

        @lark.v_args(meta=True)
        def kwarg(self, meta, items):
            return ast.KwArg(str(items[0]), tspan(items[0]), items[1], mspan(meta))

        @lark.v_args(meta=True)
        def tuple(self, meta, items):
            return ast.Tuple([i for i in items if i is not None], mspan(meta))

        @lark.v_args(meta=True)
        def list(self, meta, items):
            return ast.List([i for i in items if i is not None], mspan(meta))

    return ToAst()


def parse(source: str, file: str = "<string>") -> list:
    """Top-level items of `source`; raises a lark exception on a syntax error."""
    return _transformer(file).transform(_lark().parse(source))
