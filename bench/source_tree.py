"""Lets a bench script import dsvc from this source tree, installed or not.

`import source_tree` (the script's neighbour in bench/) before importing dsvc. Where dsvc
is installed (`pip install -e .`) this only puts the tree on sys.path. Where it is not
(the GPU image: a copy of the tree, no lark or pydantic, nothing installed), the import
names `dsvc.dsl`, `dsvc.compiler` and `dsvc.runtime` are found in the folders beside
`dsvc/`, as pyproject.toml maps them.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dsvc  # noqa: E402

if importlib.util.find_spec("dsvc.runtime") is None:
    dsvc.__path__.append(str(ROOT))
