"""Decoding on one process: the KV cache against the training forward, MTP drafting, sampling.

- prefill + one-token decode steps give the training forward's logits on the same
  sequence (fp32), MLA absorbed and unabsorbed (YaRN active, positions past the
  original length), GQA with and without q/k/v biases;
- the MTP chain at decode time gives, at every committed position, the MTP logits of
  the training forward on the final sequence (depth 1 and 2): the bookkeeping of
  speculative decoding's per-depth caches is exact;
- greedy output is the same with and without drafting, and a row decoded in a batch
  with rows of other lengths equals it decoded alone;
- speculative sampling's accept/resample rule reproduces the target distribution.
"""

from __future__ import annotations

import pytest
import torch

from dsvc.runtime.decode import Decoder
from dsvc.runtime.generate import GenerationConfig, generate
from dsvc.runtime.hf import model_logits
from dsvc.runtime.init import init_parameters
from dsvc.runtime.kv_cache import KVCache
from dsvc.runtime.model import build_full_model
from dsvc.runtime.plan import parse_plan
from dsvc.runtime.sampling import Sampling, accept_draft
from dsvc.runtime.tiny import tiny_plan
from tests.tolerances import tol

SEQ, PREFILL = 40, 28


def _model(attention: str = "mla", mtp_depth: int = 2, qkv_bias: bool = False,
           precision: str = "fp32"):
    raw = tiny_plan(pp=1, dp=1, ep=1, precision=precision, num_layers=3, mtp_depth=mtp_depth)
    m = raw["model"]
    # YaRN active: the context (64) is past the original length (16), and the decoded
    # positions 28..39 lie beyond it
    m["rope"].update(original_max_seq=16, factor=4.0)
    if attention == "gqa":
        m["attention"] = {"gqa": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 16,
                                  "qkv_bias": qkv_bias}}
        for layer in m["layers"]:
            layer["attention"] = "gqa"
    m["init_std"] = 0.1  # logits and routing far from trivial
    plan = parse_plan(raw)
    model = build_full_model(plan)
    init_parameters(model, 0, 0.1)
    if qkv_bias:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _tokens(vocab: int, rows: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("attention,absorb,bias", [
    ("mla", True, False), ("mla", False, False), ("gqa", True, False), ("gqa", True, True),
])  # fmt: skip
def test_prefill_then_decode_equals_the_training_forward(attention, absorb, bias):
    model = _model(attention, qkv_bias=bias)
    tokens = _tokens(model.plan.model.vocab)
    want = model_logits(model, tokens)
    dec = Decoder.allocate(model, 2, 64, absorb=absorb)
    _, first = dec.main(tokens[:, :PREFILL], torch.arange(PREFILL).expand(2, -1))
    steps = [first]
    for i in range(PREFILL, SEQ):
        _, lg = dec.main(tokens[:, i : i + 1], torch.full((2, 1), i))
        steps.append(lg)
    rtol, atol = tol("decode_vs_forward")
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=rtol, atol=atol)


def test_fp8_decode_unabsorbed_is_the_forward_and_absorbed_no_further_from_fp32():
    """FP8 linears (DeepSeek-V3's recipe, emulated), bf16 cache and core. Unabsorbed, decoding
    runs the training forward's products token by token (1 x 128 activation tiles are per
    token), so it gives its logits to bf16 rounding. Absorbed, the latent skips kv_b_proj's
    activation quantisation and meets the dequantised FP8 weight in bf16: another rounding,
    no further from the fp32 model than the FP8 forward is."""
    torch.manual_seed(0)
    fp8, fp32 = _model("mla", mtp_depth=0, precision="fp8"), _model("mla", mtp_depth=0)
    fp32.load_state_dict(fp8.state_dict())
    tokens = _tokens(fp8.plan.model.vocab)
    forward, exact = model_logits(fp8, tokens), model_logits(fp32, tokens)
    got = {}
    for absorb in (True, False):
        dec = Decoder.allocate(fp8, 2, 64, absorb=absorb)
        _, first = dec.main(tokens[:, :PREFILL], torch.arange(PREFILL).expand(2, -1))
        steps = [first] + [dec.main(tokens[:, i : i + 1], torch.full((2, 1), i))[1]
                           for i in range(PREFILL, SEQ)]  # fmt: skip
        got[absorb] = torch.cat(steps, 1)
    rtol, atol = tol("fp8_gemm_bf16_out")
    torch.testing.assert_close(got[False], forward, rtol=rtol, atol=atol)

    def rel(a):
        return float((a - exact).norm() / exact.norm())

    assert rel(got[True]) <= tol("fp8_absorbed_vs_forward")[0] * rel(forward)
    assert rel(got[True]) > 0  # a different rounding, not the same products


def test_absorbed_weight_follows_the_parameter():
    model = _model("mla", mtp_depth=0, precision="fp8")
    lin = model.layers["0"].self_attn.kv_b_proj
    first = lin.dense_weight(torch.bfloat16)
    assert lin.dense_weight(torch.bfloat16) is first  # kept while the weight is unchanged
    with torch.no_grad():
        lin.weight.mul_(2)  # scales double with the blocks: the codes stay, exactly
    torch.testing.assert_close(lin.dense_weight(torch.bfloat16), 2 * first, rtol=0, atol=0)


def test_absorbed_and_unabsorbed_caches_hold_the_same_latent():
    """Absorption changes the attention products only: the first layer's cache is the same
    bit for bit (later layers' inputs carry the products' rounding), and the cache holds
    kv_lora_rank + qk_rope_dim values per token per layer, nothing per head."""
    model = _model("mla")
    tokens = _tokens(model.plan.model.vocab)
    caches = []
    for absorb in (True, False):
        dec = Decoder.allocate(model, 2, 64, absorb=absorb, mtp=False)
        dec.main(tokens, torch.arange(SEQ).expand(2, -1))
        caches.append(dec.cache)
    a, b = caches
    assert sorted(a.layers) == ["layers.0", "layers.1", "layers.2"]
    for name, layer in a.layers.items():
        assert {k: tuple(v.shape) for k, v in layer.buffers.items()} == {
            "latent": (2, 64, 32), "k_pe": (2, 64, 8)}
        rtol, atol = (0, 0) if name == "layers.0" else tol("decode_vs_forward")
        for key, buf in layer.buffers.items():
            torch.testing.assert_close(buf, b[name].buffers[key], rtol=rtol, atol=atol)


def test_mtp_chain_at_decode_time_equals_the_training_forward():
    """Every depth's logits at every committed position (all inputs true tokens) equal the
    MTP logits of the training forward on the sequence the decoding produced."""
    model = _model("mla", mtp_depth=2)
    dec = Decoder.allocate(model, 1, 64)
    seen: dict[tuple[int, int], torch.Tensor] = {}
    real = dec.mtp

    def record(depth, h, tokens, pos):
        hn, lg = real(depth, h, tokens, pos)
        for j, p in enumerate(pos[0].tolist()):
            seen[depth, p] = lg[0, j].clone()  # later rounds overwrite speculative entries
        return hn, lg

    dec.mtp = record
    prompt = _tokens(model.plan.model.vocab, 1)[0, :12].tolist()
    res = generate(dec, [prompt], GenerationConfig(max_new_tokens=20, draft_depth=2))
    seq = torch.tensor([prompt + res.tokens[0]])
    _, want = model_logits(model, seq, mtp=True)
    rtol, atol = tol("decode_vs_forward")
    checked = 0
    for (depth, p), got in seen.items():
        if p + depth <= seq.shape[1] - 1 - 1:  # inputs up to t_{p+depth}, all emitted tokens
            torch.testing.assert_close(got, want[depth - 1][0, p], rtol=rtol, atol=atol)
            checked += 1
    assert checked >= 2 * (seq.shape[1] - 4)


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_greedy_output_is_the_same_with_and_without_drafting(attention):
    model = _model(attention, mtp_depth=2)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10] * 12]
    outs = {}
    for depth in (0, 1, 2):
        dec = Decoder.allocate(model, 3, 64)
        res = generate(dec, prompts, GenerationConfig(max_new_tokens=16, draft_depth=depth))
        outs[depth] = res.tokens
        assert [len(t) for t in res.tokens] == [16] * 3 and res.finish == ["length"] * 3
        if depth:
            # every verification emits the accepted drafts plus one: never fewer than plain
            assert res.tokens_per_forward == pytest.approx(
                1 + sum(res.accepted) / res.row_forwards)
            assert res.drafted[0] == res.row_forwards
    assert outs[0] == outs[1] == outs[2]
    for i, p in enumerate(prompts):  # a row of a ragged batch decodes as it would alone
        dec = Decoder.allocate(model, 1, 64)
        assert generate(dec, [p], GenerationConfig(max_new_tokens=16)).tokens[0] == outs[0][i]


def test_stop_tokens_end_a_row_and_are_kept():
    model = _model("mla", mtp_depth=1)
    dec = Decoder.allocate(model, 2, 64)
    free = generate(dec, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=12)).tokens
    stop = free[0][4]
    for depth in (0, 1):
        dec = Decoder.allocate(model, 2, 64)
        res = generate(dec, [[1, 2, 3], [4, 5]],
                       GenerationConfig(max_new_tokens=12, stop=(stop,), draft_depth=depth))
        cut = free[0].index(stop) + 1
        assert res.tokens[0] == free[0][:cut] and res.finish[0] == "stop"
        assert res.tokens[1] == free[1][: len(res.tokens[1])]


def test_sampling_is_seeded_per_row_and_top_p_restricts():
    model = _model("mla", mtp_depth=1)
    cfg = GenerationConfig(max_new_tokens=10, sampling=Sampling(1.0, 0.9, seed=3))
    runs = []
    for prompts in ([[1, 2, 3], [4, 5, 6]], [[4, 5, 6], [1, 2, 3]]):
        dec = Decoder.allocate(model, 2, 64)
        runs.append(generate(dec, prompts, cfg, rows=[0, 1] if len(runs) == 0 else [1, 0]))
    assert runs[0].tokens == runs[1].tokens[::-1]  # a row's draws follow it, not its slot
    greedy = generate(Decoder.allocate(model, 2, 64), [[1, 2, 3], [4, 5, 6]],
                      GenerationConfig(max_new_tokens=10)).tokens
    assert runs[0].tokens != greedy
    p = Sampling(1.0, 0.5).probs(torch.tensor([[3.0, 2.0, 1.0, 0.0]]))
    assert p[0, 2:].sum() == 0 and p.sum() == pytest.approx(1.0)  # 0.67 of the mass in one


def test_speculative_sampling_rule_keeps_the_target_distribution():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=gen))
        _, tok = accept_draft(p, q, draft, gen)
        counts[tok] += 1
    torch.testing.assert_close(counts / n, p, rtol=0, atol=0.025)  # 3 sigma at n = 4000: 0.024


def test_cache_is_allocated_in_the_attention_core_dtype():
    raw = tiny_plan(pp=1, dp=1, ep=1, precision="bf16", num_layers=2, mtp_depth=1)
    plan = parse_plan(raw)
    cache = KVCache.allocate(plan, 3, 10)
    assert {b.dtype for c in cache.layers.values() for b in c.buffers.values()} == {
        torch.bfloat16}
    assert cache.bytes_per_token("main") == 2 * (32 + 8) * 2
    assert cache.bytes_per_token("mtp") == (32 + 8) * 2
