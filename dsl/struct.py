"""Small records (slots, keyword or positional construction, equality, repr) for `dsl`.

`dataclasses` imports `inspect` and generates code per class, which together
cost `dsvc check` about a third of Python's own start-up; the language's
~30 small record types use this base instead. Subclasses list their fields in
`_fields` (with defaults for trailing ones in `_defaults`) and set
`__slots__ = _fields`; a `Frozen` subclass cannot be changed after construction.
"""

from __future__ import annotations


class Struct:
    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _defaults: dict = {}
    _compare: tuple[str, ...] | None = None  # fields that take part in ==, hash and order

    def __init__(self, *args, **kwargs):
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__} takes {len(fields)} fields, got {len(args)}")
        setter = object.__setattr__
        for name, value in zip(fields, args):
            setter(self, name, value)
        for name in fields[len(args):]:
            if name in kwargs:
                setter(self, name, kwargs.pop(name))
            elif name in self._defaults:
                setter(self, name, self._defaults[name])
            else:
                raise TypeError(f"{type(self).__name__} is missing '{name}'")
        if kwargs:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(kwargs)}")

    def _key(self) -> tuple:
        return tuple(getattr(self, f) for f in (self._compare or self._fields))

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({inner})"

    __hash__ = None  # mutable by default


class Frozen(Struct):
    __slots__ = ()

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __hash__(self):
        return hash((type(self).__name__,) + self._key())

    def replace(self, **changes):
        """A copy with some fields changed (like `dataclasses.replace`)."""
        values = {f: getattr(self, f) for f in self._fields}
        values.update(changes)
        return type(self)(**values)
