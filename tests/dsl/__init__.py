"""Tests of the .dsv language (dsl/ and the check, fmt and import-hf commands)."""

# In-process `dsvc check` calls `dsl.use_light_spec()`, which switches the whole process to the
# pydantic-free Spec base if `dsl.spec` is not imported yet. Import it now so these tests always
# see the pydantic Spec; the light base is tested in subprocesses (test_light_spec.py).
import dsvc.dsl.spec  # noqa: F401
