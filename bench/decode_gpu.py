"""Decode tokens/s on one GPU: dsvc's runtime against transformers' `generate`, same weights.

    python bench/decode_gpu.py [--hidden 1024] [--layers 6] [--experts 32] [--batch 8]
                               [--prompt 512] [--new 128] [--iters 3] [--cpu-smoke]

A DeepSeek-V3-shaped model (MLA with q LoRA, 1 dense + MoE layers with a shared
expert and group-limited sigmoid routing, YaRN) is built by transformers
(`DeepseekV3ForCausalLM` from the config `runtime.hf.hf_config_from_plan` writes)
with random weights, saved, and loaded by the runtime (`runtime.hf`): the same
weights on both sides, bf16. Both decode the same random prompts greedily:

- runtime: `runtime.decode.Decoder` + `runtime.generate.generate` (the latent cache,
  absorbed MLA, grouped experts);
- reference: transformers' `generate` with its own KV cache (`use_cache=True`).

Decode time is the time for `--new` tokens minus the time for one (the prefill), best
of `--iters`; printed: tokens/s of each, the ratio, and how many leading greedy tokens
agree (bf16 rounding differs between the two, so long continuations may part). Without
CUDA it says so and exits 0; `--cpu-smoke` runs a tiny fp32 model on the CPU, where the
continuations must agree exactly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import source_tree  # noqa: E402,F401  (dsvc from this tree, installed or not)
import torch

from dsvc.runtime.decode import Decoder
from dsvc.runtime.generate import GenerationConfig, cache_positions, generate
from dsvc.runtime.hf import hf_config_from_plan, load_hf_checkpoint
from dsvc.runtime.model import build_full_model
from dsvc.runtime.tiny import tiny_plan
from dsvc.runtime.trained import serving_plan


def make_plan(args, dtype: str):
    raw = tiny_plan(pp=1, dp=1, ep=1, precision=dtype, num_layers=args.layers, mtp_depth=0)
    m = raw["model"]
    h = args.hidden
    # YaRN on (the context 4x the original length), its factor consistent with the two
    context = args.prompt + args.new
    m.update(vocab=args.vocab, hidden=h, max_seq_len=4 * context)
    m["rope"].update(original_max_seq=context, factor=4.0)
    m["attention"]["mla"].update(heads=max(h // 128, 2), q_lora_rank=h // 4, kv_lora_rank=h // 4,
                                 qk_nope_dim=64, qk_rope_dim=32, v_dim=64)
    m["ffn"]["dense"]["intermediate"] = 4 * h
    groups = 8 if args.experts >= 16 else 2
    m["ffn"]["moe"].update(routed=args.experts, top_k=min(8, args.experts // 2),
                           intermediate=h // 2, shared_intermediate=h // 2, groups=groups,
                           top_groups=max(groups // 2, 1))
    return serving_plan(m, raw["precision"])  # one process, experts and groups as set here


def hf_model(plan, device, dtype):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = {k: v for k, v in hf_config_from_plan(plan, "float32").items() if k != "dsvc"}
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg))
    with torch.no_grad():  # norms near 1, a nonzero router bias: routing far from trivial
        for name, t in model.state_dict(keep_vars=True).items():
            if "norm" in name:
                t.copy_(1 + 0.1 * torch.randn_like(t))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.05 * torch.randn_like(t))
            else:
                t.normal_(0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def best_of(iters: int, fn, sync) -> float:
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny fp32 model on the CPU")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.hidden, args.layers, args.experts, args.vocab = 128, 3, 8, 256
        args.batch, args.prompt, args.new, args.iters = 2, 16, 8, 2
        device, dtype, mode, sync = torch.device("cpu"), torch.float32, "fp32", lambda: None
    elif not torch.cuda.is_available():
        print("decode_gpu: no CUDA device here; nothing to time (run it on a GPU)")
        return 0
    else:
        device, dtype, mode = torch.device("cuda"), torch.bfloat16, "bf16"
        sync = torch.cuda.synchronize
    try:
        import transformers
    except ImportError:
        print("decode_gpu: transformers is not installed; it is the reference (pip install "
              "transformers)")
        return 0
    plan = make_plan(args, mode)
    hf = hf_model(plan, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        rt = build_full_model(plan)
        load_hf_checkpoint(tmp, rt, plan)
    rt = rt.to(device).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=gen).to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    a = plan.model.attention["mla"]
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}: "
          f"hidden {args.hidden}, {args.layers} layers (MLA {a.heads} heads, kv_lora "
          f"{a.kv_lora_rank}; {args.experts} experts top {plan.model.ffn['moe'].top_k} + 1 "
          f"shared), {mode}; batch {args.batch}, prompt {args.prompt}, {args.new} new tokens")

    def runtime(new: int):
        dec = Decoder.allocate(rt, args.batch, cache_positions(args.prompt, new), mtp=False)
        return generate(dec, prompts.tolist(), GenerationConfig(max_new_tokens=new))

    def reference(new: int):
        with torch.no_grad():
            return hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                               max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               use_cache=True, pad_token_id=0)  # fmt: skip

    ours = runtime(args.new).tokens
    theirs = reference(args.new)[:, args.prompt :].tolist()
    t_rt = best_of(args.iters, lambda: runtime(args.new), sync)
    t_rt1 = best_of(args.iters, lambda: runtime(1), sync)
    t_hf = best_of(args.iters, lambda: reference(args.new), sync)
    t_hf1 = best_of(args.iters, lambda: reference(1), sync)
    tokens = args.batch * (args.new - 1)
    rate_rt = tokens / max(t_rt - t_rt1, 1e-9)
    rate_hf = tokens / max(t_hf - t_hf1, 1e-9)
    agree = []
    for a_row, b_row in zip(ours, theirs):
        n = 0
        while n < len(a_row) and a_row[n] == b_row[n]:
            n += 1
        agree.append(n)
    print(f"  runtime       {rate_rt:10.1f} tokens/s (decode; prefill {t_rt1 * 1e3:.1f} ms)")
    print(f"  transformers  {rate_hf:10.1f} tokens/s (decode; prefill {t_hf1 * 1e3:.1f} ms)")
    print(f"  ratio         {rate_rt / rate_hf:10.2f}x runtime / transformers")
    print(f"  greedy tokens agreeing from the start, per row: {agree} of {args.new}")
    if args.cpu_smoke and ours != theirs:
        print("decode_gpu: FAILED: fp32 continuations differ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
