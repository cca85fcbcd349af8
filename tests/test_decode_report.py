"""The report's KV-cache figures against the cache the runtime allocates for decoding.

For the tiny example (MLA), LLaMA-3-8B (GQA) and DeepSeek-V3 with 5 of its 61 layers,
the bytes per token of the allocated `runtime.kv_cache.KVCache` (buffers' bytes over
rows x positions, in the plan's attention_core dtype) equal `dsvc report`'s
`model.kv_cache_bytes_per_token` exactly, and the MTP blocks' cache its
`model.kv_cache_bytes_per_token_mtp`. Scaled from 5 layers to 61, DeepSeek-V3's cache is
70,272 B per token (REFERENCE.md), which the report gives for the full model.
"""

from __future__ import annotations

import functools

import pytest

from dsvc import dsl
from dsvc.compiler.driver import build_plan, build_report
from dsvc.runtime.kv_cache import KVCache
from dsvc.runtime.trained import serving_plan
from tests.conftest import EXAMPLES

report = functools.partial(build_report, even_split=True)  # the model figures need no graph


def v3_with_layers(n: int):
    """DeepSeek-V3's spec with `n` layers (3 dense, the rest MoE) on 4 pipeline ranks."""
    text = (EXAMPLES / "deepseek_v3.dsv").read_text()
    assert "const LAYERS = 61" in text and "pipeline = 16" in text
    text = text.replace("const LAYERS = 61", f"const LAYERS = {n}")
    text = text.replace("pipeline = 16", "pipeline = 4")
    return dsl.loads(text, str(EXAMPLES / "v3_short.dsv"))


def measured(spec) -> tuple[int, int]:
    plan_raw = build_plan(spec)
    plan = serving_plan(plan_raw["model"], plan_raw["precision"])
    cache = KVCache.allocate(plan, batch=3, max_len=5)
    return cache.bytes_per_token("main"), cache.bytes_per_token("mtp")


@pytest.mark.parametrize("spec", [
    lambda: dsl.load(EXAMPLES / "tiny.dsv"),
    lambda: dsl.load(EXAMPLES / "llama3_8b.dsv"),
    lambda: v3_with_layers(5),
], ids=["tiny-mla", "llama3_8b-gqa", "v3-5-layers"])  # fmt: skip
def test_allocated_cache_equals_the_report(spec):
    s = spec()
    r = report(s)
    main, mtp = measured(s)
    assert main == r.value("model.kv_cache_bytes_per_token")
    assert mtp == r.value("model.kv_cache_bytes_per_token_mtp")
    assert main > 0


def test_v3_cache_scales_to_70272_bytes():
    main, mtp = measured(v3_with_layers(5))
    assert main == 5 * (512 + 64) * 2  # latent + RoPE key per layer, bf16
    assert main // 5 * 61 == 70_272
    assert report(dsl.load(EXAMPLES / "deepseek_v3.dsv")).value(
        "model.kv_cache_bytes_per_token") == 70_272
    assert mtp == (512 + 64) * 2  # the MTP module's block, beside the 61 layers
