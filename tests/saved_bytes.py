"""What autograd keeps for the backward: `saved_bytes(run, exclude)`.

Counts the distinct storages of the tensors saved while `run()` runs (saved-tensor
hooks), leaving out those of `exclude` (parameters, buffers, an input the caller holds
anyway). Tensors a custom autograd Function keeps on its ctx outside save_for_backward
are not seen (bench/fusion_cpu.py also counts those).
"""

from __future__ import annotations

import torch


def saved_bytes(run, exclude=()) -> int:
    held = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in held:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())
