"""The versioned schema of `dsvc report --json`, as pydantic models built from the report's
own tables (`report.SCHEMA`, `SCHEMA_VERSION`, `SECTIONS`, `REQUIRED`): no second list.

`report_document()` is the model of one report; its JSON Schema (`json_schema()`) is
published as docs/report.schema.json (a test keeps the file current; `python -m
dsvc.compiler.report_schema` prints it). Every key of `REQUIRED` is required in its section, as a
number, a boolean or null; a section may hold more figures (adding keys keeps the
version). Consumers that want to check a report validate it with the published schema;
the tests validate every example's report with the model.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from dsvc.compiler.report import REQUIRED, SCHEMA, SCHEMA_VERSION, SECTIONS

Scalar = float | bool | None


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class Symbol(BaseModel):
    """A base symbol of a `--symbolic` report."""

    model_config = ConfigDict(extra="forbid")
    value: Any
    path: str
    source: str | None = None


class DerivedSymbol(BaseModel):
    model_config = ConfigDict(extra="forbid")
    formula: str
    value: Any
    meaning: str


def _section(name: str) -> type[BaseModel]:
    fields = {key.partition(".")[2]: (Scalar, Field(description=f"{label} [{unit}]"))
              for key, (label, unit) in REQUIRED.items() if key.partition(".")[0] == name}
    return create_model(f"{name.capitalize()}Section", __base__=_Section, **fields)


@functools.cache
def report_document() -> type[BaseModel]:
    """The pydantic model of one `dsvc report --json` document."""
    sections = {name: (_section(name), Field(description=f"the {name} figures"))
                for name in SECTIONS}
    return create_model(
        "ReportDocument",
        __config__=ConfigDict(extra="forbid", title=f"{SCHEMA} version {SCHEMA_VERSION}"),
        schema_=(Literal[SCHEMA], Field(alias="schema")),
        version=(Literal[SCHEMA_VERSION], ...),
        spec=(str, Field(description="the spec file, as given")),
        model_name=(str, ...),
        notes=(list[str], Field(description="what the report assumed or could not compute")),
        formulas=(dict[str, str] | None, Field(None, description="--symbolic: key -> formula")),
        symbols=(dict[str, Symbol] | None, Field(None, description="--symbolic: base symbols")),
        derived=(dict[str, DerivedSymbol] | None, Field(None, description="--symbolic")),
        **sections,
    )


def validate_report(document: dict) -> None:
    """Raise pydantic's ValidationError where `document` breaks the schema."""
    report_document().model_validate(document)


def json_schema() -> dict:
    """The JSON Schema published as docs/report.schema.json."""
    return report_document().model_json_schema(by_alias=True)


if __name__ == "__main__":
    import json

    print(json.dumps(json_schema(), indent=1, sort_keys=True))
