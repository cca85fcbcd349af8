"""MTP speculative decoding on CPU, for a model `dsvc train` trained on natural text.

    python bench/decode_cpu.py [--work DIR] [--steps 2000] [--run DIR] [--new 128]

1. The corpus: the Python standard library's own sources (`*.py`, no tests, no
   site-packages), tokenised byte by byte by `dsvc tokenize --tokenizer bytes
   --shuffle 0` into WORK/stdlib.bin (about 12M tokens for Python 3.11).
2. The model: bench/specs/decode_text.dsv (MLA, shared + routed experts, MTP depth 2,
   fp32) trained by `dsvc train` for `--steps` steps (16 x 256 tokens each) into
   WORK/run, unless `--run DIR` names a run directory trained that way already
   (training takes hours on two cores: run it once, then reuse it).
3. Decoding: prompts are 192-byte windows of the last 5% of the token file (never
   trained on: the run reads the file from the start), each continued greedily by
   `--new` tokens, one row at a time (latency-bound decoding) and as one batch,
   without MTP (the reference, measured in the same run) and drafting with depth 1
   and 2. Each setting is timed `--repeat` times, the settings interleaved, and the
   best time kept (the machine may be shared). Printed: acceptance per depth, tokens
   per verification forward, tokens/s and the ratio against no drafting; and that
   every continuation is the same. Before that, on held-out text (teacher-forced),
   the main model's next-byte accuracy and how often each MTP depth's guess equals
   the main model's greedy choice: the acceptance drafting would see there, free of
   the loops greedy continuations of a small model fall into; `--curve` prints it
   for every checkpoint of the run (how long the MTP head takes to learn).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import source_tree  # noqa: E402,F401  (dsvc from this tree, installed or not)
import torch

from dsvc.runtime import checkpoint as ckpt
from dsvc.runtime.decode import Decoder
from dsvc.runtime.generate import GenerationConfig, cache_positions, generate
from dsvc.runtime.hf import model_logits
from dsvc.runtime.trained import (
    build_serving_model,
    find_checkpoint,
    load_checkpoint_weights,
    serving_plan,
)

SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs", "decode_text.dsv")
TOKENS_PER_STEP = 16 * 256  # bench/specs/decode_text.dsv: global_batch x seq_len
EXCLUDE = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")


def dsvc(*args: str) -> None:
    cmd = [sys.executable, "-m", "dsvc.compiler.cli", *args]
    print("$ dsvc " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def prepare(work: str, steps: int, run: str | None) -> tuple[str, str]:
    """(token file, run directory): tokenise the standard library and train, as needed."""
    os.makedirs(work, exist_ok=True)
    tokens = os.path.join(work, "stdlib.bin")
    if not os.path.exists(tokens):
        excl = [a for x in EXCLUDE for a in ("--exclude", x)]
        dsvc("tokenize", sysconfig.get_paths()["stdlib"], "--glob", "*.py", *excl,
             "--tokenizer", "bytes", "--shuffle", "0", "-o", tokens)
    if run is None:
        run = os.path.join(work, "run")
        spec = os.path.join(work, "decode_text.dsv")
        shutil.copy(SPEC, spec)  # its tokens("stdlib.bin") resolves beside it
        dsvc("train", spec, "--steps", str(steps), "--run-dir", run, "--resume")
    return tokens, run


def held_out_prompts(tokens: str, count: int, length: int) -> list[list[int]]:
    ids = np.fromfile(tokens, dtype=np.uint16)
    start = int(len(ids) * 0.95)
    step = (len(ids) - start - length) // count
    out = []
    for i in range(count):
        window = ids[start + i * step : start + i * step + length].tolist()
        out.append([t for t in window if t != 256] or [10])  # no end-of-document in a prompt
    return out


def held_out_windows(tokens: str, count: int, length: int) -> torch.Tensor:
    ids = np.fromfile(tokens, dtype=np.uint16)
    start = int(len(ids) * 0.95)
    step = (len(ids) - start - length) // count
    rows = [ids[start + i * step : start + i * step + length].astype(np.int64)
            for i in range(count)]
    return torch.from_numpy(np.stack(rows))


@torch.no_grad()
def teacher_forced(model, windows: torch.Tensor) -> tuple[float, list[float]]:
    """(main next-token accuracy, per depth k: how often MTP depth k's argmax at position i
    equals the main model's argmax at position i + k), on the true text."""
    main, mtps = model_logits(model, windows, mtp=True)
    best = main.argmax(-1)  # (B, S): the main model's choice for token i + 1
    acc = float((best[:, :-1] == windows[:, 1:]).float().mean())
    agree = []
    for k, lg in enumerate(mtps, start=1):  # depth k at i predicts token i + k + 1
        guess = lg.argmax(-1)[:, : -k - 1]
        agree.append(float((guess == best[:, k:-1]).float().mean()))
    return acc, agree


def load(path: str):
    meta = ckpt.read_meta(path)
    plan = serving_plan(meta["plan"]["model"], meta["plan"]["precision"])
    model = build_serving_model(plan)
    load_checkpoint_weights(path, model, plan, meta)
    return model.eval(), meta


def decode(model, prompts, new: int, depth: int, batch: bool):
    """Continuations and (tokens, decode seconds, accepted, drafted, row forwards)."""
    groups = [prompts] if batch else [[p] for p in prompts]
    tokens, totals = [], [0, 0.0, [0] * depth, [0] * depth, 0]
    for group in groups:
        dec = Decoder.allocate(model, len(group), cache_positions(max(map(len, group)), new, depth),
                               mtp=depth > 0)
        res = generate(dec, group, GenerationConfig(max_new_tokens=new, draft_depth=depth))
        tokens += res.tokens
        totals[0] += res.decode_tokens
        totals[1] += res.decode_s
        totals[2] = [a + b for a, b in zip(totals[2], res.accepted)]
        totals[3] = [a + b for a, b in zip(totals[3], res.drafted)]
        totals[4] += res.row_forwards
    return tokens, totals


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="bench_decode", help="corpus, spec copy and run directory")
    p.add_argument("--steps", type=int, default=2000, help="training steps (without --run)")
    p.add_argument("--run", help="a run directory trained on WORK/stdlib.bin already")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timings per setting (best kept)")
    p.add_argument("--curve", action="store_true", help="acceptance at every checkpoint")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokens, run = prepare(args.work, args.steps, args.run)
    path = find_checkpoint(run)
    model, meta = load(path)
    depth = model.plan.model.mtp.depth
    print(f"model: {path} (step {meta['step']}, {meta['step'] * TOKENS_PER_STEP / 1e6:.1f}M "
          f"tokens trained), MTP depth {depth}, {args.prompts} held-out prompts of 192 "
          f"bytes, {args.new} new tokens each, greedy, {args.threads} thread(s), best of "
          f"{args.repeat}")
    prompts = held_out_prompts(tokens, args.prompts, 192)
    windows = held_out_windows(tokens, 16, 256)
    steps = ckpt.complete_steps(os.path.join(run, "checkpoints")) if args.curve else []
    print("\nheld-out text, teacher-forced (16 windows of 256 bytes): the main model's next-"
          "byte accuracy, and how often MTP depth k's guess for byte i+k+1 equals the main "
          "model's greedy choice there (the acceptance drafting would see on this text)")
    for step in steps or [meta["step"]]:
        m = model if step == meta["step"] else load(
            ckpt.step_dir(os.path.join(run, "checkpoints"), step))[0]
        main_acc, agree = teacher_forced(m, windows)
        print(f"  step {step:5d}  next byte {main_acc:6.1%}  " + "  ".join(
            f"depth {k + 1} {a:6.1%}" for k, a in enumerate(agree)))
    for batch in (False, True):
        print(f"\n{'one batch of ' + str(len(prompts)) + ' rows' if batch else 'one row at a time'}")
        print(f"  {'drafting':<12} {'tokens/s':>9} {'vs none':>8} {'tok/verify':>10}  acceptance")
        best: dict[int, tuple] = {}
        for _ in range(args.repeat):
            for d in range(depth + 1):
                out, counts = decode(model, prompts, args.new, d, batch)
                if d not in best or counts[1] < best[d][1][1]:
                    best[d] = (out, counts)
        base = best[0][1][0] / best[0][1][1]
        for d, (out, (n, secs, acc, drafted, fwd)) in sorted(best.items()):
            accept = ", ".join(f"depth {k + 1} {a / max(t, 1):.1%}"
                               for k, (a, t) in enumerate(zip(acc, drafted)))
            print(f"  {'none' if d == 0 else f'MTP depth {d}':<12} {n / secs:9.1f} "
                  f"{n / secs / base:7.2f}x {n / fwd:10.2f}  {accept or '-'}")
            if out != best[0][0]:
                print("  ERROR: the continuations differ from decoding without drafts")
                return 1
    sample = prompts[0]
    dec = Decoder.allocate(model, 1, cache_positions(len(sample), 64))
    cont = generate(dec, [sample], GenerationConfig(max_new_tokens=64)).tokens[0]
    def text(ids):
        return bytes(t for t in ids if t < 256).decode("utf-8", "replace")

    print(f"\nsample, prompt then continuation:\n{text(sample)}\u2588{text(cont)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
