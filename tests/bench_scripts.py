"""Import a bench script as a module, as `python bench/NAME.py` would run it.

A script finds its neighbours in bench/ (`source_tree`, `sm90_compile`) on sys.path[0]
when run; imported from a test, bench/ is put there the same way.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """The module of bench/NAME.py (executed once per call, under a private name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_dsvc_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
