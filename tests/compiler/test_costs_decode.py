"""Decode speed limit under EP: the ISCA 2025 paper's section 2.3 numbers."""

from __future__ import annotations

import functools
import math

from dsvc import dsl
from dsvc.compiler.costs.decode import decode_stage_time
from dsvc.compiler.driver import build_report

# The cost formulas on the documented even split (no graph, no simulation).
build_report = functools.partial(build_report, even_split=True)
from tests.conftest import EXAMPLES, ROOT
from tests.tolerances import tol

SPECS = ROOT / "tests" / "compiler" / "specs"


def close(a, b, name="report_published_1pct"):
    rtol, atol = tol(name)
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def v3_with_decode(block: str):
    """DeepSeek-V3 with its decode block replaced (includes resolve from examples/)."""
    text = (EXAMPLES / "deepseek_v3.dsv").read_text()
    start = text.index("decode {")
    end = text.index("}", start) + 1
    return dsl.loads(text[:start] + block + text[end:], str(EXAMPLES / "v3_decode.dsv"))


def test_stage_formula():
    # (1 + 2) B x 32 tokens x 9 experts x 7000 / 50 GB/s
    assert close(decode_stage_time(1, 2, 32, 9, 7000, 50e9), 120.96e-6, "report_hand_float")


def test_v3_with_its_hidden_size():
    r = build_report(dsl.load(EXAMPLES / "deepseek_v3.dsv"))
    assert close(r.value("decode.comm_s_per_stage"), 123.86e-6)
    assert close(r.value("decode.comm_s_per_layer"), 2 * 123.86e-6)
    assert close(r.value("decode.tpot_s"), 15.11e-3)
    assert close(r.value("decode.tokens_per_s"), 66.2)
    assert r.value("decode.experts_per_token") == 9
    # bytes per token and MoE layer (docs/report.md): the paper's (1 + 2) x 9 x 7168, and
    # what dsvc's runtime sends with the shared expert local: 8 x (7168 + 56 x 4 + 2 x 7168)
    assert r.value("decode.a2a_bytes_per_token_layer") == 193_536
    assert r.value("decode.a2a_bytes_per_token_layer_runtime") == 173_824
    assert r.value("model.kv_cache_bytes_per_token_mtp") == 1_152


def test_papers_rounded_hidden_gives_its_numbers():
    r = build_report(v3_with_decode("decode { tokens_per_device = 32, hidden = 7000 }"))
    assert close(r.value("decode.comm_s_per_stage"), 120.96e-6, "report_hand_float")
    assert close(r.value("decode.comm_s_per_layer"), 241.92e-6, "report_hand_float")
    assert close(r.value("decode.tpot_s"), 14.76e-3)
    assert int(r.value("decode.tokens_per_s")) == 67  # "about 67 tokens/s"


def test_link_choice_and_tokens():
    eff = build_report(v3_with_decode("decode { link = effective }"))  # 40 GB/s instead of 50
    assert close(eff.value("decode.comm_s_per_stage"), 123.86e-6 * 50 / 40)
    more = build_report(v3_with_decode("decode { tokens_per_device = 64 }"))
    assert close(more.value("decode.tpot_s"), 2 * 15.11e-3)


def test_nvlink_domain_decode_by_hand():
    r = build_report(dsl.load(SPECS / "v2_lite_nvl72.dsv"))
    stage = 3 * 32 * (6 + 2) * 2048 / 900e9  # 6 routed + 2 shared experts, NVLink 900 GB/s
    assert close(r.value("decode.comm_s_per_stage"), stage, "report_hand_float")
    assert close(r.value("decode.tpot_s"), 27 * 2 * stage, "report_hand_float")


def test_no_decode_without_moe_or_block():
    r = build_report(dsl.load(SPECS / "llama3_8b_gqa.dsv"))
    assert r.value("decode.tpot_s") is None
    assert r.figure("decode.tpot_s").note == "no decode block"
