"""bench/overlap_gpu.py's --build path on a CPU: the generated program's MoE layer under the
overlap session, its exchanges through the bench's transport.

The bench times the overlap on a GPU; here it must build the layer from a compiled build
(the program attached, FP8 on the build's kernels), send every exchange of an F&B pair
through the transport it is given (so a slower link can stand in for one), and run the
pair both in sequence and interleaved with the same results.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.bench_scripts import load_bench
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def bench_layer(tmp_path_factory):
    from dsvc import dsl
    from dsvc.compiler.codegen.build import build_cached

    bench = load_bench("overlap_gpu")
    out = tmp_path_factory.mktemp("overlap") / "build"
    build_cached(dsl.load(ROOT / "tests" / "train_specs" / "kernels1.dsv"), str(out))
    layer, comm, shape = bench.build_program(str(out), torch.device("cpu"))
    return bench, layer, comm, shape


def test_the_program_layer_exchanges_through_the_benchs_transport(bench_layer):
    bench, layer, comm, shape = bench_layer
    assert any(getattr(b, "program", None) is not None for b in layer.modules())
    sizes = []

    class Counting(bench.RepeatedCopy):
        def start(self, tensors, out_splits, in_splits, group):
            sizes.append(sum(t.numel() * t.element_size() for t in tensors))
            return super().start(tensors, out_splits, in_splits, group)

    gen = torch.Generator().manual_seed(0)
    x_f, x_b, g_b = (torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(3))
    grads = {}
    for interleave in (False, True):
        comm.transport = Counting(torch.device("cpu"), 2)
        sizes.clear()
        layer.zero_grad(set_to_none=True)
        bench.one_pair(layer, comm, x_f, x_b, g_b, interleave)
        grads[interleave] = {n: p.grad.clone() for n, p in layer.named_parameters()
                             if p.grad is not None}
        # Y's forward (untimed) and X's: the counts, the rows' dispatch (FP8 codes and
        # scales, and each slot's fp32 gate weight, which the expert applies), the combine
        # (bf16, one row per slot); Y's backward: the combine's and the dispatch's
        # gradients (the latter with each slot's gate gradient)
        t, d, k = shape[0] * shape[1], shape[2], 2
        assert len(sizes) == 2 * 3 + 2, sizes
        assert sizes[1] == t * k * (d + 4 * d // 128 + 4) and sizes[2] == t * k * d * 2, sizes
        assert sorted(sizes[-2:]) == [t * k * d * 2, t * k * (d * 2 + 4)], sizes
    assert grads[False].keys() == grads[True].keys() and grads[False]
    for name, g in grads[False].items():
        assert torch.equal(g, grads[True][name]), name  # interleaving changes no value


def test_the_gpu_checks_layer_spec_runs_the_program():
    """bench/specs/overlap_layer.dsv (what bench/gpu_check2.sh compiles and carries): every
    block of it is generated, at the overlap bench's default shapes."""
    from dsvc import dsl
    from dsvc.compiler.codegen.stage_program import block_kinds
    from dsvc.compiler.driver import run_until

    spec = dsl.load(ROOT / "bench" / "specs" / "overlap_layer.dsv")
    kinds = block_kinds(run_until(spec, "fuse"))
    assert [k["eager"] for k in kinds] == [""], kinds
    moe = spec.model.ffns["moe"]
    assert (spec.model.hidden, moe.routed, moe.top_k, moe.intermediate) == (4096, 32, 8, 1408)
    assert spec.train.micro_batch * spec.train.seq_len == 4 * 4096
