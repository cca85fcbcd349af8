"""What autograd keeps for the backward: `saved_bytes(run, exclude)`.

Counts the distinct storages of the tensors saved while `run()` runs (saved-tensor
hooks) and still alive when it returns, its result held (the graph from it holds what
the backward needs), leaving out those of `exclude` (parameters, buffers, an input the
caller holds anyway): a graph a Function builds and frees inside its own forward (the
loss's pieces, runtime/loss.py) keeps nothing. Tensors a custom autograd Function keeps
on its ctx outside save_for_backward are not seen (bench/fusion_cpu.py also counts
those).
"""

from __future__ import annotations

import weakref

import torch


def saved_bytes(run, exclude=()) -> int:
    held = {t.untyped_storage().data_ptr() for t in exclude}
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()  # held while counting: its graph holds what the backward needs
    alive: dict[int, int] = {}
    for ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in held:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del out
    return sum(alive.values())
