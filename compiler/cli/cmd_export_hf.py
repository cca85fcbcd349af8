"""`dsvc export-hf RUN_OR_CHECKPOINT -o DIR [--dtype bf16|fp32|fp8] [--force]`: a training
checkpoint as a Hugging Face DeepSeek-V3 checkpoint.

RUN_OR_CHECKPOINT is a run directory (its latest complete checkpoint is taken)
or one checkpoint directory (`step_XXXXXXXX/`). The checkpoint carries the plan
it was trained under, so no spec or build directory is needed; the export runs
in this process, one tensor at a time (runtime/hf.export_hf_from_checkpoint), and
writes safetensors shards, their index and a config.json that transformers loads
as DeepseekV3ForCausalLM. Bad input (no checkpoint there, a corrupt one, one
written by a dsvc that did not record its plan, a model the DeepSeek-V3 format
cannot express, an existing DIR without --force) is one line, exit 1 (2 for a
bad command line), and nothing is written. docs/hf.md describes the format.
"""

from __future__ import annotations

import os


def add_arguments(p) -> None:
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run directory (its latest checkpoint) or one checkpoint directory")
    p.add_argument("-o", "--output", metavar="DIR", required=True,
                   help="the Hugging Face checkpoint directory to write")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp8"), default="bf16",
                   help="bf16 (router bias fp32), fp32, or fp8: DeepSeek-V3's release format "
                   "(e4m3 + 128x128 weight_scale_inv)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")


def _checkpoint_of(source: str) -> str:
    """The checkpoint directory `source` names, or ValueError saying why there is none."""
    from dsvc.runtime import checkpoint as ckpt

    if not os.path.isdir(source):
        raise ValueError(f"{source}: no such directory")
    if os.path.isfile(os.path.join(source, ckpt.META)):
        return source
    root = os.path.join(source, "checkpoints")
    latest = ckpt.latest(root) if os.path.isdir(root) else None
    if latest is None:
        where = root if os.path.isdir(root) else source
        raise ValueError(f"{where}: no complete checkpoint (a run directory holds "
                         "checkpoints/step_XXXXXXXX/ with a dsvc.json)")
    return latest


def run(args) -> int:
    import sys

    from dsvc.compiler.cli import UsageError

    out = os.path.abspath(args.output)
    if os.path.exists(out) and not args.force:
        raise UsageError(f"-o {args.output}: exists; pass --force to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"-o {args.output}: exists and is not a directory")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"-o {args.output}: directory '{os.path.dirname(out)}' does not exist")
    from dsvc.runtime import checkpoint as ckpt
    from dsvc.runtime import train_state
    from dsvc.runtime.hf import HFCheckpointError, HFFormatError, export_hf_from_checkpoint
    from dsvc.runtime.plan import PlanError, parse_plan

    def fail(message: str) -> int:
        print(f"dsvc export-hf: error: {' '.join(message.split())}", file=sys.stderr)
        return 1

    try:
        path = _checkpoint_of(args.source)
        meta = ckpt.read_meta(path)
    except (ValueError, ckpt.CheckpointError) as err:
        return fail(str(err))
    raw = meta.get("plan")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        return fail(f"{path}: its {ckpt.META} records no plan (written by an older dsvc); "
                    "resume the run for one step with this dsvc to write a checkpoint that does")
    if meta.get("model_hash") != train_state.model_hash(raw):
        return fail(f"{path}: the plan in {ckpt.META} is not the one the checkpoint's model hash "
                    "names (the record was edited or mixed up); refusing to export")
    try:
        plan = parse_plan(raw, os.path.join(path, ckpt.META))
        export_hf_from_checkpoint(path, plan, out, dtype=args.dtype, overwrite=args.force)
    except (PlanError, ckpt.CheckpointError) as err:
        return fail(str(err))
    except (HFCheckpointError, HFFormatError) as err:
        head, *rest = str(err).split("\n")
        return fail(head + " " + "; ".join(line.strip() for line in rest))
    print(f"dsvc export-hf: {out}: step {meta.get('step')} of {path} as a DeepSeek-V3 "
          f"checkpoint ({args.dtype})", file=sys.stderr)
    return 0
