"""Every cross-field rule, in the order they run: the model's (dsl/rules.py), then the
cluster's, plan's, training's and decoding's (dsl/rules_run.py)."""

from __future__ import annotations

from dsvc.dsl.diagnostics import DiagnosticSink
from dsvc.dsl.rules import MODEL_RULES, RuleSink
from dsvc.dsl.rules_run import RUN_RULES

RULES = MODEL_RULES + RUN_RULES
CODES = tuple(code for rule in RULES for code in rule.codes)


def check(spec, sink: DiagnosticSink) -> None:
    """Run every rule on a Spec; diagnostics carry their code (rendered as `[code]`). A
    `Fragment` (a file of shared blocks, no model) runs the rules whose blocks it has."""
    present = getattr(spec, "blocks", None)
    for rule in RULES:
        if present is None or set(rule.needs or ("model",)) <= present:
            rule.check(spec, RuleSink(sink, rule.codes[0]))
