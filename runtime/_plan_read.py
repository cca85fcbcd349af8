"""Typed, error-collecting access to the plan's JSON (used by `plan.py`).

Every getter records a problem under the key's dotted path and returns a
harmless default, so one pass over a bad plan reports all of its problems.
"""

from __future__ import annotations

from typing import Any

_MISSING = object()


class PlanError(ValueError):
    """A plan that cannot be executed; `problems` lists every reason, one a line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid plan:\n  " + "\n  ".join(self.problems))


class Reader:
    def __init__(self, source: str):
        self.source = source
        self.problems: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.problems.append(
            f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}"
        )

    def raise_if_errors(self) -> None:
        if self.problems:
            raise PlanError(self.problems)

    # -- containers -------------------------------------------------------------------
    def obj(self, d: Any, key: str, where: str, required: bool = True) -> dict:
        value = d.get(key, _MISSING) if isinstance(d, dict) else _MISSING
        path = f"{where}.{key}" if where else key
        if value is _MISSING or value is None:
            if required:
                self.error(path, "missing (expected an object)")
            return {}
        if not isinstance(value, dict):
            self.error(path, f"expected an object, got {type(value).__name__}")
            return {}
        return value

    def arr(self, d: Any, key: str, where: str, required: bool = True) -> list:
        value = d.get(key, _MISSING) if isinstance(d, dict) else _MISSING
        path = f"{where}.{key}" if where else key
        if value is _MISSING or value is None:
            if required:
                self.error(path, "missing (expected a list)")
            return []
        if not isinstance(value, list):
            self.error(path, f"expected a list, got {type(value).__name__}")
            return []
        return value

    # -- scalars ----------------------------------------------------------------------
    def int_(
        self, d: Any, key: str, where: str, default: Any = _MISSING, minimum: int | None = None
    ) -> int:
        value = d.get(key, _MISSING) if isinstance(d, dict) else _MISSING
        path = f"{where}.{key}" if where else key
        if value is _MISSING:
            if default is _MISSING:
                self.error(path, "missing (expected an integer)")
                return 0
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"expected an integer, got {value!r}")
            return 0 if default is _MISSING else default
        if minimum is not None and value < minimum:
            self.error(path, f"must be >= {minimum}, got {value}")
        return value

    def num(
        self, d: Any, key: str, where: str, default: Any = _MISSING, minimum: float | None = None
    ) -> float:
        value = d.get(key, _MISSING) if isinstance(d, dict) else _MISSING
        path = f"{where}.{key}" if where else key
        if value is _MISSING:
            if default is _MISSING:
                self.error(path, "missing (expected a number)")
                return 0.0
            return float(default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(path, f"expected a number, got {value!r}")
            return 0.0
        if minimum is not None and value < minimum:
            self.error(path, f"must be >= {minimum}, got {value}")
        return float(value)

    def bool_(self, d: Any, key: str, where: str, default: Any = _MISSING) -> bool:
        value = d.get(key, _MISSING) if isinstance(d, dict) else _MISSING
        path = f"{where}.{key}" if where else key
        if value is _MISSING:
            if default is _MISSING:
                self.error(path, "missing (expected true or false)")
                return False
            return default
        if not isinstance(value, bool):
            self.error(path, f"expected true or false, got {value!r}")
            return False
        return value

    def choice(
        self, d: Any, key: str, where: str, choices: tuple[str, ...], default: Any = _MISSING
    ) -> str:
        value = d.get(key, _MISSING) if isinstance(d, dict) else _MISSING
        path = f"{where}.{key}" if where else key
        if value is _MISSING:
            if default is _MISSING:
                self.error(path, f"missing (expected one of {', '.join(choices)})")
                return choices[0]
            return default
        if value not in choices:
            self.error(path, f"expected one of {', '.join(choices)}, got {value!r}")
            return choices[0]
        return value

    def str_(self, d: Any, key: str, where: str, default: Any = _MISSING) -> str:
        value = d.get(key, _MISSING) if isinstance(d, dict) else _MISSING
        path = f"{where}.{key}" if where else key
        if value is _MISSING:
            if default is _MISSING:
                self.error(path, "missing (expected a string)")
                return ""
            return default
        if not isinstance(value, str):
            self.error(path, f"expected a string, got {value!r}")
            return ""
        return value

    def unknown_keys(self, d: Any, allowed: tuple[str, ...], where: str) -> None:
        """A misspelt key is an error, not a silently ignored setting."""
        if not isinstance(d, dict):
            return
        for key in d:
            if key not in allowed:
                hint = _closest(key, allowed)
                extra = f" (did you mean {hint!r}?)" if hint else ""
                self.error(f"{where}.{key}" if where else key, f"unknown key{extra}")


def _closest(word: str, candidates: tuple[str, ...]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None
