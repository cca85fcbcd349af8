"""Text -> syntax tree, with every syntax problem turned into a diagnostic.

The lark grammar lives in `grammar.lark`; this module owns the one parser
instance (built once, LALR), the tree -> `dsl.ast` transform, and the mapping
of lark's exceptions to `file:line:col` diagnostics with a hint.
"""

from __future__ import annotations

import functools
import importlib.resources

from dsl import ast
from dsl.diagnostics import Diagnostic, DiagnosticSink, Span, SpecError, ERROR

MAX_BYTES = 2_000_000  # specs are small; a bigger file is almost surely not a spec
MAX_NESTING = 64  # brackets and braces


@functools.lru_cache(maxsize=1)
def _lark():
    import lark

    grammar = importlib.resources.files("dsl").joinpath("grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _span(file: str, meta) -> Span:
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(file: str, tok) -> Span:
    return Span(file, tok.line, tok.column, tok.end_line, tok.end_column)


def _unescape(raw: str) -> str:
    body = raw[1:-1]
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


def _make_transformer(file: str):
    import lark

    class ToAst(lark.Transformer_NonRecursive):
        def start(self, items):
            return items

        def include(self, items):
            (tok,) = items
            return ast.Include(_unescape(tok), _tok_span(file, tok))

        def const(self, items):
            name, value = items
            span = Span(file, name.line, name.column, *_end(value))
            return ast.Const(str(name), _tok_span(file, name), value, span)

        @lark.v_args(meta=True)
        def block(self, meta, items):
            kind, label, *entries = items
            return ast.Block(
                str(kind),
                _tok_span(file, kind),
                str(label) if label is not None else None,
                _tok_span(file, label) if label is not None else None,
                entries,
                _span(file, meta),
            )

        @lark.v_args(meta=True)
        def assign(self, meta, items):
            key, value = items
            return ast.Assign(str(key), _tok_span(file, key), value, _span(file, meta))

        @lark.v_args(meta=True)
        def range_assign(self, meta, items):
            if len(items) == 4:
                lo, _dots, hi, value = items
            else:
                lo, value = items
                hi = None
            return ast.RangeAssign(lo, hi, value, _span(file, meta))

        @lark.v_args(meta=True)
        def typed_block(self, meta, items):
            kind, *entries = items
            return ast.TypedBlock(str(kind), _tok_span(file, kind), entries, _span(file, meta))

        def _bin(op):
            @lark.v_args(meta=True)
            def f(self, meta, items):
                left, right = items
                return ast.BinOp(op, left, right, _span(file, meta))

            return f

        add = _bin("+")
        sub = _bin("-")
        mul = _bin("*")
        div = _bin("/")
        floordiv = _bin("//")
        mod = _bin("%")

        @lark.v_args(meta=True)
        def neg(self, meta, items):
            return ast.Neg(items[0], _span(file, meta))

        @lark.v_args(meta=True)
        def quantity(self, meta, items):
            expr, unit = items
            return ast.Quantity(expr, str(unit), _span(file, meta))

        def number(self, items):
            (tok,) = items
            return ast.Num(str(tok), _tok_span(file, tok))

        def name(self, items):
            (tok,) = items
            return ast.Name(str(tok), _tok_span(file, tok))

        def string(self, items):
            (tok,) = items
            return ast.Str(_unescape(tok), _tok_span(file, tok))

        @lark.v_args(meta=True)
        def call(self, meta, items):
            func, *rest = items
            args = [a for a in rest if a is not None and not isinstance(a, ast.KwArg)]
            kwargs = [a for a in rest if isinstance(a, ast.KwArg)]
            return ast.Call(str(func), _tok_span(file, func), args, kwargs, _span(file, meta))

        @lark.v_args(meta=True)
        def kwarg(self, meta, items):
            name, value = items
            return ast.KwArg(str(name), _tok_span(file, name), value, _span(file, meta))

        @lark.v_args(meta=True)
        def tuple(self, meta, items):
            return ast.Tuple([i for i in items if i is not None], _span(file, meta))

        @lark.v_args(meta=True)
        def list(self, meta, items):
            return ast.List([i for i in items if i is not None], _span(file, meta))

    return ToAst()


def _end(node) -> tuple[int, int]:
    span = node.span
    return span.end_line, span.end_col


_TOKEN_WORDS = {
    "LBRACE": "'{'", "RBRACE": "'}'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['",
    "RSQB": "']'", "EQUAL": "'='", "COMMA": "','", "NAME": "a name", "NUMBER": "a number",
    "STRING": "a string", "UNIT": "a unit", "RANGE_DOTS": "'..'", "PLUS": "'+'",
    "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "PERCENT": "'%'", "$END": "end of file",
    "INCLUDE": "'include'", "CONST": "'const'", "__ANON_0": "'//'",
}


def _describe_expected(expected) -> str:
    words = sorted({_TOKEN_WORDS.get(t, t.lower()) for t in expected})
    if len(words) > 6:
        words = words[:6] + ["..."]
    return ", ".join(words)


def _syntax_diagnostic(file: str, source: str, exc) -> Diagnostic:
    import lark

    if isinstance(exc, lark.UnexpectedEOF) or (
        isinstance(exc, lark.UnexpectedToken) and exc.token.type == "$END"
    ):
        lines = source.splitlines() or [""]
        line = len(lines)
        col = len(lines[-1]) + 1
        expected = getattr(exc, "expected", None) or getattr(exc, "accepts", None) or []
        hint = "the file ends in the middle of a block or value"
        if "RBRACE" in expected:
            hint = "a block is not closed: add the missing '}'"
        return Diagnostic(ERROR, "unexpected end of file", Span(file, line, col, line, col + 1),
                          hint, source)
    if isinstance(exc, lark.UnexpectedCharacters):
        ch = source[exc.pos_in_stream] if 0 <= exc.pos_in_stream < len(source) else "?"
        hint = None
        if ch == "'":
            hint = "strings use double quotes"
        elif ch == ":":
            hint = "use '=' between a key and its value"
        elif ch == ";":
            hint = "separate entries with a newline or ','"
        span = Span(file, exc.line, exc.column, exc.line, exc.column + 1)
        return Diagnostic(ERROR, f"unexpected character {ch!r}", span, hint, source)
    if isinstance(exc, lark.UnexpectedToken):
        tok = exc.token
        span = Span(file, tok.line, tok.column, tok.end_line or tok.line,
                    tok.end_column or tok.column + 1)
        expected = exc.accepts or exc.expected or set()
        text = str(tok)
        shown = text if len(text) <= 30 else text[:27] + "..."
        hint = f"expected {_describe_expected(expected)}" if expected else None
        if tok.type == "UNIT":
            hint = f"'{text}' is a unit; it cannot be used as a name"
        return Diagnostic(ERROR, f"unexpected {shown!r}", span, hint, source)
    return Diagnostic(ERROR, f"syntax error: {exc}", Span(file, 1, 1), None, source)


def _check_nesting(file: str, source: str, sink: DiagnosticSink) -> bool:
    depth, line, col = 0, 1, 0
    in_comment = in_string = False
    for ch in source:
        col += 1
        if ch == "\n":
            line, col, in_comment, in_string = line + 1, 0, False, False
            continue
        if in_comment:
            continue
        if in_string:
            in_string = ch != '"'
            continue
        if ch == "#":
            in_comment = True
        elif ch == '"':
            in_string = True
        elif ch in "({[":
            depth += 1
            if depth > MAX_NESTING:
                sink.error(f"nesting deeper than {MAX_NESTING} levels",
                           Span(file, line, col, line, col + 1),
                           "a spec never needs this much nesting; is this the right file?")
                return False
        elif ch in ")}]":
            depth = max(0, depth - 1)
    return True


def decode_source(file: str, data: bytes) -> str:
    """Bytes -> text, or a SpecError saying why it is not a spec."""
    if len(data) > MAX_BYTES:
        raise SpecError([Diagnostic(
            ERROR, f"file is {len(data) / 1e6:.1f} MB; dsvc reads specs of at most "
            f"{MAX_BYTES / 1e6:.0f} MB", Span(file, 0, 0), "is this the right file?")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[: err.start]
        line = before.count(b"\n") + 1
        col = err.start - (before.rfind(b"\n") + 1) + 1
        raise SpecError([Diagnostic(
            ERROR, f"not UTF-8 text (byte 0x{data[err.start]:02x})", Span(file, line, col),
            "a .dsv spec is a UTF-8 text file")]) from None
    if "\x00" in text:
        pos = text.index("\x00")
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        raise SpecError([Diagnostic(ERROR, "NUL byte in file", Span(file, line, col),
                                    "a .dsv spec is a text file; is this a binary file?", text)])
    return text


def parse(source: str, file: str = "<string>") -> ast.File:
    """Parse one file's text. Raises `SpecError` with a diagnostic on a syntax error."""
    import lark

    sink = DiagnosticSink(source)
    if not _check_nesting(file, source, sink):
        sink.raise_if_errors()
    comments: list[ast.Comment] = []

    def on_comment(tok):
        comments.append(ast.Comment(str(tok), tok.line, tok.column, tok.end_column))

    try:
        tree = _lark().parse(source)
    except lark.exceptions.UnexpectedInput as exc:
        raise SpecError([_syntax_diagnostic(file, source, exc)]) from None
    except RecursionError:
        raise SpecError([Diagnostic(ERROR, "expression too deeply nested", Span(file, 1, 1),
                                    None, source)]) from None
    for tok in _lex_comments(source):
        on_comment(tok)
    try:
        items = _make_transformer(file).transform(tree)
    except RecursionError:
        raise SpecError([Diagnostic(ERROR, "expression too deeply nested", Span(file, 1, 1),
                                    None, source)]) from None
    lines = source.count("\n") + 1
    return ast.File(file, items, comments, source, Span(file, 1, 1, lines, 1))


def _lex_comments(source: str):
    """Comments with positions (the parser ignores them; `fmt` keeps them)."""
    return list(_with_ignored(source))


class _Tok(str):
    line: int
    column: int
    end_column: int


def _with_ignored(source: str):
    """Scan comments directly: '#' outside strings to end of line."""
    line = 1
    i = 0
    n = len(source)
    line_start = 0
    in_string = False
    while i < n:
        ch = source[i]
        if ch == "\n":
            line += 1
            line_start = i + 1
            in_string = False
        elif in_string:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "#":
            j = source.find("\n", i)
            j = n if j < 0 else j
            tok = _Tok(source[i:j].rstrip("\r"))
            tok.line = line
            tok.column = i - line_start + 1
            tok.end_column = tok.column + len(tok)
            yield tok
            i = j
            continue
        i += 1
