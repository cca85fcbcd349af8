"""Text -> syntax tree (`dsl.ast`), with every syntax problem turned into a diagnostic.

A hand-written recursive-descent parser for the grammar in `dsl/grammar.lark`.
It exists for speed: importing lark and building its tables costs several
times Python's own start-up, and `dsvc check` must start in about that much
(docs/language.md, "Speed"). The tests parse every example and thousands of
generated inputs with both this parser and lark on `grammar.lark` and require
the same trees, spans included: the .lark file stays the normative grammar.

Spans follow lark's `propagate_positions`: a node spans from the start of its
first child to the end of its last, where a child written in parentheses
counts with its parentheses; a parenthesised expression's own span excludes them.
Nesting (brackets, blocks, operators) is bounded so that everything downstream
can recurse over the tree safely.
"""

from __future__ import annotations

from dsvc.dsl import ast
from dsvc.dsl.diagnostics import ERROR, Diagnostic, Span, SpecError
from dsvc.dsl.lexer import (  # noqa: F401 - decode_source and MAX_BYTES are part of this API
    DIGIT_WORD,
    EOF,
    KEYWORDS,
    MAX_BYTES,
    NAME,
    NUMBER,
    STRING,
    Token,
    decode_source,
    tokens,
    unit_at,
)

MAX_NESTING = 64  # brackets and braces
MAX_EXPR_DEPTH = 200  # operators and brackets inside one expression

_ATOM_START = (NUMBER, DIGIT_WORD, NAME, STRING, "(", "[")
_BINARY = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}
_WORDS = {NAME: "a name", NUMBER: "a number", DIGIT_WORD: "a word", STRING: "a string",
          EOF: "end of file"}


class _Fail(Exception):
    pass


class _Expr:
    """An expression being built: the node, its container span (with parentheses), its depth."""

    __slots__ = ("node", "start", "end", "depth")

    def __init__(self, node, start: tuple[int, int], end: tuple[int, int], depth: int):
        self.node, self.start, self.end, self.depth = node, start, end, depth


class _Parser:
    def __init__(self, source: str, file: str):
        self.source = source
        self.file = file
        self.comments: list[ast.Comment] = []
        self._next = tokens(source, file, self.comments).__next__
        self.toks: list[Token] = []  # lexed so far; lexing stays a few tokens ahead
        self.i = 0
        self.nesting = 0
        self.open_blocks: list[Token] = []

    # ------------------------------------------------------------------ helpers

    def peek(self, k: int = 0) -> Token:
        toks = self.toks
        j = self.i + k
        while j >= len(toks):
            if toks and toks[-1].kind == EOF:
                return toks[-1]
            toks.append(self._next())
        return toks[j]

    def take(self) -> Token:
        tok = self.peek()
        if tok.kind != EOF:
            self.i += 1
        return tok

    def expect(self, kind: str, what: str) -> Token:
        tok = self.peek()
        if tok.kind != kind:
            self.fail(tok, what)
        return self.take()

    def span(self, start: tuple[int, int], end: tuple[int, int]) -> Span:
        return Span(self.file, start[0], start[1], end[0], end[1])

    def enter(self, tok: Token) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            self.error(f"nesting deeper than {MAX_NESTING} levels", tok.span(self.file),
                       "a spec never needs this much nesting; is this the right file?")

    def error(self, message: str, span: Span, hint: str | None = None):
        raise SpecError([Diagnostic(ERROR, message, span, hint, self.source)])

    def fail(self, tok: Token, expected: str):
        if tok.kind == EOF:
            hint = f"the file ends where {expected} should be"
            if self.open_blocks:
                b = self.open_blocks[-1]
                hint = f"the block `{b.text}` opened at line {b.line} is not closed: add '}}'"
            text = self.source.rstrip()  # point just after the last thing written
            line = text.count("\n") + 1
            col = len(text) - (text.rfind("\n") + 1) + 1
            self.error("unexpected end of file", Span(self.file, line, col, line, col + 1), hint)
        shown = tok.text if len(tok.text) <= 30 else tok.text[:27] + "..."
        hint = f"expected {expected}"
        if tok.kind == NAME and unit_at(self.source, tok.offset) == tok.text:
            hint += f"; '{tok.text}' is a unit, so it cannot be used as a name here"
        elif tok.kind in KEYWORDS:
            hint += f"; `{tok.text}` is a reserved word"
        self.error(f"unexpected '{shown}'", tok.span(self.file), hint)

    def unit_next(self) -> bool:
        tok = self.peek()
        return tok.kind == NAME and unit_at(self.source, tok.offset) is not None

    def take_unit(self) -> Token:
        first = self.peek()
        text = unit_at(self.source, first.offset)
        end = first.offset + len(text)
        while self.peek().offset < end:  # `GB/s` is three tokens: GB, /, s
            self.take()
        return Token("UNIT", text, first.line, first.col, first.offset)

    # ------------------------------------------------------------------ file, items, entries

    def file_(self) -> ast.File:
        items = []
        while self.peek().kind != EOF:
            tok = self.peek()
            if tok.kind == "include":
                self.take()
                s = self.expect(STRING, "the quoted path of a .dsv file")
                items.append(ast.Include(_unescape(s.text), s.span(self.file)))
            elif tok.kind == "const":
                items.append(self.const())
            elif tok.kind == NAME:
                items.append(self.block(top=True))
            else:
                self.fail(tok, "`include`, `const` or a block such as `model NAME { ... }`")
        lines = self.source.count("\n") + 1
        return ast.File(self.file, items, self.comments, self.source,
                        Span(self.file, 1, 1, lines, 1))

    def const(self) -> ast.Const:
        self.take()
        name = self.expect(NAME, "the constant's name")
        self.expect("=", "'='")
        e = self.expr()
        sp = e.node.span
        return ast.Const(name.text, name.span(self.file), e.node,
                         Span(self.file, name.line, name.col, sp.end_line, sp.end_col))

    def block(self, top: bool) -> ast.Block:
        kind = self.take()
        label = None
        if self.peek().kind == NAME:
            label = self.take()
        if self.peek().kind != "{":
            self.fail(self.peek(), "'{'" if label else "a name or '{'")
        entries, end = self.braces(kind)
        return ast.Block(kind.text, kind.span(self.file), label.text if label else None,
                         label.span(self.file) if label else None, entries,
                         self.span((kind.line, kind.col), end))

    def braces(self, opener: Token):
        """`{ entry, ... }` -> (entries, end position of '}')."""
        brace = self.take()
        self.enter(brace)
        self.open_blocks.append(opener)
        entries = []
        while self.peek().kind != "}":
            entries.append(self.entry())
            if self.peek().kind == ",":
                self.take()
        close = self.take()
        self.open_blocks.pop()
        self.nesting -= 1
        return entries, (close.line, close.end_col)

    def entry(self):
        tok = self.peek()
        if tok.kind == "const":
            return self.const()
        if tok.kind == NAME:
            nxt = self.peek(1)
            unit = nxt.kind == NAME and unit_at(self.source, nxt.offset) is not None
            if not unit:
                if nxt.kind == "=":
                    key = self.take()
                    self.take()
                    value, end = self.value()
                    return ast.Assign(key.text, key.span(self.file), value,
                                      self.span((key.line, key.col), end))
                if nxt.kind in ("{", NAME):
                    return self.block(top=False)
        elif tok.kind not in _ATOM_START and tok.kind != "-":
            self.fail(tok, "`key = value`, a block or '}'")
        lo = self.expr()
        hi = None
        if self.peek().kind == "..":
            self.take()
            hi = self.expr()
        self.expect("=", "'=' (or '..' in an index range such as `0..2 = ...`)")
        value, end = self.value()
        return ast.RangeAssign(lo.node, hi.node if hi else None, value, self.span(lo.start, end))

    def value(self):
        """The right-hand side of '=': an expression or `kind { ... }`. -> (node, container end)."""
        tok = self.peek()
        if tok.kind == NAME and self.peek(1).kind == "{":
            self.take()
            entries, end = self.braces(tok)
            return ast.TypedBlock(tok.text, tok.span(self.file), entries,
                                  self.span((tok.line, tok.col), end)), end
        e = self.expr()
        return e.node, e.end

    # ------------------------------------------------------------------ expressions

    def expr(self, level: int = 1) -> _Expr:
        left = self.expr(level + 1) if level < 2 else self.unary()
        while True:
            op = self.peek().kind
            if _BINARY.get(op) != level:
                return left
            self.take()
            right = self.expr(level + 1) if level < 2 else self.unary()
            depth = max(left.depth, right.depth) + 1
            self.check_depth(depth, left.start)
            node = ast.BinOp(op, left.node, right.node, self.span(left.start, right.end))
            left = _Expr(node, left.start, right.end, depth)

    def check_depth(self, depth: int, start: tuple[int, int]) -> None:
        if depth > MAX_EXPR_DEPTH:
            self.error(f"expression nested more than {MAX_EXPR_DEPTH} deep",
                       Span(self.file, start[0], start[1], start[0], start[1] + 1),
                       "split it with `const NAME = ...`")

    def unary(self) -> _Expr:
        minus = []
        while self.peek().kind == "-":
            minus.append(self.take())
            self.check_depth(len(minus), (minus[0].line, minus[0].col))
        e = self.postfix()
        for tok in reversed(minus):
            depth = e.depth + 1
            self.check_depth(depth, (tok.line, tok.col))
            e = _Expr(ast.Neg(e.node, self.span((tok.line, tok.col), e.end)), (tok.line, tok.col),
                      e.end, depth)
        return e

    def postfix(self) -> _Expr:
        e = self.atom()
        if self.unit_next():
            unit = self.take_unit()
        elif isinstance(e.node, ast.Num):
            unit = self.take_unknown_unit(e.end)
            if unit is None:
                return e
        else:
            return e
        end = (unit.line, unit.end_col)
        return _Expr(ast.Quantity(e.node, unit.text, self.span(e.start, end)), e.start, end,
                     e.depth + 1)

    def take_unknown_unit(self, after: tuple[int, int]) -> Token | None:
        """A word after a number on its line that is no unit (`400 Gbps`, `400 gb/s`) as one
        token, where the grammar could not go on with it (it does not start an entry).
        Elaboration reports it with the units its key takes: the one place this parser
        accepts what grammar.lark rejects (tests/dsl/test_parser.py)."""
        first = self.peek()
        if first.kind != NAME or first.line != after[0]:
            return None
        n, end = 1, first.offset + len(first.text)
        while self.peek(n).offset == end and self.peek(n).kind in (NAME, NUMBER, DIGIT_WORD, "/"):
            end += len(self.peek(n).text)
            n += 1
        nxt = self.peek(n)
        if nxt.kind in ("=", "..", "{", "(", "[", "+", "-", "*", "/", "//", "%") or (
                nxt.kind == NAME and self.peek(n + 1).kind == "{"):
            return None
        for _ in range(n):
            self.take()
        return Token("UNIT", self.source[first.offset:end], first.line, first.col, first.offset)

    def atom(self) -> _Expr:
        tok = self.peek()
        f = self.file
        if tok.kind == NUMBER:
            self.take()
            return _leaf(ast.Num(tok.text, tok.span(f)), tok)
        if tok.kind == DIGIT_WORD:
            self.take()
            return _leaf(ast.Name(tok.text, tok.span(f)), tok)
        if tok.kind == STRING:
            self.take()
            return _leaf(ast.Str(_unescape(tok.text), tok.span(f)), tok)
        if tok.kind == NAME:
            self.take()
            if self.peek().kind == "(":
                return self.call(tok)
            return _leaf(ast.Name(tok.text, tok.span(f)), tok)
        if tok.kind == "(":
            return self.parens()
        if tok.kind == "[":
            return self.list_()
        self.fail(tok, "a value")

    def call(self, name: Token) -> _Expr:
        open_ = self.take()
        self.enter(open_)
        args, kwargs, depth = [], [], 1
        first = True
        while self.peek().kind != ")":
            if not first or self.peek().kind != ",":
                tok = self.peek()
                if tok.kind == NAME and self.peek(1).kind == "=":
                    self.take()
                    self.take()
                    v = self.expr()
                    kwargs.append(ast.KwArg(tok.text, tok.span(self.file), v.node,
                                            self.span((tok.line, tok.col), v.end)))
                else:
                    v = self.expr()
                    args.append(v.node)
                depth = max(depth, v.depth + 1)
            if self.peek().kind != ",":
                break
            self.take()
            if first and not args and not kwargs:  # `f(,)`: the grammar allows it
                break
            first = False
        close = self.expect(")", "',' or ')'")
        self.nesting -= 1
        self.check_depth(depth, (name.line, name.col))
        end = (close.line, close.end_col)
        node = ast.Call(name.text, name.span(self.file), args, kwargs,
                        self.span((name.line, name.col), end))
        return _Expr(node, (name.line, name.col), end, depth)

    def parens(self) -> _Expr:
        open_ = self.take()
        self.enter(open_)
        if self.peek().kind == ")":
            self.fail(self.peek(), "a value inside '( )'")
        first = self.expr()
        items, depth = [first.node], first.depth
        if self.peek().kind == ",":
            self.take()
            if self.peek().kind == ",":  # `(a,,)`: the grammar allows one trailing comma here
                self.take()
            else:
                depth = max(depth, self.items_until(")", items))
            close = self.expect(")", "',' or ')'")
            start, end = (open_.line, open_.col), (close.line, close.end_col)
            node = ast.Tuple(items, self.span(start, end))
        else:
            close = self.expect(")", "')'")
            start, end = (open_.line, open_.col), (close.line, close.end_col)
            node = first.node  # its own span excludes the parentheses
        self.nesting -= 1
        self.check_depth(depth + 1, start)
        return _Expr(node, start, end, depth + 1)

    def items_until(self, close: str, items: list) -> int:
        """Comma-separated values up to `close` (a trailing comma allowed), appended to
        `items`; returns their deepest nesting. Leaves `close` for the caller."""
        depth = 0
        while self.peek().kind != close:
            e = self.expr()
            items.append(e.node)
            depth = max(depth, e.depth)
            if self.peek().kind != ",":
                break
            self.take()
        return depth

    def list_(self) -> _Expr:
        open_ = self.take()
        self.enter(open_)
        items, depth = [], 0
        if self.peek().kind == ",":  # `[,]`: the grammar allows it
            self.take()
        else:
            depth = self.items_until("]", items)
        close = self.expect("]", "',' or ']'")
        self.nesting -= 1
        start, end = (open_.line, open_.col), (close.line, close.end_col)
        self.check_depth(depth + 1, start)
        return _Expr(ast.List(items, self.span(start, end)), start, end, depth + 1)


def _leaf(node, tok: Token) -> _Expr:
    return _Expr(node, (tok.line, tok.col), (tok.line, tok.end_col), 0)


def _unescape(raw: str) -> str:
    body = raw[1:-1]
    if "\\" not in body:
        return body
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse(source: str, file: str = "<string>") -> ast.File:
    """Parse one file's text. Raises `SpecError` with a diagnostic on a syntax error."""
    return _Parser(source, file).file_()


def parse_value(source: str, file: str):
    """Parse `source` as one value, the right-hand side of `key = value`, and nothing after
    it (a `--set key=value` override's value: blank lines and spaces before it only place its
    spans where the command line has it). Raises `SpecError` on a syntax error."""
    p = _Parser(source, file)
    node, _ = p.value()
    if p.peek().kind != EOF:
        p.fail(p.peek(), "the end of the value")
    return node
