"""`dsvc generate RUN_OR_CHECKPOINT | --hf DIR`: decode from a trained model.

The model comes from a `dsvc train` run directory or one of its checkpoints (the
checkpoint's record names its model, precision and training data; `--spec SPEC`
names them for checkpoints that predate that, and must be the spec the model was
trained from), or from a Hugging Face checkpoint directory (`--hf DIR`: its
config.json, as dsvc exported it or as `dsvc import-hf` reads it, or `--spec`).
Prompts are token ids (`--ids`) or text (`--prompt`), tokenised by `--tokenizer`,
else by the tokenizer of the run's token file (`dsvc tokenize` recorded it) or of
the HF directory. Every prompt is a row of one batch.

Decoding runs in the runtime (`dsvc.runtime.serve.run_job`): the latent KV cache
(MLA, absorbed by default), greedy or sampled, `--mtp` for speculative decoding
with the model's MTP modules, `--ep N` for N expert-parallel processes (torchrun
semantics, gloo on CPU) with dual micro-batch overlap. Linears run in the precision
the run trained in (or `--precision`). Continuations go to stdout (text, or ids),
the figures to stderr, `--jsonl FILE` writes one JSON object per row and a summary.
A user error (no checkpoint, a checkpoint of another spec, a prompt longer than the
context, a text prompt without a tokenizer) is one line and exit 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

PRECISIONS = ("fp32", "bf16", "fp8")


class GenerateError(Exception):
    """A user error that ends the command with one line and exit 1."""


class _Row(argparse.Action):
    """--prompt and --ids append (kind, value) rows to one list, in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        rows = list(getattr(namespace, self.dest) or [])
        rows.append((option_string.lstrip("-"), values))
        setattr(namespace, self.dest, rows)


def add_arguments(p) -> None:
    p.add_argument("source", nargs="?", metavar="RUN_OR_CHECKPOINT",
                   help="a `dsvc train` run directory or one of its checkpoints")
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint directory instead")
    p.add_argument("--spec", metavar="SPEC", help="the spec the model was trained from (needed "
                   "for checkpoints that do not record their model)")
    p.add_argument("--prompt", action=_Row, dest="rows", default=[], metavar="TEXT",
                   help="a text prompt (repeat for a batch; rows in the order given)")
    p.add_argument("--ids", action=_Row, dest="rows", default=[], metavar="IDS",
                   help="a prompt as token ids, '1,2,3' or '1 2 3' (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", type=int, default=[], metavar="ID",
                   help="a stop token id (repeatable; the tokenizer's end of text by default)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the tokenizer's end-of-text token")
    p.add_argument("--mtp", nargs="?", type=int, const=-1, default=0, metavar="DEPTH",
                   help="speculative decoding: draft with the first DEPTH MTP modules "
                   "(default: all of them)")
    p.add_argument("--no-absorb", action="store_true",
                   help="MLA: re-derive keys and values from the cached latent each step")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="override the precision (default: the run's, or the HF weights' dtype)")
    p.add_argument("--tokenizer", metavar="bytes|DIR", help="tokenizer for text prompts")
    p.add_argument("--ep", type=int, default=1, metavar="N",
                   help="expert-parallel processes (routed experts split over them)")
    p.add_argument("--no-overlap", action="store_true",
                   help="with --ep: do not split the batch into two overlapped micro-batches")
    p.add_argument("--jsonl", metavar="FILE", help="write one JSON object per row ('-': stdout)")


def _check_usage(args) -> None:
    from dsvc.compiler.cli import UsageError

    if (args.source is None) == (args.hf is None):
        raise UsageError("give a run directory or checkpoint, or --hf DIR (one of them)")
    if not args.rows:
        raise UsageError("give at least one --prompt TEXT or --ids IDS")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError("--temperature must be 0 (greedy) or a positive number")
    if not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if args.ep < 1:
        raise UsageError("--ep must be at least 1")
    if args.mtp is not None and args.mtp < -1:
        raise UsageError("--mtp DEPTH must be at least 0")
    if args.jsonl not in (None, "-"):
        parent = os.path.dirname(os.path.abspath(args.jsonl))
        if os.path.isdir(args.jsonl) or not os.path.isdir(parent):
            raise UsageError(f"--jsonl {args.jsonl}: not a file in an existing directory")


def _precision_preset(name: str) -> dict:
    from dsvc.runtime.tiny import tiny_precision

    return tiny_precision(name)  # fp32; bf16; fp8: DeepSeek-V3's recipe


# A plan needs a cluster, a parallel plan and a run; decoding uses only its model and
# precision, so a model-only spec (an HF import) gets these placeholders.
_RUN_BLOCKS = {
    "cluster": "cluster serving {\n  nodes = 1\n  gpus_per_node = 1\n"
               "  gpu = any { bf16 = 1 TFLOPS, fp8 = 1 TFLOPS, memory = 1 TB, hbm = 1 TB/s }\n"
               "  nvlink { domain = 1, bandwidth = 1 GB/s, effective = 1 GB/s }\n}\n",
    "parallel": "parallel { pipeline = 1 }\n",
    "train": "train {\n  seq_len = 1\n  global_batch = 1\n  optimizer = adamw(lr = 1e-4)\n}\n",
}


def _sections_of_spec_text(text: str, filename: str) -> dict:
    """{model, precision} sections of the plan of a spec (text), missing run blocks added."""
    from dsvc import dsl
    from dsvc.compiler.driver import build_plan

    spec = dsl.loads(text, filename=filename)
    extra = "".join(block for name, block in _RUN_BLOCKS.items() if getattr(spec, name) is None)
    if extra:
        spec = dsl.loads(text + "\n" + extra, filename=filename)
    plan = build_plan(spec)
    return {"model": plan["model"], "precision": plan["precision"]}


def _spec_sections(path: str) -> dict:
    from dsvc.dsl.files import read_text

    return _sections_of_spec_text(read_text(path), path)


def _resolve(args) -> tuple[dict, dict, object]:
    """(plan sections, weights, default tokenizer or None) of the model to decode."""
    from dsvc.compiler.tokenizer import TokenizerError, read_record, tokenizer_from_record
    from dsvc.runtime import checkpoint as ckpt
    from dsvc.runtime.inputs import load_json
    from dsvc.runtime.train_state import model_hash
    from dsvc.runtime.trained import find_checkpoint, recorded_plan

    tokenizer = None
    if args.source is not None:
        path = find_checkpoint(args.source)
        meta = ckpt.read_meta(path)
        if args.spec is not None:
            sections = _spec_sections(args.spec)
            if model_hash(sections) != meta.get("model_hash"):
                raise GenerateError(f"{path} is a checkpoint of a different model than "
                                    f"{args.spec} describes (model hash "
                                    f"{str(meta.get('model_hash'))[:12]}, the spec's "
                                    f"{model_hash(sections)[:12]}): it was not trained from it")
        elif recorded_plan(meta) is not None:
            plan = recorded_plan(meta)
            sections = {"model": plan["model"], "precision": plan["precision"]}
        else:
            raise GenerateError(f"{path} does not record its model (written by an older dsvc): "
                                "pass --spec SPEC, the spec it was trained from")
        plan = recorded_plan(meta) or {}
        data = (plan.get("train") or {}).get("data") or {}
        if data.get("kind") == "tokens" and data.get("path"):
            try:
                record = read_record(data["path"])
                if record is not None:
                    tokenizer = tokenizer_from_record(record, data["path"] + ".json")
            except TokenizerError:
                tokenizer = None  # named when a text prompt needs it
        return sections, {"kind": "checkpoint", "path": os.path.abspath(path)}, tokenizer
    root = args.hf
    cfg_path = os.path.join(root, "config.json")
    if not os.path.isdir(root) or not os.path.exists(cfg_path):
        raise GenerateError(f"--hf {root}: not a Hugging Face checkpoint directory (no "
                            "config.json)")
    cfg = load_json(cfg_path)
    if args.spec is not None:
        sections = _spec_sections(args.spec)
    else:
        # the config through `dsvc import-hf`'s reader (one reader of HF configs), whether
        # transformers or `dsvc export-hf` wrote it
        from dsvc.compiler.import_hf import import_config
        from dsvc.runtime.inputs import JSON_BYTES, read_text

        text, _ = import_config(read_text(cfg_path, JSON_BYTES), cfg_path)
        model = _sections_of_spec_text(text, cfg_path)["model"]
        dtype = cfg.get("torch_dtype", cfg.get("dtype")) if isinstance(cfg, dict) else None
        sections = {"model": model,
                    "precision": _precision_preset("fp32" if dtype == "float32" else "bf16")}
    if os.path.exists(os.path.join(root, "tokenizer.json")):
        from dsvc.compiler.tokenizer import HFTokenizer

        try:
            tokenizer = HFTokenizer(root)
        except TokenizerError:
            tokenizer = None
    return sections, {"kind": "hf", "path": os.path.abspath(root)}, tokenizer


def _prompts(args, tokenizer, vocab: int, context: int) -> list[list[int]]:
    from dsvc.compiler.cli import UsageError

    prompts = []
    for kind, text in args.rows:
        if kind == "ids":
            try:
                ids = [int(t) for t in text.replace(",", " ").split()]
            except ValueError:
                raise UsageError(f"--ids {text!r}: token ids are integers, e.g. '1,2,3'") from None
            if not ids:
                raise UsageError("--ids: an empty prompt")
            prompts.append(ids)
            continue
        if tokenizer is None:
            raise GenerateError("a text prompt needs a tokenizer and this model has none "
                                "recorded: pass --tokenizer bytes|DIR, or give token ids "
                                "with --ids")
        ids = tokenizer.encode(text)
        if not ids:
            raise GenerateError(f"--prompt {text!r} tokenises to nothing")
        prompts.append(ids)
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise GenerateError(f"prompt {i + 1}: token id {bad[0]} is outside the model's "
                                f"vocabulary of {vocab}")
        if len(p) >= context:
            raise GenerateError(f"prompt {i + 1} has {len(p)} tokens, as long as or longer than "
                                f"the model's context of {context} positions")
        if len(p) + args.max_new_tokens > context:
            raise GenerateError(f"prompt {i + 1} has {len(p)} tokens: with --max-new-tokens "
                                f"{args.max_new_tokens} it would exceed the model's context of "
                                f"{context} positions (at most {context - len(p)} new tokens)")
    return prompts


def run(args) -> int:
    _check_usage(args)
    try:
        return _run(args)
    except GenerateError as err:
        print(f"dsvc generate: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - user-input errors of the runtime, re-raised otherwise
        line = _user_error_line(err)
        if line is None:
            raise
        print(f"dsvc generate: error: {line}", file=sys.stderr)
        return 1


def _user_error_line(err: Exception) -> str | None:
    """One line for the runtime's user-input errors (None: a bug, left to the CLI's handler)."""
    from dsvc.compiler.tokenizer import TokenizerError
    from dsvc.runtime.checkpoint import CheckpointError
    from dsvc.runtime.hf import HFCheckpointError, HFFormatError
    from dsvc.runtime.inputs import InputError
    from dsvc.runtime.plan import PlanError

    if isinstance(err, HFCheckpointError):
        what = str(err).split(":\n", 1)[0]
        more = f" (and {len(err.problems) - 1} more)" if len(err.problems) > 1 else ""
        return f"{what}: {err.problems[0]}{more}" if err.problems else what
    if isinstance(err, (CheckpointError, HFFormatError, InputError, PlanError, TokenizerError)):
        return " ".join(str(err).split())
    return None


def _run(args) -> int:
    import json

    from dsvc.compiler.tokenizer import load_tokenizer

    sections, weights, tokenizer = _resolve(args)
    if args.precision is not None:
        sections["precision"] = _precision_preset(args.precision)
    if args.tokenizer is not None:
        tokenizer = load_tokenizer(args.tokenizer)
    import torch

    from dsvc.runtime.loop import linear_format

    cuda = torch.cuda.is_available()
    if linear_format(sections).startswith("fp8"):
        # FP8 GEMMs: the Triton kernels where they run fast, the torch emulation elsewhere
        sections["precision"] = dict(sections["precision"],
                                     fp8_backend="triton" if cuda else "torch")
    model = sections["model"]
    depth = int(model.get("mtp", {}).get("depth", 0))
    draft = depth if args.mtp == -1 else args.mtp
    if draft > depth:
        raise GenerateError(f"--mtp {draft}: the model has {depth} MTP module(s)")
    for name, ffn in model.get("ffn", {}).items():
        if ffn.get("kind") == "moe" and int(ffn["routed"]) % args.ep:
            raise GenerateError(f"--ep {args.ep}: the {ffn['routed']} routed experts of ffn "
                                f"{name!r} do not divide over {args.ep} processes")
    prompts = _prompts(args, tokenizer, int(model["vocab"]), int(model["max_seq_len"]))
    stop = list(args.stop)
    if tokenizer is not None and tokenizer.eos is not None and not args.ignore_eos:
        stop.append(tokenizer.eos)
    job = {**sections, "weights": weights, "prompts": prompts, "ep": args.ep,
           "overlap": not args.no_overlap, "absorb": not args.no_absorb,
           "generation": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                          "top_p": args.top_p, "seed": args.seed, "stop": sorted(set(stop)),
                          "draft_depth": draft}}  # fmt: skip
    result = _launch(job, args.ep, cuda)
    if result is None:
        return 1
    _print(result, prompts, tokenizer, args)
    if args.jsonl is not None:
        lines = [json.dumps({"row": i, "prompt_ids": p, "ids": r["tokens"], "finish": r["finish"],
                             **({"text": tokenizer.decode(r["tokens"])} if tokenizer else {})})
                 for i, (p, r) in enumerate(zip(prompts, result["rows"]))]
        lines.append(json.dumps({"summary": result["stats"]}))
        text = "\n".join(lines) + "\n"
        if args.jsonl == "-":
            sys.stdout.write(text)
        else:
            from dsvc.dsl.files import write_atomic

            write_atomic(args.jsonl, text)
    return 0


def _launch(job: dict, ep: int, cuda: bool) -> dict | None:
    """Run the job here (one process, on the GPU if there is one) or under torchrun (`ep`
    processes, one GPU each); its result."""
    if ep == 1:
        import torch

        from dsvc.runtime.serve import run_job

        return run_job(job, device=torch.device("cuda") if cuda else None)
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dsvc-generate-") as tmp:
        job = dict(job, output=os.path.join(tmp, "result.json"))
        path = os.path.join(tmp, "job.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(job, f)
        cmd = [sys.executable, "-m", "dsvc.compiler.cli.train", "--standalone",
               f"--nproc-per-node={ep}", "-m", "dsvc.runtime.serve", path]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # the processes share the cores
        proc = subprocess.run(cmd, check=False, env=env)
        if proc.returncode != 0 or not os.path.exists(job["output"]):
            print(f"dsvc generate: decoding failed (exit code {proc.returncode})", file=sys.stderr)
            return None
        with open(job["output"], encoding="utf-8") as f:
            return json.load(f)


def _print(result: dict, prompts, tokenizer, args) -> None:
    if args.jsonl != "-":
        for r in result["rows"]:
            texts = tokenizer is not None and any(kind == "prompt" for kind, _ in args.rows)
            out = tokenizer.decode(r["tokens"]) if texts else (
                " ".join(map(str, r["tokens"])))
            print(out)
    s = result["stats"]
    line = (f"dsvc generate: {len(prompts)} row(s), {s['prompt_tokens']} prompt and "
            f"{s['new_tokens']} new tokens; prefill {s['prefill_s']:.3f} s, decode "
            f"{s['decode_s']:.3f} s; {s['tokens_per_s']:.1f} tokens/s "
            f"({s['decode_tokens_per_s']:.1f} after the first token)")
    if job_depth := len(s["drafted"]):
        acc = ", ".join("-" if a is None else f"{a:.0%}" for a in s["acceptance"])
        line += (f"; MTP depth {job_depth}: acceptance {acc}, "
                 f"{s['tokens_per_forward']:.2f} tokens per verification forward")
    line += f"; KV cache {s['kv_cache_bytes_per_token']} B/token"
    if s.get("kv_cache_bytes_per_token_mtp"):
        line += f" (+{s['kv_cache_bytes_per_token_mtp']} B MTP)"
    if "a2a_bytes_per_token_layer" in s:
        line += (f"; all-to-all {s['a2a_bytes_per_token_layer']:.0f} B per token per MoE layer "
                 f"over {s['processes']} processes")
    print(line, file=sys.stderr)
