"""The routed experts outside FP8: one grouped GEMM per projection, no host round trip.

With torch >= 2.9 the bf16/fp32 routed experts run as `torch._grouped_mm` over the
rows sorted by expert (on Hopper a kernel that reads the offsets on the device); the
per-expert loop it replaces reads every expert's row count back to the host. The
single-rank route (no EP exchange) likewise keeps its counts on the device.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsvc.runtime import moe
from dsvc.runtime.ep import Route, count_ids
from dsvc.runtime.overlap import CollectiveTransport
from dsvc.runtime.plan import parse_plan
from dsvc.runtime.tiny import tiny_plan


def _experts(dtype: str, hidden: int = 64, intermediate: int = 32, n: int = 4):
    plan = parse_plan(tiny_plan(pp=1, dp=1, ep=1, precision=dtype))
    ffn = dataclasses.replace(plan.model.ffn["moe"], intermediate=intermediate)
    experts = moe.RoutedExperts(hidden, ffn, list(range(n)), plan.precision)
    torch.manual_seed(1)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return experts


def _run(experts, x, counts):
    x = x.detach().clone().requires_grad_()
    y = experts(x, counts)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g.to(y.dtype))
    grads = [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad()
    return y.detach(), x.grad, grads


@pytest.mark.skipif(not moe._GROUPED_MM, reason="torch._grouped_mm needs torch >= 2.9")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_grouped_experts_give_the_loops_bits(dtype, monkeypatch):
    experts = _experts(dtype)
    counts = torch.tensor([7, 0, 12, 5])  # an expert without rows
    x = torch.randn(24, 64)
    calls = []
    real = torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(kwargs["offs"].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    grouped = _run(experts, x, counts)
    assert calls == [[7, 7, 19, 24]] * 3  # gate, up, down: one call each, int32 offsets
    monkeypatch.setattr(moe, "_GROUPED_MM", False)
    loop = _run(experts, x, counts)
    assert torch.equal(grouped[0], loop[0]) and torch.equal(grouped[1], loop[1])
    assert all(torch.equal(a, b) for a, b in zip(grouped[2], loop[2]))


def test_misaligned_or_empty_operands_take_the_loop(monkeypatch):
    if not moe._GROUPED_MM:
        pytest.skip("torch._grouped_mm needs torch >= 2.9")
    experts = _experts("bf16", hidden=60)  # 120-byte rows: not a multiple of 16
    x = torch.randn(10, 60)
    assert not moe._grouped_mm_usable(x.bfloat16(), experts.gate_proj, experts.down_proj)
    assert moe._grouped_mm_usable(torch.randn(10, 64), torch.randn(4, 32, 64))
    monkeypatch.setattr(torch, "_grouped_mm", None)  # would raise if it were called
    y = experts(x, torch.tensor([3, 3, 0, 4]))
    assert y.shape == (10, 60)
    y0 = experts(x[:0], torch.zeros(4, dtype=torch.long))
    assert y0.shape == (0, 60)


def test_one_rank_route_keeps_counts_on_the_device():
    class Comm:
        transport = CollectiveTransport()

    dest = torch.zeros(9, dtype=torch.long)
    bucket = torch.tensor([2, 0, 2, 1, 0, 2, 2, 0, 1])
    route = Route(dest, bucket, 1, 3, None, Comm())
    assert route.perm is None and route.send_splits is None  # nothing read back
    assert route.counts.tolist() == [3, 2, 4]
    rows = torch.arange(9.0).unsqueeze(1)
    sent = route.send(rows)
    assert sent.squeeze(1).tolist() == [1, 4, 7, 3, 8, 0, 2, 5, 6]  # by bucket, stable
    assert torch.equal(route.back(sent, torch.float32), rows)


def test_count_ids_is_bincount():
    ids = torch.tensor([[3, 1], [1, 1], [0, 3]])
    assert count_ids(ids, 6).tolist() == torch.bincount(ids.reshape(-1), minlength=6).tolist()
    assert count_ids(ids[:0], 4).tolist() == [0, 0, 0, 0]


def test_the_gpu_benchmark_runs_its_checks_on_the_cpu(capsys):
    # bench/moe_gpu.py --cpu-smoke: the same correctness checks and timing, tiny sizes
    from tests.bench_scripts import load_bench

    before = moe._GROUPED_MM
    bench = load_bench("moe_gpu")
    assert bench.main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    if moe._GROUPED_MM:
        assert "grouped GEMM calls in one forward: 3" in out
        assert out.count("relative error 0.0e+00") == 5  # the CPU kernel is the loop's bits
        assert "grouped / loop" in out
    assert moe._GROUPED_MM is before and torch._grouped_mm is not None  # both restored


@pytest.mark.skipif(not moe._GROUPED_MM, reason="torch._grouped_mm needs torch >= 2.9")
def test_grouped_experts_take_a_broadcast_gradient():
    # y.sum().backward() hands the last op a (0, 0)-strided gradient, which
    # _grouped_mm's own backward refuses; the experts pass on a dense one
    experts = _experts("fp32")
    x = torch.randn(24, 64, requires_grad=True)
    counts = torch.tensor([7, 0, 12, 5])
    experts(x, counts).sum().backward()
    grads = [p.grad.clone() for p in experts.parameters()]
    experts.zero_grad()
    y = experts(x.detach(), counts)
    y.backward(torch.ones_like(y))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, experts.parameters()))
