"""dsvc: a compiler from a DeepSeek-V3-class model spec to a distributed FP8 trainer.

Three packages, one direction of imports:

    dsvc.dsl       what a spec *is*: the .dsv language, checked specs, diagnostics
    dsvc.compiler  *where and how* it runs: passes, schedules, reports, code generation, CLI
    dsvc.runtime   what generated trainers import and execute (torch, triton, numpy,
                   safetensors and the standard library only)

Their folders sit at the top of the source tree (`dsl/`, `compiler/`, `runtime/`);
pyproject.toml maps them under this package, so an installed dsvc adds no generic
top-level module to anyone's environment.
"""

__version__ = "0.1.0"
