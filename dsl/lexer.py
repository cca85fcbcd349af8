"""Text -> tokens for the .dsv language, and bytes -> text with a diagnostic when it is not a spec.

The token rules are those of `dsl/grammar.lark` (the normative grammar, which
the tests run through lark and compare against `dsl.parser`). One kind of
word is context-dependent, exactly as under lark's contextual lexer, and is
decided by the parser, not here: a unit (`GB/s`, `TFLOPS`, `s`) is a unit only right
after an operand (`unit_at` matches it on demand at a token's offset).
`include` and `const` are reserved words (their own token kinds).

Comments are collected on the side (the parser ignores them; `dsl.fmt` keeps them).
"""

from __future__ import annotations

import re

from dsvc.dsl.ast import Comment
from dsvc.dsl.diagnostics import ERROR, Diagnostic, Span, SpecError
from dsvc.runtime.inputs import SPEC_BYTES

# specs are small; a bigger file is almost surely not a spec (read under runtime/inputs.py's
# policy, which refuses it before reading)
MAX_BYTES = SPEC_BYTES

# Kinds of token. Punctuation tokens use their own text as their kind.
NAME, NUMBER, DIGIT_WORD, STRING, EOF = "NAME", "NUMBER", "DIGIT_WORD", "STRING", "EOF"
KEYWORDS = ("include", "const")  # reserved: never names

_UNIT_BODY = (r"(?:[KMGTP]i?B/s|[KMGTP]b/s|B/s|[KMGTP]iB|[KMGTP]B|B|[GTP]?FLOPS|ms|us|ns|s|USD)"
              r"(?![A-Za-z0-9_])")
UNIT_RE = re.compile(_UNIT_BODY)

_TOKEN_RE = re.compile(
    r"(?P<ws>[ \t\f\r\n]+)"
    # A line ends at LF, CRLF or a lone CR (classic Mac files): comments and strings stop there.
    r"|(?P<comment>#[^\r\n]*)"
    r'|(?P<string>"(?:[^"\\\r\n]|\\["\\nt])*")'
    # `1f1b` is a word; `80GB` is a number and a unit; `1e5` is a number.
    r"|(?P<digit_word>[0-9]+(?![eE][+-]?[0-9])(?!" + _UNIT_BODY + r")[A-Za-z][A-Za-z0-9_]*)"
    r"|(?P<number>[0-9](?:_?[0-9])*\.[0-9](?:_?[0-9])*(?:[eE][+-]?[0-9]+)?"
    r"|[0-9](?:_?[0-9])*[eE][+-]?[0-9]+|[0-9](?:_?[0-9])*)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<punct>\.\.|//|[{}()\[\]=,+\-*/%])"
)


class Token:
    """One token: kind, text, 1-based line and column (end column exclusive), offset."""

    __slots__ = ("kind", "text", "line", "col", "end_col", "offset")

    def __init__(self, kind: str, text: str, line: int, col: int, offset: int):
        self.kind = kind
        self.text = text
        self.line = line
        self.col = col
        self.end_col = col + len(text)
        self.offset = offset

    def span(self, file: str) -> Span:
        return Span(file, self.line, self.col, self.line, self.end_col)

    def __repr__(self) -> str:
        return f"Token({self.kind}, {self.text!r}, {self.line}:{self.col})"


def tokenize(source: str, file: str) -> tuple[list[Token], list[Comment]]:
    """All tokens (ending with EOF) and all comments. Raises `SpecError` on a bad character."""
    comments: list[Comment] = []
    return list(tokens(source, file, comments)), comments


def tokens(source: str, file: str, comments: list[Comment]):
    """Tokens one at a time, ending with EOF; comments are appended to `comments` as met.

    Lazy, so that a parser that gives up early (too deep nesting) never lexes the rest.
    """
    match = _TOKEN_RE.match
    pos, line, line_start, n = 0, 1, 0, len(source)
    while pos < n:
        m = match(source, pos)
        if m is None:
            raise SpecError([_bad_char(source, file, pos, line, pos - line_start + 1)])
        kind, text = m.lastgroup, m.group()
        col = pos - line_start + 1
        if kind == "ws":
            nl = text.count("\n") + text.count("\r") - text.count("\r\n")
            if nl:
                line += nl
                line_start = pos + max(text.rfind("\n"), text.rfind("\r")) + 1
        elif kind == "comment":
            comments.append(Comment(text, line, col, col + len(text)))
        elif kind == "punct" or (kind == "name" and text in KEYWORDS):
            yield Token(text, text, line, col, pos)
        else:
            yield Token(kind.upper(), text, line, col, pos)
        pos = m.end()
    yield Token(EOF, "", line, pos - line_start + 1, pos)


def unit_at(source: str, offset: int) -> str | None:
    """The unit written at `offset`, if one is."""
    m = UNIT_RE.match(source, offset)
    return m.group() if m else None


def _bad_char(source: str, file: str, pos: int, line: int, col: int) -> Diagnostic:
    ch = source[pos]
    span = Span(file, line, col, line, col + 1)
    if ch == '"':
        end = _LINE_BREAK.search(source, pos)
        rest = source[pos + 1: end.start() if end else len(source)]
        m = re.search(r'\\[^"\\nt]', rest)
        close = re.search(r'(?<!\\)"', rest)
        if m and (close is None or m.start() < close.start()):
            at = col + 1 + m.start()
            return Diagnostic(ERROR, f"unknown escape '{m.group()}' in a string",
                              Span(file, line, at, line, at + 2),
                              'strings allow the escapes \\" \\\\ \\n \\t', source)
        return Diagnostic(ERROR, "string is not closed", span,
                          'a string ends with \'"\' on the line where it starts', source)
    hint = None
    if ch == "'":
        hint = "strings use double quotes"
    elif ch == ":":
        hint = "use '=' between a key and its value"
    elif ch == ";":
        hint = "separate entries with a newline or ','"
    elif ch == ".":
        hint = "a number needs digits on both sides of '.'; a range is written `0..2`"
    shown = ch if ch.isprintable() else f"\\u{ord(ch):04x}"
    return Diagnostic(ERROR, f"unexpected character '{shown}'", span, hint, source)


def decode_source(file: str, data: bytes) -> str:
    """Bytes -> text, or a SpecError saying why it is not a spec."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line, col = _line_col(data[: err.start].decode("utf-8"))
        raise SpecError([Diagnostic(
            ERROR, f"not UTF-8 text (byte 0x{data[err.start]:02x})", Span(file, line, col),
            "a .dsv spec is a UTF-8 text file")]) from None
    if text.startswith("\ufeff"):  # a byte-order mark some editors write
        text = text[1:]
    if "\x00" in text:
        line, col = _line_col(text[: text.index("\x00")])
        raise SpecError([Diagnostic(ERROR, "NUL byte in file", Span(file, line, col),
                                    "a .dsv spec is a text file; is this a binary file?", text)])
    return text


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _line_col(before: str) -> tuple[int, int]:
    """1-based line and column of the position just after `before`, lines as the lexer
    counts them (LF, CRLF or a lone CR)."""
    breaks = list(_LINE_BREAK.finditer(before))
    start = breaks[-1].end() if breaks else 0
    return len(breaks) + 1, len(before) - start + 1
