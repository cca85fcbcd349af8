"""The schedule drawn is the schedule run: our action lists executed by torch's pipeline
runtime (`_PipelineScheduleRuntime`, two gloo processes on CPU) give one process's gradients.

Both forms are run: our full lists with SEND/RECV ("compute_comms") and our compute-only
lists, for which torch inserts the communication itself ("compute_only").
"""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.tolerances import tol

torch = pytest.importorskip("torch")

DIM, NUM_MB, MB_ROWS, WORLD = 8, 4, 2, 2
CASES = (("1f1b", 2), ("zb1p", 2), ("dualpipev", 4))  # (kind, PP): all on two devices
FORMATS = ("compute_comms", "compute_only")


def _layers(num_stages: int):
    torch.manual_seed(0)
    return [torch.nn.Linear(DIM, DIM) for _ in range(num_stages)]


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(NUM_MB * MB_ROWS, DIM, generator=g), torch.randn(
        NUM_MB * MB_ROWS, DIM, generator=g
    )


def _loss(out, target):
    return ((out - target) ** 2).sum()


def _worker(rank: int, init_file: str, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import _Action, _PipelineScheduleRuntime

    from dsvc.compiler.schedules import build_schedule

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for kind, pp in CASES:
            for fmt in FORMATS:
                schedule = build_schedule(kind, pp, NUM_MB, with_comms=fmt == "compute_comms")
                layers = _layers(schedule.num_stages)
                mine = schedule.device_stages(rank)
                stages = [
                    PipelineStage(layers[s], s, schedule.num_stages, torch.device("cpu"))
                    for s in mine
                ]
                runtime = _PipelineScheduleRuntime(stages, NUM_MB, loss_fn=_loss, scale_grads=False)
                actions = {
                    d: [_Action.from_str(str(a)) for a in schedule.actions[d]] for d in range(WORLD)
                }
                runtime._prepare_schedule_with_comms(actions, format=fmt)
                x, y = _data()
                first, last = 0 in mine, schedule.num_stages - 1 in mine
                runtime.step(*((x,) if first else ()), target=y if last else None)
                queue.put((kind, fmt, {s: layers[s].weight.grad.clone() for s in mine}))
    finally:
        dist.destroy_process_group()


def _reference(num_stages: int):
    layers = _layers(num_stages)
    x, y = _data()
    h = x
    for layer in layers:
        h = layer(h)
    _loss(h, y).backward()
    return [layer.weight.grad for layer in layers]


@pytest.mark.slow
def test_torch_runtime_executes_our_lists():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, init_file, queue)) for r in range(WORLD)]
        for p in procs:
            p.start()
        try:
            results = [queue.get(timeout=180) for _ in range(WORLD * len(CASES) * len(FORMATS))]
            for p in procs:
                p.join(timeout=60)
        finally:  # a worker stuck in a collective must not outlive the test
            for p in procs:
                if p.is_alive():
                    p.terminate()
    assert all(p.exitcode == 0 for p in procs)
    rtol, atol = tol("fp32_equivalence")
    seen = set()
    for kind, fmt, grads in results:
        reference = _reference(dict(CASES)[kind])  # PP = number of stages for these kinds
        for stage, grad in grads.items():
            torch.testing.assert_close(grad, reference[stage], rtol=rtol, atol=atol)
            seen.add((kind, fmt, stage))
    assert len(seen) == sum(len(FORMATS) * pp for _, pp in CASES)  # every stage of every run
