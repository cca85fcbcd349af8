"""`dsvc fmt`: the canonical layout of a .dsv file, from its syntax tree, comments kept.

Layout rules (docs/language.md, "Formatting"):

- two-space indent, one entry per line, `key = value`;
- a typed block value (`gpu = h800 { ... }`) goes on one line, `{ a = 1, b = 2 }`,
  when its entries are plain `key = value`s, it has no comments inside and the
  line fits in `WIDTH` columns; so does a nested block (`mtp { ... }`) that also
  has at most `INLINE_MAX_ENTRIES` entries; top-level blocks and `layers` are
  always one entry per line;
- entries are separated by newlines alone, except where the next entry would
  otherwise extend the previous value (`x = 1, B = 2`: `B` is a unit);
- values are printed on one line, numbers exactly as written, one space around
  operators and `=`, `400 GB/s` with a space before the unit;
- one blank line between top-level items (consecutive `include`s or `const`s
  keep the source's choice); blank lines between entries collapse to one and
  none follow `{` or precede `}`;
- comments are kept: one on its own line stays before the entry that follows it
  (or before `}`), one after an entry stays after it on the same line, one
  inside a value written over several lines moves before that entry.

Formatting is idempotent and changes no meaning: the tests parse the output
again and require the same tree (up to positions) and the same comments.
"""

from __future__ import annotations

import bisect

from dsvc.dsl import ast, parser
from dsvc.dsl.diagnostics import ERROR, Diagnostic, Span, SpecError
from dsvc.dsl.lexer import unit_at

WIDTH = 100
INDENT = "  "
INLINE_MAX_ENTRIES = 3  # for nested blocks; a typed block has no limit

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2}
_NEG, _QTY, _ATOM = 3, 4, 5


def format_source(source: str, file: str = "<string>") -> str:
    """The canonical text of `source`. Raises `SpecError` if it does not parse."""
    tree = parser.parse(source, file)
    try:
        return _Formatter(tree).run()
    except RecursionError:  # the parser bounds nesting; this is a last resort
        raise SpecError([Diagnostic(ERROR, "too deeply nested to format", Span(file, 1, 1),
                                    None, source)]) from None


# ----------------------------------------------------------------------------- expressions


def expr_text(e) -> str:
    """One expression on one line, with the parentheses its precedence needs."""
    if isinstance(e, ast.Num):
        return e.text
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Str):
        return quote(e.value)
    if isinstance(e, ast.BinOp):
        p = _PREC[e.op]
        left = _wrap(e.left, _prec(e.left) < p)
        right = _wrap(e.right, _prec(e.right) <= p)
        return f"{left} {e.op} {right}"
    if isinstance(e, ast.Neg):
        return "-" + _wrap(e.operand, _prec(e.operand) < _NEG)
    if isinstance(e, ast.Quantity):
        return f"{_wrap(e.expr, _prec(e.expr) < _ATOM)} {e.unit}"
    if isinstance(e, ast.Call):
        args = [expr_text(a) for a in e.args]
        args += [f"{k.name} = {expr_text(k.value)}" for k in e.kwargs]
        return f"{e.func}({', '.join(args)})"
    if isinstance(e, ast.Tuple):
        items = [expr_text(i) for i in e.items]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(e, ast.List):
        return f"[{', '.join(expr_text(i) for i in e.items)}]"
    raise AssertionError(f"not an expression: {type(e).__name__}")


def quote(value: str) -> str:
    """A string literal for `value`, with the grammar's four escapes."""
    body = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            .replace("\t", "\\t"))
    return f'"{body}"'


def _prec(e) -> int:
    if isinstance(e, ast.BinOp):
        return _PREC[e.op]
    if isinstance(e, ast.Neg):
        return _NEG
    if isinstance(e, ast.Quantity):
        return _QTY
    return _ATOM


def _ends_in_operand(entry) -> bool:
    """Does this entry end with an expression (rather than `}`)?"""
    return isinstance(entry, (ast.Assign, ast.RangeAssign, ast.Const)) \
        and not isinstance(entry.value, ast.TypedBlock)


def _first_text(entry) -> str:
    if isinstance(entry, ast.Assign):
        return entry.key
    if isinstance(entry, ast.Block):
        return entry.kind
    if isinstance(entry, ast.Const):
        return "const"
    return expr_text(entry.lo)


def _would_continue(text: str) -> bool:
    """Would `text`, right after an operand, be read as part of that operand's expression?"""
    return text[:1] in ("-", "(") or unit_at(text, 0) is not None


def _wrap(e, parens: bool) -> str:
    text = expr_text(e)
    return f"({text})" if parens else text


# ----------------------------------------------------------------------------- layout

_TRAIL = "\0"  # marks where a trailing comment starts in an output line, until alignment


def _align_comments(lines: list[str]) -> list[str]:
    """Trailing comments of consecutive lines at one indent start in one column (as gofmt)."""
    out, run = [], []

    def flush():
        width = max(len(code) for code, _ in run)
        for code, comment in run:
            out.append(f"{code.ljust(width)}  {comment}")
        run.clear()

    for line in lines:
        code, sep, comment = line.partition(_TRAIL)
        indent = len(code) - len(code.lstrip(" "))
        if run and (not sep or indent != len(run[0][0]) - len(run[0][0].lstrip(" "))):
            flush()
        if sep:
            run.append((code, comment))
        else:
            out.append(line)
    if run:
        flush()
    return out



class _Formatter:
    def __init__(self, tree: ast.File):
        self.tree = tree
        self.lines = tree.source.split("\n")
        self.comments = {c.line: c for c in tree.comments}  # at most one per line
        self.pending = sorted(self.comments)  # lines of the comments not yet placed
        self.out: list[str] = []

    # -- comments and blank lines of the source

    def take(self, lo: int, hi: int) -> list:
        """The comments not yet placed on source lines lo..hi (inclusive), in order; places them."""
        i, j = bisect.bisect_left(self.pending, lo), bisect.bisect_right(self.pending, hi)
        found = [self.comments.pop(n) for n in self.pending[i:j]]
        del self.pending[i:j]
        return found

    def has_comments(self, lo: int, hi: int) -> bool:
        return bisect.bisect_left(self.pending, lo) < bisect.bisect_right(self.pending, hi)

    def trailing(self, line: int) -> str:
        found = self.take(line, line)
        return f"{_TRAIL}{found[0].text.rstrip()}" if found else ""

    def blank_between(self, a: int, b: int) -> bool:
        """Is some source line strictly between lines a and b blank?"""
        return any(not self.lines[n - 1].strip() for n in range(max(a + 1, 1),
                                                                min(b, len(self.lines) + 1)))

    def emit_comments(self, comments: list, indent: str) -> int | None:
        """Own-line comments, keeping (collapsed) blank lines between them; the last one's line."""
        prev = None
        for c in comments:
            if prev is not None and self.blank_between(prev, c.line):
                self.out.append("")
            self.out.append(indent + c.text.rstrip())
            prev = c.line
        return prev

    def lead_in(self, comments: list, first: int, blank_before: bool, indent: str) -> None:
        """The comments before an entry or item, with the blank lines around them."""
        if blank_before:
            self.out.append("")
        last = self.emit_comments(comments, indent)
        if last is not None and self.blank_between(last, first):
            self.out.append("")

    # -- file

    def run(self) -> str:
        prev, prev_line = None, 0
        for item in self.tree.items:
            first = item.span.line
            lead = self.take(prev_line + 1, first - 1)
            blank = False
            if prev is not None:
                same = type(prev) is type(item) and isinstance(item, (ast.Include, ast.Const))
                blank = not same or self.blank_between(prev_line, lead[0].line if lead else first)
            self.lead_in(lead, first, blank, "")
            self.item(item)
            prev, prev_line = item, item.span.end_line
        rest = self.take(prev_line + 1, len(self.lines) + 1)
        self.lead_in(rest, len(self.lines) + 1,
                     bool(rest and self.out and self.blank_between(prev_line, rest[0].line)), "")
        if self.comments:  # every comment has a place; this guards against our own bug
            raise AssertionError(f"comments not placed: {sorted(self.comments)}")
        while self.out and self.out[-1] == "":
            self.out.pop()
        return "\n".join(_align_comments(self.out)) + "\n" if self.out else ""

    def item(self, item) -> None:
        if isinstance(item, ast.Include):
            self.out.append(f"include {quote(item.path)}" + self.trailing(item.span.end_line))
        elif isinstance(item, ast.Const):
            self.const(item, "")
        else:
            self.block(item, "", top=True)

    def const(self, c, indent: str) -> None:
        first, last = c.span.line, c.span.end_line
        self.emit_comments(self.take(first, last - 1), indent)
        self.out.append(f"{indent}const {c.name} = {expr_text(c.value)}" + self.trailing(last))

    # -- blocks

    def block(self, b, indent: str, top: bool = False, prefix: str = "") -> None:
        """A block (or typed block value, after `prefix` such as `gpu = `)."""
        labelled = isinstance(b, ast.Block) and b.label is not None
        head = prefix + (f"{b.kind} {b.label}" if labelled else b.kind)
        first, last = b.span.line, b.span.end_line
        if not top and self.inline_ok(b, indent, head):
            inner = ", ".join(self.entry_text(e) for e in b.entries)
            body = f" {inner} " if inner else ""
            self.out.append(f"{indent}{head} {{{body}}}" + self.trailing(last))
            return
        if not b.entries and not self.has_comments(first, last - 1):
            self.out.append(f"{indent}{head} {{}}" + self.trailing(last))
            return
        header = ""
        if last > first and not (b.entries and b.entries[0].span.line == first):
            header = self.trailing(first)
        self.out.append(f"{indent}{head} {{" + header)
        self.body(b.entries, first, last, indent + INDENT)
        self.out.append(f"{indent}}}" + self.trailing(last))

    def inline_ok(self, b, indent: str, head: str) -> bool:
        if isinstance(b, ast.Block) and (len(b.entries) > INLINE_MAX_ENTRIES
                                         or b.kind == "layers"):
            return False
        if any(not isinstance(e, ast.Assign) or isinstance(e.value, ast.TypedBlock)
               for e in b.entries):
            return False
        if self.has_comments(b.span.line, b.span.end_line - 1):
            return False
        inner = ", ".join(self.entry_text(e) for e in b.entries)
        return len(f"{indent}{head} {{ {inner} }}") <= WIDTH

    def entry_text(self, e) -> str:
        return f"{e.key} = {expr_text(e.value)}"

    def body(self, entries: list, first: int, last: int, indent: str) -> None:
        prev_line = first
        prev_at = None  # index in self.out of the previous entry's last line
        for i, e in enumerate(entries):
            if prev_at is not None and _ends_in_operand(entries[i - 1]) \
                    and _would_continue(_first_text(e)):
                # Without the comma the next entry would extend the previous value
                # (`x = 1, B = 2`: B is a unit; `x = a, -1 = y`: a subtraction).
                code, sep, comment = self.out[prev_at].partition(_TRAIL)
                self.out[prev_at] = code + "," + sep + comment
            lead = self.take(prev_line + 1, e.span.line - 1)
            start = lead[0].line if lead else e.span.line
            self.lead_in(lead, e.span.line, i > 0 and self.blank_between(prev_line, start), indent)
            shares_line = i + 1 < len(entries) and entries[i + 1].span.line == e.span.end_line
            self.entry(e, indent, shares_line)
            prev_at = len(self.out) - 1
            prev_line = e.span.end_line
        rest = self.take(prev_line + 1, last - 1)
        blank = bool(rest and entries and self.blank_between(prev_line, rest[0].line))
        if blank:
            self.out.append("")
        self.emit_comments(rest, indent)

    def entry(self, e, indent: str, shares_line: bool) -> None:
        """One entry; `shares_line`: the next entry starts on this one's last line, so a
        comment at the end of that line belongs to the next one."""
        first, last = e.span.line, e.span.end_line
        if isinstance(e, ast.Block):
            self.block(e, indent)
            return
        if isinstance(e, ast.Const):
            self.const(e, indent)
            return
        if isinstance(e, ast.Assign):
            lhs = f"{e.key} = "
        else:
            lhs = expr_text(e.lo) + ("" if e.hi is None else ".." + expr_text(e.hi)) + " = "
        if isinstance(e.value, ast.TypedBlock):
            self.emit_comments(self.take(first, e.value.span.line - 1), indent)
            self.block(e.value, indent, prefix=lhs)
            return
        self.emit_comments(self.take(first, last - 1), indent)
        tail = "" if shares_line else self.trailing(last)
        self.out.append(f"{indent}{lhs}{expr_text(e.value)}" + tail)
