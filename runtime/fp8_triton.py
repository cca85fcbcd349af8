"""FP8 "triton" backend: the generated kernel module the runtime calls.

A compiled build directory carries its own kernel module (`kernels/fp8_kernels.py`,
rendered by dsvc.compiler.codegen.kernels for the spec's tiles and GEMM shapes);
`use_kernels` registers it, and the build's train.py does so. No kernel module is
checked in: without a build, render one (`python -m dsvc.compiler.codegen.kernels
OUT.py` writes one for no particular spec) and register it.
"""

from __future__ import annotations

import os
import pathlib
import types

from .generated import import_generated

# Functions a kernel module must define (the backend protocol shared with fp8_torch).
PROTOCOL = (
    "quantize_act",
    "quantize_act_t",
    "quantize_act_both",
    "quantize_act_t_grouped",
    "quantize_weight",
    "dequantize_act",
    "dequantize_weight",
    "gemm",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "swiglu_quant",
)

_registered: types.ModuleType | None = None


def load_kernel_module(path: str | os.PathLike) -> types.ModuleType:
    """Import a generated kernel module from a file path (Triton needs a real file for @jit)."""
    path = pathlib.Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"generated kernel module {path} does not exist")
    module = import_generated(path, "_dsvc_fp8_kernels_")
    check_kernel_module(module)
    return module


def check_kernel_module(module: types.ModuleType) -> None:
    """Raise a clear error if `module` lacks part of the kernel protocol."""
    missing = [fn for fn in PROTOCOL if not callable(getattr(module, fn, None))]
    if missing:
        raise TypeError(
            f"{getattr(module, '__name__', module)!r} is not a dsvc FP8 kernel module: "
            f"missing {', '.join(missing)}"
        )


def use_kernels(module_or_path: types.ModuleType | str | os.PathLike | None) -> None:
    """Make `backend="triton"` call this generated module (None: back to the generic one)."""
    global _registered
    if module_or_path is None or isinstance(module_or_path, types.ModuleType):
        if module_or_path is not None:
            check_kernel_module(module_or_path)
        _registered = module_or_path
    else:
        _registered = load_kernel_module(module_or_path)


def kernel_module() -> types.ModuleType:
    """The registered kernel module (see the module docstring)."""
    if _registered is None:
        raise RuntimeError(
            "fp8 backend 'triton' has no kernel module: a build's train.py registers its "
            "kernels/fp8_kernels.py; elsewhere call use_kernels(path) with a module rendered by "
            "`python -m dsvc.compiler.codegen.kernels OUT.py`, or use backend='torch'"
        )
    return _registered
