"""The `fuse` pass: which ops each block's fusion groups take, their bytes, the printout."""

from __future__ import annotations

import collections

import pytest

from dsvc import dsl
from dsvc.compiler.driver import run_until
from dsvc.compiler.printer import format_text
from tests.conftest import EXAMPLES

COMPOSITE = ("experts", "swiglu_ffn")  # ops that take part in several groups by named part


@pytest.fixture(scope="module")
def tiny():
    return run_until(dsl.load(EXAMPLES / "tiny.dsv"), "fuse")


def _kinds(graph, layer):
    return collections.Counter(g.kind for g in graph.fusion if g.layer == layer)


def test_every_block_kind_gets_its_groups(tiny):
    dense = {"rmsnorm_quant": 4, "mla_rope_qkv": 1, "quant_bhsd": 1, "gemm_residual": 2,
             "swiglu_quant": 1}
    moe = {"rmsnorm_quant": 4, "mla_rope_qkv": 1, "quant_bhsd": 1, "gemm_residual": 1,
           "router_topk": 1, "swiglu_quant": 2, "moe_combine": 1}
    assert _kinds(tiny, 0) == dense
    for layer in (1, 2, 3, 4):  # 4: the MTP module's block
        assert _kinds(tiny, layer) == moe, layer


def test_groups_partition_the_memory_bound_ops_of_the_blocks(tiny):
    seen = collections.Counter()
    for g in tiny.fusion:
        for name in g.ops:
            if tiny.op(name).kind not in COMPOSITE:
                seen[name] += 1
        for name in g.ops:
            assert g.name in tiny.op(name).attr("fusion"), (g.name, name)
    assert max(seen.values()) == 1, [n for n, c in seen.items() if c > 1]
    # every FP8 boundary inside a block is fused into a kernel; only the MTP module's own
    # projection (eh_proj, run eagerly) quantises on its own
    loose = [op.name for op in tiny.ops() if op.kind == "quantize" and not op.attr("fusion")]
    assert loose == ["mtp0.concat.quant"]


def test_one_quantisation_serves_the_shared_and_the_routed_experts(tiny):
    ffn_norm = next(g for g in tiny.fusion if g.name == "L1.ffn_norm+quant")
    assert set(ffn_norm.ops) == {"L1.ffn_norm", "L1.ffn_norm.quant", "L1.moe.experts.quant"}
    assert "+y" in ffn_norm.what  # the router reads the bf16 normed rows


def test_fused_kernels_move_fewer_bytes_than_the_ops_one_by_one(tiny):
    total_fused = total_unfused = 0
    for g in tiny.fusion:
        fused = tiny.num(g.reads + g.writes + g.bwd_reads + g.bwd_writes)
        unfused = tiny.num(g.unfused_reads + g.unfused_writes)
        assert 0 < fused < unfused, g.name
        total_fused += fused
        total_unfused += unfused
    assert total_fused < 0.6 * total_unfused


def test_gqa_and_bf16_models(tmp_path):
    llama = run_until(dsl.load(EXAMPLES / "llama3_8b.dsv"), "fuse")
    assert _kinds(llama, 0) == {"rmsnorm_quant": 2, "gqa_rope": 1, "quant_bhsd": 1,
                                "gemm_residual": 2, "swiglu_quant": 1}
    bf16 = run_until(dsl.load(EXAMPLES / "llama2_7b.dsv"), "fuse")
    assert bf16.fusion == ()  # no FP8 boundary, nothing this pass knows how to fuse


def test_inspect_shows_the_groups_with_their_bytes(tiny):
    text = format_text(tiny, {op.name for op in tiny.ops() if op.layer == 1})
    head = next(line for line in text.splitlines() if line.startswith("fusion:"))
    assert head.startswith("fusion: 11 group(s)")
    assert "L1.moe.router.route: router_topk <- L1.moe.router" in text
    assert "kernels rmsnorm_quant / rmsnorm_bwd; reads" in text
