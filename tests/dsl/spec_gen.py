"""Random .dsv-like text for property tests: grammar-directed, then optionally mutated.

Driven by a `random.Random` (hypothesis supplies one via `st.randoms()`), so
most outputs parse and the rest fail in interesting places: units next to
names, reserved words, trailing commas, nested typed blocks, comments and
blank lines everywhere.
"""

from __future__ import annotations

import random

NAMES = ["a", "model", "x", "s", "GB", "ms", "B", "const", "include", "k1", "_z", "layers"]
NUMBERS = ["1", "80", "1.5", "1e-6", "129_280", "0", "2.5e3"]
UNITS = [" GB", " GB/s", "GB", "  s", " TFLOPS", " Gb/s", " us"]
SEPARATORS = ["\n", ", ", " ", "\n\n", "  # c\n", "\n  # own line\n"]


def atom(r: random.Random, d: int) -> str:
    c = r.randint(0, 9 if d < 3 else 4)
    if c == 0:
        return r.choice(NUMBERS)
    if c == 1:
        return r.choice(NAMES)
    if c == 2:
        return r.choice(["1f1b", "2x"])
    if c == 3:
        return r.choice(['"p"', '"a\\"b"', '"c.dsv"'])
    if c == 4:
        return atom(r, d + 1) + r.choice(UNITS)
    if c == 5:
        args = ", ".join(arg(r, d + 1) for _ in range(r.randint(0, 3)))
        return r.choice(NAMES) + "(" + args + r.choice(["", ","]) + ")"
    if c == 6:
        return "(" + expr(r, d + 1) + ")"
    if c == 7:
        return "(" + ", ".join(expr(r, d + 1) for _ in range(r.randint(1, 3))) + ",)"
    if c == 8:
        return "[" + ", ".join(expr(r, d + 1) for _ in range(r.randint(0, 3))) + "]"
    return "-" + atom(r, d + 1)


def arg(r: random.Random, d: int) -> str:
    return (r.choice(NAMES) + " = " if r.random() < 0.4 else "") + expr(r, d)


def expr(r: random.Random, d: int = 0) -> str:
    e = atom(r, d)
    for _ in range(r.randint(0, 2)):
        e += " " + r.choice(["+", "-", "*", "/", "//", "%"]) + " " + atom(r, d + 1)
    return e


def entries(r: random.Random, d: int) -> str:
    out = []
    for _ in range(r.randint(0, 4)):
        c = r.randint(0, 5)
        sep = r.choice(SEPARATORS)
        if c <= 1:
            out.append(r.choice(NAMES) + " = " + expr(r) + sep)
        elif c == 2 and d < 3:
            out.append(r.choice(NAMES) + " = " + r.choice(NAMES) + " { " + entries(r, d + 1) + "}"
                       + sep)
        elif c == 3 and d < 3:
            out.append(r.choice(NAMES) + r.choice(["", " lbl"]) + " {\n" + entries(r, d + 1) + "}"
                       + sep)
        elif c == 4:
            out.append(expr(r) + r.choice(["", " .. " + expr(r)]) + " = " + expr(r) + sep)
        else:
            out.append("const " + r.choice(NAMES) + " = " + expr(r) + sep)
    return "".join(out)


def spec(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(1, 4)):
        c = r.randint(0, 5)
        if c == 0:
            out.append('include "x.dsv"\n')
        elif c == 1:
            out.append("const " + r.choice(NAMES) + " = " + expr(r) + "\n")
        elif c == 2:
            out.append("# a comment\n\n")
        else:
            out.append(r.choice(NAMES) + r.choice(["", " m"]) + " {\n" + entries(r, 0) + "}\n")
    return "".join(out)


def mutate(r: random.Random, s: str) -> str:
    """Delete, insert or move a few characters."""
    if not s:
        return s
    k = r.randint(0, 2)
    i = r.randrange(len(s))
    j = min(len(s), i + r.randint(1, 6))
    if k == 0:
        return s[:i] + s[j:]
    if k == 1:
        return s[:i] + r.choice(["{", "}", "(", ")", "=", ",", "..", "-", " GB", "s", "\n", '"',
                                 "#"]) + s[i:]
    return s[:i] + s[j:] + s[i:j]
