"""The IR, the verifier, the printer and lowering: structure and agreement with the report."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest

from dsvc import dsl
from dsvc.compiler.driver import GRAPH_PASSES, run_until
from dsvc.compiler.ir import Graph, Op, T, num, tensor
from dsvc.compiler.passes.lower import lower
from dsvc.compiler.printer import format_dot, format_text
from dsvc.compiler.verify import IRVerifyError, check, verify
from tests.conftest import EXAMPLES, ROOT
from tests.golden import check_golden

V3 = EXAMPLES / "deepseek_v3.dsv"


def load_relative(name: str):
    """Load examples/NAME.dsv by a relative path, so spans print the same on every machine."""
    with contextlib.chdir(ROOT):
        return dsl.load(f"examples/{name}.dsv")


@pytest.fixture(scope="module")
def tiny():
    return load_relative("tiny")


@pytest.fixture(scope="module")
def v3():
    return dsl.load(V3)


def _ops(graph, kind=None, layer=None):
    return [op for op in graph.ops() if (kind is None or op.kind == kind)
            and (layer is None or op.layer == layer)]


# ----------------------------------------------------------------------------- golden IR per pass


@pytest.mark.parametrize("pass_name", GRAPH_PASSES)
def test_golden_ir_after_each_pass(tiny, pass_name):
    check_golden(f"ir/tiny.{pass_name}.txt", format_text(run_until(tiny, pass_name)))


def test_printing_is_deterministic(tiny):
    a = format_text(run_until(tiny))
    b = format_text(run_until(load_relative("tiny")))
    assert a == b
    assert format_dot(run_until(tiny)) == format_dot(run_until(tiny))


# ----------------------------------------------------------------------------- lowering


def test_mla_layer_ops_and_shapes(v3):
    g = lower(v3)
    names = {op.name for op in _ops(g, layer=12)}
    for part in ("attn_norm", "attn.q_down", "attn.q_norm", "attn.q_up", "attn.kv_down",
                 "attn.kv_norm", "attn.kv_up", "attn.rope", "attn.core", "attn.o_proj",
                 "attn_add", "ffn_norm", "moe.router", "moe.experts", "moe.shared", "ffn_add"):
        assert f"L12.{part}" in names
    assert g.op("L12.attn.q_up").outputs[0].shape == (T, 128 * 192)  # wq_b out 24576
    assert g.op("L12.attn.kv_down").outputs[0].shape == (T, 576)  # wkv_a out
    assert g.op("L12.attn.kv_up").outputs[0].shape == (T, 32768)  # wkv_b out
    assert g.op("L12.attn.o_proj").inputs[0].shape == (T, 16384)  # wo in
    assert g.op("L0.ffn.gate").outputs[0].shape == (T, 18432)  # dense layers 0..2
    assert "L3.moe.experts" in g and "L2.moe.experts" not in g
    experts = g.op("L12.moe.experts")
    assert experts.param_count == 256 * 3 * 7168 * 2048  # one expert: 44.04M
    assert len(_ops(g, "experts")) == 58 + 1  # one grouped op per MoE layer (+ MTP)


def test_attention_params_per_layer_match_reference(v3):
    g = lower(v3)
    attn = sum(op.param_count for op in _ops(g, layer=5) if ".attn" in op.name or "attn_norm" in op.name)
    assert abs(attn - 187.1e6) / 187.1e6 < 1e-3  # DeepSeek-V3's config: ~187.1M per layer


def test_lowering_matches_report_params_and_flops():
    from dsvc.compiler.driver import build_report

    for name in ("tiny", "deepseek_v3", "deepseek_v2_lite"):
        spec = dsl.load(EXAMPLES / f"{name}.dsv")
        g, r = lower(spec), build_report(spec)
        main = [op for op in g.ops() if op.block != "mtp"]
        mtp = [op for op in g.ops() if op.block == "mtp"]
        assert sum(op.param_count for op in main) == r.value("model.params_total")
        assert sum(op.param_count for op in mtp) == r.value("model.params_mtp")
        flops = sum(g.num(op.flops) for op in main) / g.tokens
        assert flops == pytest.approx(r.value("model.train_flops_per_token"), rel=1e-12)


def test_v3_flops_per_token_is_250_gflops(v3):
    g = lower(v3)
    flops = sum(g.num(op.flops) for op in g.ops() if op.block != "mtp") / g.tokens
    assert abs(flops - 250.4e9) / 250.4e9 < 0.005


def test_gqa_and_plain_q_projection_lowering():
    spec = dsl.loads(_gqa_spec(kv_heads=2, bias=True), "gqa.dsv")
    g = lower(spec)
    assert g.op("L0.attn.k_proj").outputs[0].shape == (T, 2 * 16)
    assert g.op("L0.attn.q_proj").param_count == 64 * 4 * 16 + 4 * 16  # weight + bias
    assert g.op("L0.attn.core").attr("kv_heads") == 2
    v2 = lower(dsl.load(EXAMPLES / "deepseek_v2_lite.dsv"))
    assert "L0.attn.q_proj" in v2 and "L0.attn.q_down" not in v2  # q_lora_rank = 0


def test_mtp_module_shares_embedding_and_head(tiny):
    g = lower(tiny)
    assert g.op("mtp0.embed").param_count == 0 and g.op("mtp0.embed").attr("tied_to") == "embed"
    assert g.op("mtp0.head").param_count == 0 and g.op("mtp0.head").attr("tied_to") == "head"
    assert g.op("mtp0.eh_proj").inputs[0].shape == (T, 256)  # [norm(h); norm(emb)] 2d -> d
    assert g.op("mtp0.attn.q_down").layer == 4  # MTP module k is layer num_layers + k
    assert g.producer("mtp0.hnorm", 0) == ("L3.ffn_add", 0)
    assert g.op("loss_total").attr("weights") == (1.0, 0.3)


def test_numbers_evaluate_once_per_expression(v3):
    g = lower(v3)
    ups = [op for op in g.ops() if op.name.endswith("attn.q_up")]
    assert len({id(op.flops_fwd) for op in ups}) == 1  # layers of a kind share expressions
    assert num(ups[0].flops_fwd, 4096) == 2 * 4096 * 1536 * 24576


# ----------------------------------------------------------------------------- the verifier


def _tiny_graph(spec) -> Graph:
    g = Graph(spec, 4)
    g.add(Op("a", "input", "embed", None, (), (tensor("bf16", T, 8),), "bf16", seq=1))
    g.add(Op("b", "norm", "embed", None, (tensor("bf16", T, 8),), (tensor("bf16", T, 8),),
             "fp32", seq=2), [("a", 0)])
    return g


def test_verifier_accepts_sound_graphs(tiny):
    assert check(_tiny_graph(tiny)) == []
    for name in GRAPH_PASSES:
        verify(run_until(tiny, name, verify_ir=False))


def test_verifier_catches_shape_dtype_and_feed_errors(tiny):
    g = _tiny_graph(tiny)
    g.replace(dataclasses.replace(g.op("b"), inputs=(tensor("fp32", T, 9),)))
    problems = check(g)
    assert any("shape [T, 8] != [T, 9]" in p for p in problems)
    assert any("dtype bf16 != fp32" in p for p in problems)
    g2 = _tiny_graph(tiny)
    g2.add(Op("c", "add", "embed", None, (tensor("bf16", T, 8),) * 2, (tensor("bf16", T, 8),),
              "bf16", seq=3), [("b", 0)])
    assert any("c: input 1 fed 0 times" in p for p in check(g2))
    g2.connect("c", 0, "b", 0)
    with pytest.raises(IRVerifyError, match="cycle"):
        verify(g2)


def test_verifier_catches_unplaced_ops_and_unsent_crossings(tiny):
    g = run_until(tiny, "insert_comm")
    bad = g.derive()
    op = bad.op("L3.attn_norm")
    bad.replace(dataclasses.replace(op, stage=None))
    assert any("L3.attn_norm: stage None" in p for p in check(bad))
    bad = g.derive()
    src, sp = bad.producer("L3.attn_norm", 0)  # the recv feeding stage 1
    assert bad.op(src).kind == "recv"
    bad.disconnect(src, sp, "L3.attn_norm", 0)
    bad.connect("L2.ffn_add", 0, "L3.attn_norm", 0)
    assert any("crosses stages 0->1 without send/recv" in p for p in check(bad))


def _gqa_spec(kv_heads: int = 2, bias: bool = False) -> str:
    return f"""
model g {{
  vocab = 256
  hidden = 64
  max_seq = 64
  attention gqa {{ kind = gqa, heads = 4, kv_heads = {kv_heads}, head_dim = 16, qkv_bias = {str(bias).lower()} }}
  ffn dense {{ intermediate = 128 }}
  layers {{ 0..1 = block(gqa, dense) }}
}}
"""


def test_saved_activations_match_the_report_per_layer():
    from dsvc.compiler.costs.memory import activation_bytes
    from dsvc.compiler.costs.model import build_model
    from dsvc.compiler.costs.symbols import Quantities

    for name in ("deepseek_v3", "deepseek_v2_lite"):
        spec = dsl.load(EXAMPLES / f"{name}.dsv")
        g, costs = lower(spec), build_model(spec, Quantities(False))
        for layer in (0, spec.model.num_layers - 1):
            kinds = spec.model.layers[layer]
            mine = sum(g.num(op.saved_bytes) for op in _ops(g, layer=layer) if op.block == "layer")
            ref = (sum(activation_bytes(costs.attentions[kinds.attention], spec.precision))
                   + sum(activation_bytes(costs.ffns[kinds.ffn], spec.precision)))
            assert mine == pytest.approx(ref * g.tokens, rel=1e-12), (name, layer)
        head = sum(g.num(op.saved_bytes) for op in g.ops() if op.block == "head")
        assert head == pytest.approx(sum(activation_bytes(costs.head, spec.precision)) * g.tokens)
