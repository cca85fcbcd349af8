"""A pydantic-free base for the Spec classes, for processes that only read specs.

Importing pydantic and building the Spec's ~25 models costs several times
Python's own start-up; `dsvc check` must start in about that much. A command
that only reads the Spec (`dsvc check`, `dsvc report`) calls
`dsl.use_light_spec()` before `dsl.spec` is first imported, and `dsl/spec.py`
then builds the *same class bodies* on this base instead of
`pydantic.BaseModel`, so fields, defaults, properties and rules cannot drift
apart. Everywhere else (the compiler, the tests) the Spec is the real pydantic
model.

What this base does: keyword construction with defaults, unknown and missing
fields rejected, frozen instances, equality, `repr`, `model_dump()`,
`model_copy(update=...)`, `model_fields`, and the two coercions pydantic's lax
mode applies to what elaboration produces (an int for a float field becomes a
float, a list for a tuple field becomes a tuple).
It does not validate types: elaboration has already converted every value,
and the test suite runs the same elaboration against the pydantic models
(tests/dsl/test_light_spec.py compares both on every example and error case).
"""

from __future__ import annotations

_MISSING = object()


class FieldInfo:
    __slots__ = ("default", "default_factory", "exclude")

    def __init__(self, default=_MISSING, default_factory=None, exclude=False):
        self.default = default
        self.default_factory = default_factory
        self.exclude = exclude


def Field(default=_MISSING, *, default_factory=None, exclude=False, **_ignored):  # noqa: N802
    """The subset of `pydantic.Field` the Spec uses."""
    return FieldInfo(default, default_factory, exclude)


class _TypeStandIn:
    """Stands in for typing's Literal / Optional / Union: annotations are never evaluated here."""

    def __getitem__(self, item):
        return self


Literal = Optional = Union = _TypeStandIn()  # saves importing typing


def ConfigDict(**kwargs) -> dict:  # noqa: N802 - mirrors pydantic's name
    return dict(kwargs)


class BaseModel:
    """Frozen keyword-constructed record; see the module docstring."""

    __fields: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fields = {}
        for klass in reversed(cls.__mro__):
            for name, annotation in klass.__dict__.get("__annotations__", {}).items():
                if name.startswith("_") or name == "model_config" or "ClassVar" in str(annotation):
                    continue
                default = klass.__dict__.get(name, _MISSING)
                info = default if isinstance(default, FieldInfo) else FieldInfo(default)
                fields[name] = (str(annotation), info)
        cls.__fields = fields
        cls.model_fields = {name: info for name, (_, info) in fields.items()}

    def __init__(self, **values):
        fields = type(self).__fields
        unknown = set(values) - set(fields)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected field(s) {sorted(unknown)}")
        for name, (annotation, info) in fields.items():
            if name in values:
                v = _coerce(annotation, values[name])
            elif info.default_factory is not None:
                v = info.default_factory()
            elif info.default is not _MISSING:
                v = info.default
            else:
                raise TypeError(f"{type(self).__name__}: missing field '{name}'")
            object.__setattr__(self, name, v)

    def __setattr__(self, name, value):
        raise TypeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self):
        return hash((type(self),) + tuple(self.__dict__.values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()
                          if not type(self).__fields[k][1].exclude)
        return f"{type(self).__name__}({inner})"

    def model_copy(self, update: dict | None = None):
        """A copy with some fields replaced (not validated, as in pydantic)."""
        values = dict(self.__dict__)
        values.update(update or {})
        new = object.__new__(type(self))
        for name, value in values.items():
            object.__setattr__(new, name, value)
        return new

    def model_dump(self) -> dict:
        fields = type(self).__fields
        return {k: _dump(v) for k, v in self.__dict__.items() if not fields[k][1].exclude}


def _coerce(annotation: str, v):
    if annotation == "float" and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, list) and "tuple[" in annotation:
        return tuple(v)
    return v


def _dump(v):
    if isinstance(v, BaseModel):
        return v.model_dump()
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_dump(x) for x in v)
    return v
