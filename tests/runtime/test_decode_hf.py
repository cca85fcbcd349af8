"""Decoding against transformers' `generate` on tiny DeepseekV3 checkpoints made by transformers.

The same fp32 weights (tests/runtime/_hf_case.py: MLA with q LoRA, group-limited
sigmoid routing with a correction bias, a shared expert, a dense first layer; YaRN
active and plain RoPE) decode greedily in the runtime, with the latent cache absorbed
and not, and in transformers (`generate`, its own KV cache); every step's logits agree
within the HF tolerance and the tokens are equal. MTP is off here: transformers does
not run it.
"""

from __future__ import annotations

import pytest
import torch

from dsvc.runtime.decode import Decoder
from dsvc.runtime.generate import GenerationConfig, generate
from tests.runtime._hf_case import get_case
from tests.tolerances import tol

NEW = 12


@pytest.mark.parametrize("rope,absorb", [("yarn", True), ("yarn", False), ("plain", True)])
def test_greedy_decode_matches_transformers_generate(tmp_path_factory, rope, absorb):
    c = get_case(tmp_path_factory, rope)
    prompts = c.tokens[:, :20]
    with torch.no_grad():
        # the attention mask given: generate would otherwise mask prompt tokens equal to the
        # pad id as padding
        out = c.hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                            max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                            output_logits=True, return_dict_in_generate=True,
                            pad_token_id=0)  # fmt: skip
    want_tokens = out.sequences[:, 20:].tolist()
    want_logits = torch.stack(out.logits, dim=1)  # (B, NEW, V)
    rt, _ = c.load()
    dec = Decoder.allocate(rt, 2, 64, absorb=absorb, mtp=False)
    res = generate(dec, prompts.tolist(), GenerationConfig(max_new_tokens=NEW, keep_logits=True))
    assert res.tokens == want_tokens
    got = torch.stack([torch.stack(row) for row in res.logits])
    rtol, atol = tol("hf_logits")
    torch.testing.assert_close(got, want_logits.float(), rtol=rtol, atol=atol)


def test_gpu_bench_cpu_smoke(capsys):
    """bench/decode_gpu.py --cpu-smoke: the GPU bench's whole path (a transformers model saved
    and loaded by the runtime, both decoding the same prompts) on a tiny fp32 model, where
    the continuations must agree token for token."""
    from tests.bench_scripts import load_bench

    assert load_bench("decode_gpu").main(["--cpu-smoke"]) == 0
    out = capsys.readouterr().out
    assert "x runtime / transformers" in out and "per row: [8, 8] of 8" in out
