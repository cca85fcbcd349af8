"""dsvc's runtime: what generated trainers import.

Executes a compiled plan (`plan.json`) and makes no decisions of its own.
Imports only torch, triton, numpy, safetensors and the standard library, and
only relatively inside the package, so a build directory's copy of it works
without dsvc installed.
"""
