"""Importing a build's generated modules (kernels, stage program) from their files.

Triton's `@jit` reads its functions' source, so a generated module must be imported from a
real file rather than exec'd from a string. Each file gets one module name derived from
its resolved path, so importing the same file twice returns the same module (and the
same compiled kernels), and two builds never share one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import sys
import types


def import_generated(path: pathlib.Path, prefix: str) -> types.ModuleType:
    """Import the file at `path` (already resolved and known to exist) under a module name
    `prefix` + a digest of the path; a module that fails to execute is not left behind."""
    name = prefix + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def forget(module: types.ModuleType) -> None:
    """Drop a generated module that its caller refused, so a rebuilt file is imported anew."""
    sys.modules.pop(module.__name__, None)
