"""Mutated examples: every outcome is a Spec or a SpecError whose diagnostics point inside files."""

from __future__ import annotations

import pathlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsvc import dsl
from dsvc.dsl import parser
from dsvc.dsl.lexer import tokenize
from tests.dsl.helpers import assert_valid_diagnostics

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = {p: p.read_text() for p in sorted((ROOT / "examples").glob("*.dsv"))}
TOKENS = ["{", "}", "(", ")", "[", "]", "=", ",", "..", "-", "*", "//", "GB/s", "TFLOPS", "s",
          "include", "const", "model", "layers", "block(mla, moe)", '"x.dsv"', "0", "-1",
          "1e309", "99999999999999999999999999999999", "#", "\n", "mla", "true", "1f1b", "\t",
          "kind = mlx\n", "kind = moe\n", "x = y {}\n", "nvlink {}\n", "0 = block(mla, moe)\n"]


def outcome(path: pathlib.Path, data: bytes) -> None:
    try:
        text = parser.decode_source(str(path), data)
        spec = dsl.loads(text, filename=str(path))
        assert spec is not None and spec.model.num_layers >= 1
    except dsl.SpecError as err:
        assert_valid_diagnostics(err, {str(path): data.decode("utf-8", errors="replace")})


@st.composite
def mutated(draw):
    path = draw(st.sampled_from(sorted(EXAMPLES)))
    text = EXAMPLES[path]
    kind = draw(st.sampled_from(["delete_lines", "swap_tokens", "insert_token", "random_bytes"]))
    if kind == "delete_lines":
        lines = text.split("\n")
        i = draw(st.integers(0, len(lines) - 1))
        n = draw(st.integers(1, 4))
        return path, "\n".join(lines[:i] + lines[i + n:]).encode()
    if kind == "random_bytes":
        data = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data)))
            data[i:i + draw(st.integers(0, 2))] = draw(st.binary(min_size=1, max_size=4))
        return path, bytes(data)
    toks = [t for t in tokenize(text, str(path))[0] if t.kind != "EOF"]
    if kind == "swap_tokens":
        i, j = sorted(draw(st.lists(st.integers(0, len(toks) - 1), min_size=2, max_size=2)))
        a, b = toks[i], toks[j]
        text = (text[:a.offset] + b.text + text[a.offset + len(a.text):b.offset] + a.text
                + text[b.offset + len(b.text):]) if i != j else text
        return path, text.encode()
    at = draw(st.sampled_from(toks)).offset
    return path, (text[:at] + draw(st.sampled_from(TOKENS)) + " " + text[at:]).encode()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_examples_give_a_spec_or_diagnostics(case):
    path, data = case
    outcome(path, data)
