"""Typed JSON records: one declaration gives the reader, the writer and the docs table.

A record is a frozen dataclass whose fields are declared with `entry(doc, ...)`.
From that one declaration:

- `read(cls, raw, source)` builds an instance from parsed JSON, collecting every
  problem (wrong type, missing key, unknown key with a did-you-mean, value out of
  range or not among the choices) under the key's dotted path, then raises one
  `SchemaError` listing them all;
- `to_json(record)` gives the JSON form back (defaults included, keys sorted by
  the caller's `json.dumps`), so a record written by one side reads back equal on
  the other;
- `field_table(cls)` renders the markdown table that documents the record.

Supported field types: bool, int, float, str, `X | None`, a nested record,
`tuple[T, ...]`, `tuple[T1, T2]`, `dict[str, T]`. A record with a `kind` field may
declare other fields as belonging to some kinds only (`kinds=`): they are unknown
keys for the other kinds. A record class may set `SHORTHAND = "field"` to accept a
bare string for itself (read as `{field: string}`).

Standard library only (`plan.json` is read with it inside a build directory).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from typing import Any

MISSING = dataclasses.MISSING

__all__ = ["MISSING", "SchemaError", "entry", "field_table", "read", "to_json"]


class SchemaError(ValueError):
    """Everything wrong with one document; `problems` holds one line per problem."""

    what = "document"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n  ".join([f"invalid {self.what}:", *self.problems]))


def entry(doc: str, default: Any = MISSING, *, minimum: float | None = None,
          choices: tuple | None = None, kinds: tuple[str, ...] | None = None,
          keys: tuple[str, ...] | None = None, factory: Any = MISSING, required: bool = False):
    """A documented field. `minimum` and `choices` bound its value (each element of a
    tuple, each value of a dict); `keys` bounds a dict's keys; `kinds` limits the field
    to records whose `kind` is one of them, and `required` makes it required there (its
    default then only fills the records of other kinds)."""
    meta = {"doc": doc, "minimum": minimum, "choices": choices, "kinds": kinds, "keys": keys,
            "required": required}
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- reading


def read(cls: type, raw: Any, source: str = "plan"):
    """An instance of record `cls` from parsed JSON; `SchemaError` lists every problem."""
    value, problems = read_partial(cls, raw, source)
    if problems:
        raise SchemaError(problems)
    return value


def read_partial(cls: type, raw: Any, source: str = "plan"):
    """(record or None, problems): the record is built, and can be checked further, when
    the only problems are unknown keys; None when a value is missing or of a wrong type."""
    problems: list[str] = []
    reader = _Reader(source, problems)
    value = reader.record(cls, raw, "")
    return (None if reader.broken else value), problems


class _Reader:
    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        self.broken = 0  # values that could not be read: the result is incomplete

    def error(self, path: str, message: str, broken: bool = True) -> None:
        where = f"{self.source}: {path}" if path else self.source
        self.problems.append(f"{where}: {message}")
        self.broken += broken

    def record(self, cls: type, raw: Any, path: str):
        shorthand = getattr(cls, "SHORTHAND", None)
        if shorthand is not None and isinstance(raw, str):
            raw = {shorthand: raw}
        if not isinstance(raw, dict):
            self.error(path, f"expected an object, got {_json_type(raw)}")
            return None
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = _hints(cls)
        kind = raw.get("kind") if "kind" in fields else None
        allowed = [n for n, f in fields.items()
                   if f.metadata.get("kinds") is None or kind in f.metadata["kinds"]]
        for key in raw:
            if key not in allowed:  # reported, and the record is still built
                hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                scope = f" for kind {kind!r}" if key in fields else ""
                self.error(_join(path, key), f"unknown key{scope}{extra}", broken=False)
        values = {}
        before = self.broken  # an unknown key above does not stop the record
        for name in allowed:
            f = fields[name]
            where = _join(path, name)
            if name in raw:
                values[name] = self.value(hints[name], raw[name], where, f.metadata)
            elif _required(f):
                self.error(where, f"missing (expected {_describe(hints[name])})")
        if self.broken > before:
            return None
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:  # a record's own __post_init__ refusal
            self.error(path, str(err))
            return None

    def value(self, hint: Any, raw: Any, path: str, meta: dict):
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            if raw is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self.value(inner, raw, path, meta)
        if dataclasses.is_dataclass(hint):
            return self.record(hint, raw, path)
        if origin is tuple:
            if not isinstance(raw, list):
                self.error(path, f"expected a list, got {_json_type(raw)}")
                return ()
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.value(args[0], x, f"{path}[{i}]", meta) for i, x in enumerate(raw))
            if len(raw) != len(args):
                self.error(path, f"expected a list of {len(args)}, got {len(raw)} items")
                return ()
            return tuple(self.value(a, x, f"{path}[{i}]", meta)
                         for i, (a, x) in enumerate(zip(args, raw)))
        if origin is dict:
            if not isinstance(raw, dict):
                self.error(path, f"expected an object, got {_json_type(raw)}")
                return {}
            keys = meta.get("keys")
            out = {}
            for key, x in raw.items():
                if keys is not None and key not in keys:
                    self.error(_join(path, key), f"unknown key; one of {', '.join(keys)}")
                    continue
                out[key] = self.value(args[1], x, _join(path, key), meta)
            return out
        return self.scalar(hint, raw, path, meta)

    def scalar(self, hint: Any, raw: Any, path: str, meta: dict):
        if hint is bool:
            ok = isinstance(raw, bool)
        elif hint is int:
            ok = isinstance(raw, int) and not isinstance(raw, bool)
        elif hint is float:
            ok = isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw)
        else:
            ok = isinstance(raw, hint)
        if not ok:
            self.error(path, f"expected {_describe(hint)}, got {raw!r:.60}")
            return None
        choices, minimum = meta.get("choices"), meta.get("minimum")
        if choices is not None and raw not in choices:
            self.error(path, f"expected one of {', '.join(map(str, choices))}, got {raw!r:.60}")
        if minimum is not None and raw < minimum:
            self.error(path, f"must be >= {minimum}, got {raw}")
        return float(raw) if hint is float else raw


def _required(f: dataclasses.Field) -> bool:
    return f.metadata.get("required") or (f.default is MISSING and f.default_factory is MISSING)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _json_type(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false",
            type(None): "null"}.get(type(value), f"a Python {type(value).__name__}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple or origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "an object"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        module = sys.modules[cls.__module__]
        _HINTS[cls] = typing.get_type_hints(cls, vars(module))
    return _HINTS[cls]


# ----------------------------------------------------------------------------- writing


def to_json(value: Any) -> Any:
    """The JSON form of a record (or of a value inside one): objects, lists, scalars."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            if not f.init:
                continue
            kinds = f.metadata.get("kinds")
            if kinds is not None and getattr(value, "kind", None) not in kinds:
                continue
            out[f.name] = to_json(getattr(value, f.name))
        return out
    if isinstance(value, (tuple, list)):
        return [to_json(x) for x in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- docs


def field_table(cls: type, kind: str | None = None) -> str:
    """The markdown table of a record's fields: key, type, default, meaning."""
    hints = _hints(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        kinds = f.metadata.get("kinds")
        if not f.init or (kind is not None and kinds is not None and kind not in kinds):
            continue
        meta = f.metadata
        kind_note = f" ({', '.join(kinds)} only)" if kinds and kind is None else ""
        rows.append(f"| `{f.name}` | {_type_cell(hints[f.name], meta)} | {_default_cell(f)} | "
                    f"{meta.get('doc', '')}{kind_note} |")
    return "\n".join(rows) + "\n"


def _type_cell(hint: Any, meta: dict) -> str:
    choices = meta.get("choices")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _type_cell(inner[0], meta) + " or null"
    if choices is not None and origin is None:
        return ", ".join(f"`{c}`" for c in choices)
    if dataclasses.is_dataclass(hint):
        short = getattr(hint, "SHORTHAND", None)
        return f"{hint.__name__}" + (" (or a string)" if short else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_cell(args[0], meta)}"
        return "[" + ", ".join(_type_cell(a, {}) for a in args) + "]"
    if origin is dict:
        return f"{{name: {_type_cell(args[1], meta)}}}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(hint, str(hint))


def _default_cell(f: dataclasses.Field) -> str:
    if _required(f):
        return "required"
    if f.default is not MISSING:
        if f.default is None:
            return "none"
        if f.default == ():
            return "empty"
        return f"`{to_json(f.default)}`".replace("True", "true").replace("False", "false")
    if f.default_factory is not MISSING:
        made = f.default_factory()
        if dataclasses.is_dataclass(made):
            return "its defaults"
        return "empty" if not made else f"`{to_json(made)}`"
    return "required"
