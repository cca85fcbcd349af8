"""The one jinja2 environment for every generated file, and the provenance header.

Templates are package data under compiler/codegen/templates/ (`*.py.jinja`). The
environment is strict (an undefined name is an error, not an empty string) and
deterministic: no clocks, no dict-order surprises (`pyrepr` sorts nothing itself, so
callers pass sorted data), and user strings reach generated code only through
`pyrepr` (a Python literal) or `comment_safe` (one escaped comment line).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence

import jinja2

GENERATED_MARKER = "generated: do not edit"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The shared environment: package loader, StrictUndefined, trailing newline kept."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dsvc.compiler.codegen", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["pyrepr"] = pyrepr
    env.filters["comment_safe"] = comment_safe
    return env


def render_template(name: str, **context) -> str:
    """Render one template of the package with `context`."""
    return environment().get_template(name).render(**context)


def pyrepr(value) -> str:
    """A Python literal for ints, floats, bools, None, strings and (nested) dicts/lists/tuples.

    Dicts keep the caller's order (pass them sorted or in a fixed order); anything
    else is rejected so that no object's repr leaks into generated code.
    """
    if value is None or isinstance(value, (bool, int)):
        return repr(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # double quotes, as the formatter writes them
    if isinstance(value, Mapping):
        items = ", ".join(f"{pyrepr(k)}: {pyrepr(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, tuple):
        inner = ", ".join(pyrepr(v) for v in value)
        return "(" + inner + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(pyrepr(v) for v in value) + "]"
    raise TypeError(f"pyrepr: {type(value).__name__} is not a plain literal")


def comment_safe(text: object) -> str:
    """`text` as one line fit for a `#` comment: control characters escaped."""
    out = []
    for ch in str(text):
        out.append(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def content_hash(text: str) -> str:
    """The content hash recorded in a provenance header: sha256 of the body, 16 hex digits."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _format_tile_config(tile_config) -> str:
    if tile_config is None:
        return "none"
    if isinstance(tile_config, Mapping):
        return ", ".join(f"{k}={v}" for k, v in tile_config.items())
    return str(tile_config)


def provenance_header(
    spec_file: str | None,
    span: tuple[int, int] | None,
    passes: Sequence[str],
    tile_config,
    content_hash: str,
) -> str:
    """The header every generated file starts with, as `#` comment lines.

    spec_file and span say which `.dsv` lines the file came from; passes are the
    compiler passes that ran; tile_config is a mapping or a string; content_hash is
    `content_hash(body)`. Ends with a newline.
    """
    from dsvc import __version__

    source = comment_safe(spec_file) if spec_file else "none"
    if span is not None:
        source += f" lines {int(span[0])}-{int(span[1])}"
    lines = [
        f"# {GENERATED_MARKER}",
        f"# source: {source}",
        f"# passes: {comment_safe(', '.join(passes)) if passes else 'none'}",
        f"# tile config: {comment_safe(_format_tile_config(tile_config))}",
        f"# dsvc version: {__version__}",
        f"# content hash: sha256:{content_hash}",
    ]
    return "\n".join(lines) + "\n"


def render_generated(
    name: str,
    *,
    spec_file: str | None = None,
    span: tuple[int, int] | None = None,
    passes: Sequence[str] = (),
    tile_config=None,
    **context,
) -> str:
    """Render template `name` and put the provenance header (hash of the body) on top."""
    body = render_template(name, **context)
    header = provenance_header(spec_file, span, passes, tile_config, content_hash(body))
    return header + body


def split_generated(text: str) -> tuple[str, str]:
    """(header, body) of a generated file; the inverse of render_generated's concatenation."""
    lines = text.splitlines(keepends=True)
    count = 0
    while count < len(lines) and lines[count].startswith("# ") and count < 6:
        count += 1
    return "".join(lines[:count]), "".join(lines[count:])
