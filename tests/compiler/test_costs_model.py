"""Model formulas: per-op shapes, parameters, KV cache and FLOPs against published and
hand-computed values (DeepSeek-V3, DeepSeek-V2-Lite, a Llama-3-8B-shaped GQA model, a
Llama-2-7B-shaped MHA model)."""

from __future__ import annotations

import functools
import math

import pytest

from dsvc import dsl
from dsvc.compiler.costs import model as M
from dsvc.compiler.costs.symbols import Quantities
from dsvc.compiler.driver import build_report

# The cost formulas on the documented even split (no graph, no simulation).
build_report = functools.partial(build_report, even_split=True)
from tests.conftest import EXAMPLES, ROOT
from tests.tolerances import tol

SPECS = ROOT / "tests" / "compiler" / "specs"


def close(a, b, name):
    rtol, atol = tol(name)
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


@pytest.fixture(scope="module")
def v3():
    return build_report(dsl.load(EXAMPLES / "deepseek_v3.dsv"))


# ----------------------------------------------------------------------------- per-op formulas


def test_mla_shapes_match_the_reference_config():
    shapes = M.mla_linears(7168, 128, 1536, 512, 128, 64, 128)
    assert shapes == {"wq_a": (7168, 1536), "wq_b": (1536, 24576), "wkv_a": (7168, 576),
                      "wkv_b": (512, 32768), "wo": (16384, 7168)}
    params = sum(i * o for i, o in shapes.values()) + M.mla_norm_params(7168, 1536, 512)
    assert params == 187_114_496  # ~187.1M per layer (DeepSeek-V3's config)


def test_mla_without_q_lora_has_one_plain_q_projection():
    shapes = M.mla_linears(2048, 16, 0, 512, 128, 64, 128)
    assert shapes["wq"] == (2048, 16 * 192) and "wq_a" not in shapes
    assert M.mla_norm_params(2048, 0, 512) == 2048 + 512


def test_gqa_swiglu_router_and_core():
    assert M.gqa_linears(4096, 32, 8, 128) == {"wq": (4096, 4096), "wk": (4096, 1024),
                                               "wv": (4096, 1024), "wo": (4096, 4096)}
    assert M.gqa_other_params(896, 14, 2, 64, True) == 896 + (14 + 4) * 64
    expert = sum(i * o for i, o in M.swiglu_linears(7168, 2048).values())
    assert expert == 3 * 7168 * 2048 == 44_040_192
    assert M.router_linear(7168, 256) == (7168, 256)
    # causal: S/2 keys on average; QK^T over d_qk = 192, PV over d_v = 128
    assert M.attention_core_flops(128, 192, 128, M.attention_context(4096)) == \
        2 * 128 * 320 * 2048
    assert M.attention_context(4096, causal=False) == 4096
    assert M.train_flops(10, 7) == 6 * 10 + 3 * 7


def test_kv_elements():
    assert M.mla_kv_elements(512, 64) == 576
    assert M.gqa_kv_elements(8, 128) == 2048


def test_formulas_accept_symbols():
    import sympy

    d, n = sympy.symbols("d n", positive=True)
    assert M.gqa_kv_elements(n, d) == 2 * n * d
    assert sympy.expand(M.mtp_extra_params(d) - 2 * d**2) == 3 * d


# ----------------------------------------------------------------------------- DeepSeek-V3


def test_v3_kv_cache_is_exact(v3):
    assert v3.value("model.kv_cache_bytes_per_token") == 70_272  # (512 + 64) x 2 B x 61


def test_v3_training_flops_per_token(v3):
    assert close(v3.value("model.train_flops_per_token"), 250e9, "report_published_1pct")
    # the convention's two parts, 219.8 + 30.7 GFLOPs
    assert close(v3.value("model.train_flops_per_token_matmul"), 219.8e9, "report_published_1pct")
    assert close(v3.value("model.train_flops_per_token_attention"), 30.7e9,
                 "report_published_1pct")
    assert v3.value("model.train_flops_per_token_noncausal") > \
        v3.value("model.train_flops_per_token")


def test_v3_parameters(v3):
    assert close(v3.value("model.params_total"), 671e9, "report_published_1pct")
    # active counts embedding and head (37.5B from the config), within 3% of 37B
    assert close(v3.value("model.params_active"), 37e9, "report_published_3pct")
    assert round(v3.value("model.params_active") / 1e8) == 376  # 37.55B
    assert v3.value("model.params_active") - v3.value("model.params_active_nonembedding") == \
        129280 * 7168
    # MTP: one MoE block + 2d -> d projection + three norms; 682.6B with it (685B download
    # counts its own embedding and head copies too)
    assert v3.value("model.params_mtp") == 187_114_496 + 11_320_171_520 + 2 * 7168**2 + 3 * 7168
    assert v3.value("model.ffn.moe.params_per_expert") == 44_040_192


def test_v3_per_layer_kinds(v3):
    assert v3.value("model.layers.mla+dense.count") == 3
    assert v3.value("model.layers.mla+moe.count") == 58
    total = (v3.value("model.layers.mla+dense.params") + v3.value("model.layers.mla+moe.params")
             + v3.value("model.params_embedding") + v3.value("model.params_head"))
    assert total == v3.value("model.params_total")


# ----------------------------------------------------------------------------- other models


def test_deepseek_v2_lite_by_hand():
    r = build_report(dsl.load(EXAMPLES / "deepseek_v2_lite.dsv"))
    d, V = 2048, 102400
    attn = d * 3072 + d * 576 + 512 * 16 * 256 + 2048 * d + (d + 512)  # plain q, no q norm
    expert = 3 * d * 1408
    moe = 64 * expert + 2 * expert + d * 64 + d
    dense = 3 * d * 10944 + d
    total = 2 * V * d + d + 27 * attn + dense + 26 * moe
    assert r.value("model.attention.mla.params") == attn == 13_765_120
    assert r.value("model.params_total") == total == 15_706_484_224  # "16B"
    active = 2 * V * d + d + 27 * attn + dense + 26 * (8 * expert + d * 64 + d)
    assert r.value("model.params_active") == active
    assert r.value("model.kv_cache_bytes_per_token") == 27 * 576 * 2
    matmul = 27 * (attn - d - 512) + 3 * d * 10944 + 26 * (8 * expert + d * 64) + d * V
    core = 27 * 2 * 16 * (192 + 128) * 2048
    assert r.value("model.train_flops_per_token") == 6 * matmul + 3 * core
    assert r.value("model.params_mtp") == 0


def test_dense_gqa_llama3_8b_by_hand():
    r = build_report(dsl.load(SPECS / "llama3_8b_gqa.dsv"))
    d, V, L = 4096, 128256, 32
    attn = d * 4096 + 2 * d * 1024 + 4096 * d
    ffn = 3 * d * 14336
    assert r.value("model.params_total") == 2 * V * d + d + L * (attn + ffn + 2 * d) \
        == 8_030_261_248
    assert r.value("model.params_active") == r.value("model.params_total")  # dense
    assert r.value("model.kv_cache_bytes_per_token") == L * 2 * 8 * 128 * 2  # 128 KiB
    core = L * 2 * 32 * 256 * 4096  # QK^T + PV over 128-dim heads, S/2 = 4096 of 8192
    assert r.value("model.train_flops_per_token") == 6 * (L * (attn + ffn) + d * V) + 3 * core


def test_mha_llama2_7b_by_hand():
    r = build_report(dsl.load(SPECS / "llama2_7b_mha.dsv"))
    d, V, L = 4096, 32000, 32
    assert r.value("model.params_total") == 2 * V * d + d + L * (4 * d * d + 3 * d * 11008
                                                                 + 2 * d) == 6_738_415_616
    assert r.value("model.kv_cache_bytes_per_token") == L * 2 * d * 2  # 512 KiB
    # a model-only spec still has every required key, as n/a
    assert r.value("memory.max_gpu_bytes") is None and r.value("step.mfu") is None


def test_tied_embeddings_drop_the_head_matrix():
    text = (SPECS / "llama2_7b_mha.dsv").read_text()
    text = text.replace("max_seq = 4096", "max_seq = 4096\n  tie_embeddings = true")
    r = build_report(dsl.loads(text, str(SPECS / "tied.dsv")))
    assert r.value("model.params_head") == 4096  # the final norm only
    assert r.value("model.params_total") == 6_738_415_616 - 32000 * 4096


# ----------------------------------------------------------------------------- one source


@pytest.mark.parametrize("path", [EXAMPLES / "deepseek_v3.dsv", EXAMPLES / "tiny.dsv",
                                  EXAMPLES / "deepseek_v2_lite.dsv", *sorted(SPECS.glob("*.dsv"))],
                         ids=lambda p: p.name)
def test_symbolic_formulas_evaluate_to_the_numeric_values(path):
    spec = dsl.load(path)
    num = build_report(spec)
    sym = build_report(spec, symbolic=True)
    assert [f.key for f in num.figures] == [f.key for f in sym.figures]
    q = Quantities(symbolic=True)
    for s in sym.symbols:
        q.sym(s.name, s.value)
    for d in sym.derived:
        q.let(d.name, d.formula)
    checked = 0
    for a, b in zip(num.figures, sym.figures):
        if b.formula is None:
            assert a.value == b.value, a.key
            continue
        value = q.num(b.formula)  # the printed formula, evaluated from the legend
        assert close(value, a.value, "report_symbolic_vs_numeric"), (a.key, value, a.value)
        checked += 1
    assert checked >= 10
