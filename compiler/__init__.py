"""dsvc's compiler: lowering, passes, schedules, reports, code generation and the CLI.

Decides *where and how* a spec runs and records it in the IR; `dsvc.runtime` only
executes the plan it is given.
"""
