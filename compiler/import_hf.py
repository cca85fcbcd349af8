"""`dsvc import-hf`: a Hugging Face `config.json` -> a .dsv model block.

Model types: DeepSeek-V3 and -V2 (MLA, MoE with shared experts, group-limited
routing, MTP) and LLaMA / Qwen2 (grouped-query attention, dense SwiGLU). The
config is read by dsvc's one reader of the format, `dsvc.runtime.hf_config`
(transformers 4 and 5 layouts alike, each model type's transformers defaults for
what the file omits); this module writes the spec from what it read: numbers and
a sanitised name only, layer ranges one line per run of equal layers, formatted
by `dsl.fmt` and checked by `dsl.loads`. Every diagnostic points into the JSON
the user gave, at the key that caused it (`config.json:12:3: error:
num_hidden_layers: ...`), also those the spec's own check finds. Values a
config.json does not carry (the MTP loss weight, the bias update rate of
auxiliary-loss-free balancing) come from the DeepSeek-V3 report and say so in
comments; keys dsvc does not model are notes; keys without model meaning are
ignored (docs/hf.md lists them).
"""

from __future__ import annotations

import keyword
import os
import re

from dsvc.compiler import import_hf_spec as W
from dsvc.dsl.diagnostics import Diagnostic, DiagnosticSink, Span, SpecError
from dsvc.runtime.hf_config import HFConfig, read_hf_config
from dsvc.runtime.inputs import InputError, parse_json

RESERVED = {"include", "const", "true", "false"}


def import_config(text: str, file: str = "config.json", name: str | None = None):
    """(.dsv text, notes) for the config.json text `text`. Raises `SpecError` whose
    diagnostics point into `text` (under the name `file`)."""
    sink = DiagnosticSink(text, {file: text})
    try:
        cfg = parse_json(text, file)
    except InputError as err:
        m = re.search(r"at line (\d+), column (\d+)", err.reason)
        line, col = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
        sink.error(err.reason, Span(file, line, col, line, col + 1))
        sink.raise_if_errors()
    if not isinstance(cfg, dict):
        sink.error("a config.json holds one JSON object `{...}`", Span(file, 1, 1))
        sink.raise_if_errors()
    read = read_hf_config(cfg)
    where = _Locator(text, file)
    for path, message in read.problems:
        sink.error(f"{path}: {message}", where(path), _hint(read, path))
    sink.raise_if_errors()
    spec = W.SpecWriter(read)
    body = spec.model_lines()
    for path, message in spec.problems:
        sink.error(f"{path}: {message}", where(path))
    sink.raise_if_errors()
    label = sanitize_name(name or _name_from(cfg, file) or read.model_type)
    notes = [f"{path}: {message}" for path, message in read.notes + spec.notes]
    head = [(f"# Imported by `dsvc import-hf` from {os.path.basename(file)} "
             f"(model_type {read.model_type})."),
            "# A model block only: add precision, cluster, parallel and train blocks to plan a run",
            "# (examples/deepseek_v3.dsv has all of them)."]
    head += [f"# note: {n}" for n in notes]
    source = "\n".join(head) + f"\n\nmodel {label} {{\n" + "\n".join(body) + "\n}\n"
    from dsvc.dsl.formatter import format_source

    out = format_source(source, file)
    notes += _check(out, file, label, spec.origins, where, sink)
    return out, notes


def _check(out: str, file: str, label: str, origins: dict, where, sink) -> list[str]:
    """Check the generated spec with dsl's own rules and limits; its problems are raised as
    diagnostics at the config keys the offending values came from, its warnings returned
    as notes (the generated text exists nowhere on disk to point into)."""
    from dsvc import dsl
    from dsvc.dsl import parser

    generated = os.path.join(os.path.dirname(file), f"{label}.dsv")
    try:
        _, warnings = dsl.loads_with_warnings(out, filename=generated)
    except SpecError as err:
        tree = parser.parse(out, generated)
        for d in err.diagnostics:
            path = W.origin_of(tree, d.span, origins)
            sink.add(Diagnostic(d.severity, f"{path}: {d.message}", where(path), d.hint,
                                sink.sources.get(file), d.code))
        sink.raise_if_errors()
        return []
    tree = parser.parse(out, generated)
    return [f"{W.origin_of(tree, w.span, origins)}: {w.message}" for w in warnings]


def _hint(read: HFConfig, path: str) -> str | None:
    if path == "model_type":
        return "dsvc imports DeepSeek-V2/V3 (MLA + MoE) and LLaMA/Qwen2 (GQA, dense) configs"
    if path in read.values and path not in read.given:
        return f"config.json has no '{path}' and transformers' {read.model_type} default is null"
    return None


class _Locator:
    """The span of a key path (`rope_parameters.factor`) in the config's JSON text: the key's
    quoted name, found after its parent's; the file's start where the key is not written."""

    def __init__(self, text: str, file: str):
        self.text, self.file = text, file

    def __call__(self, path: str) -> Span:
        pos, found = 0, None
        for part in path.split("."):
            m = re.compile(r'"' + re.escape(part) + r'"\s*:').search(self.text, pos)
            if m is None:
                break
            found, pos = m, m.end()
        if found is None:
            return Span(self.file, 1, 1)
        start = found.start()
        line = self.text.count("\n", 0, start) + 1
        col = start - (self.text.rfind("\n", 0, start) + 1) + 1
        return Span(self.file, line, col, line, col + len(path.rsplit(".", 1)[-1]) + 2)


def sanitize_name(raw: str) -> str:
    """A name usable in .dsv and as a Python identifier: `DeepSeek-V3` -> `deepseek_v3`."""
    word = re.sub(r"[^a-z0-9_]+", "_", str(raw).rsplit("/", 1)[-1].lower())
    word = re.sub(r"_+", "_", word).strip("_") or "model"
    if word[0].isdigit():
        word = "m_" + word
    if keyword.iskeyword(word) or word in RESERVED:
        word += "_model"
    return word


def _name_from(cfg: dict, file: str) -> str | None:
    given = cfg.get("_name_or_path")
    if isinstance(given, str) and given.strip():
        return given
    stem = os.path.splitext(os.path.basename(file))[0]
    return None if stem in ("config", "") else stem
