"""Debug knobs, all in one place. Each is an environment variable with levels.

| variable         | levels | effect |
|------------------|--------|--------|
| `DSVC_DEBUG`     | 0-2    | 1: full Python tracebacks for internal errors; 2: also print the IR after each pass |
| `DSVC_NO_COLOR`  | 0/1    | never colour diagnostics (colour is only used on a TTY anyway) |
| `DSVC_FP8_AUTOTUNE` | 0/1 | generated FP8 kernels: 0 launches the compiler's chosen config instead of autotuning |
| `DSVC_FP8_TMA`   | 0/1    | generated FP8 kernels: 0 uses pointer loads instead of TMA tensor descriptors |
| `TRITON_INTERPRET` | 0/1  | Triton's own: run kernels in the interpreter (set by the tests when there is no GPU) |
"""

from __future__ import annotations

import os


def level(name: str = "DSVC_DEBUG") -> int:
    raw = os.environ.get(name, "0").strip()
    try:
        return int(raw)
    except ValueError:
        return 1 if raw else 0


def debug_level() -> int:
    return level("DSVC_DEBUG")
