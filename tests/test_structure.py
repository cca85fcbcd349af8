"""The tree's structure: no import circles, no private names across modules, distinct names.

Every module of dsvc.dsl, dsvc.compiler and dsvc.runtime is read as text (ast); every
import counts, at module level or inside a function, since a function-level import
is a dependency all the same. A circle is a set of modules that import each other
(strongly connected, two or more). A private name is a `_name` another module
defines, imported (`from m import _x`) or reached through the module
(`m._x`); a private module is `_name.py`, which only its own package may import.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"dsl": "dsvc.dsl", "compiler": "dsvc.compiler", "runtime": "dsvc.runtime"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


MODULES = _modules()


def _resolve(module: str, level: int, name: str | None, is_package: bool) -> str:
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, name imported from it or None, line) for every import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node.level, node.module, is_package)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from package import module`
                    out.append((sub, None, node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m in MODULES]


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan, iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_circles():
    circles = _circles(_graph())
    assert not circles, "modules that import each other:\n" + "\n".join(map(str, circles))


def _package_of(module: str) -> str:
    path = MODULES[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def test_no_private_name_crosses_a_module():
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for target, name, line in _imports(module):
            last = target.rpartition(".")[2]
            if last.startswith("_") and not last.startswith("__") \
                    and _package_of(target) != _package_of(module):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports private module {target}")
            if name and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node.level, node.module, path.name == "__init__.py")
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        imported_modules = {local for local, full in aliases.items() if full in MODULES}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses "
                           f"{node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_no_comment_cites_a_file_outside_the_repository():
    """REFERENCE.md and DESIGN.md live beside the repository, not in it."""
    bad = []
    for folder in ("dsl", "compiler", "runtime", "bench", "tests", "docs", "examples"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".md", ".jinja", ".dsv", ".sh") and path != pathlib.Path(
                    __file__):
                text = path.read_text(encoding="utf-8")
                for word in ("REFERENCE.md", "DESIGN.md", "STYLE.md"):
                    if word in text:
                        bad.append(f"{path.relative_to(ROOT)}: {word}")
    assert not bad, "\n".join(bad)


def test_module_names_are_distinct():
    """One name, one module: a grep for `simulate.py` or `fmt` finds one thing (command
    modules are `cmd_<command>.py`; passes, schedules and costs name what they hold)."""
    by_name: dict[str, list[str]] = {}
    for path in MODULES.values():
        if path.name != "__init__.py":
            by_name.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert not {n: paths for n, paths in by_name.items() if len(paths) > 1}


def test_docs_name_every_runtime_module():
    """docs/runtime.md's module table lists every module a build directory carries (the
    table had kept modules that were gone and missed a third of the ones that exist)."""
    text = (ROOT / "docs" / "runtime.md").read_text(encoding="utf-8")
    table = text[text.index("| module | what it does |"):]
    table = table[: table.index("\n\n")]
    named = {w.strip().strip("`") for row in table.splitlines()[2:] for w in row.split("|")[1].split(",")}
    modules = {p.name for p in (ROOT / "runtime").glob("*.py") if p.name != "__init__.py"}
    assert named == modules, (sorted(modules - named), sorted(named - modules))
