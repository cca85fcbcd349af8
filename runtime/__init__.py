"""dsvc's runtime: what generated trainers import.

Executes a compiled plan (`plan.json`, see docs/plan.md) and makes no decisions
of its own; docs/runtime.md describes the modules (`plan`, `trainer`, `model`,
`ep`, `pipeline`, `optim`, `mesh`, `launch`, ...) and how to run a plan.
Imports only torch, triton, numpy, safetensors and the standard library, and
only relatively inside the package, so a build directory's copy of it works
without dsvc installed.
"""
