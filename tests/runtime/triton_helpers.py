"""Loading rendered kernel modules in tests: interpreted on a CPU, compiled on CUDA.

`TRITON_INTERPRET=1` must be set before triton is first imported in the process
(tests/conftest.py does it without a GPU); `load_kernels` refuses a process where that
came too late. `OnDevice` moves a module's tensor arguments to the test device.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_kernels(path, name: str):
    """Import a kernel module from `path` afresh (its @jit functions bind to this process's mode)."""
    import triton

    if DEVICE == "cpu" and type(triton.language.standard.max).__name__ != "InterpretedFunction":
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set; run this file on its own "
            "or set TRITON_INTERPRET=1 in the environment"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def on_dev(*tensors):
    moved = tuple(t.to(DEVICE) for t in tensors)
    return moved if len(moved) > 1 else moved[0]


class OnDevice:
    """A kernel module whose functions get their tensor arguments moved to DEVICE."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def call(*args, **kwargs):
            args = [on_dev(a) if isinstance(a, torch.Tensor) else a for a in args]
            kwargs = {k: on_dev(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return attr(*args, **kwargs)

        return call


def bits_equal(a, b) -> bool:
    """Same dtype, shape and bits (fp8 compared as bytes)."""
    a, b = a.cpu(), b.cpu()
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
