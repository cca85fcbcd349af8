"""Hugging Face DeepSeek-V3 checkpoints in and out of the runtime's stage modules.

    load_hf_checkpoint(path, modules, plan)      weights -> this rank's stage modules
    check_hf_checkpoint(path, plan)              the same checks, nothing copied
    export_hf_checkpoint(modules, plan, out_dir) stage modules -> safetensors + index + config.json
    export_hf_from_checkpoint(ckpt, plan, out)   a dsvc training checkpoint -> the same, offline
    hf_config_from_plan(plan), check_hf_config(plan, cfg)
    model_logits(module, tokens)                 logits of a whole-model stage (tests, evals)

A checkpoint is a directory with `model.safetensors` or shards listed by
`model.safetensors.index.json` (or one `.safetensors` file), named as DeepSeek
and transformers name them (see `hf_names.py`). Loading validates first and
copies after: missing, unexpected and wrong-shape tensors and a config that
disagrees with the plan are all listed in one `HFCheckpointError` (each with
its file) and no parameter changes. A rank reads only the tensors of its own
stages and, of the routed experts, only those its EP rank holds
(`safetensors.safe_open` reads one tensor at a time). FP8 weights (e4m3 with a
`weight_scale_inv` of 128x128 block scales, DeepSeek-V3's release format) are
dequantised to the parameters' dtype on load; export can write that format too.

A load may come before or after the optimizer is built: it copies into the parameters
in place, and `ZeroAdamW`'s master shards are those parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import warnings

import torch
import torch.distributed as dist

from .hf_export import HFFormatError, check_hf_config, hf_config_from_plan
from .hf_names import (
    FP8_WEIGHT,
    SCALE_SUFFIX,
    dequantize_blocks,
    is_fp8_dtype,
    mtp_copy_names,
    named_tensors,
)
from .hf_read import INDEX, SINGLE, Checkpoint, HFCheckpointError, validate
from .plan import Plan

__all__ = [
    "HFCheckpointError", "HFFormatError", "LoadReport", "check_hf_checkpoint", "check_hf_config",
    "export_hf_checkpoint", "export_hf_from_checkpoint", "hf_config_from_plan",
    "load_hf_checkpoint", "model_logits",
]  # fmt: skip


@dataclasses.dataclass
class LoadReport:
    """What a load read: checkpoint names copied into this rank's modules, files opened."""

    loaded: list[str]
    dequantized: list[str]
    files: list[str]
    bytes_read: int
    warnings: list[str]


def _as_list(modules) -> list[torch.nn.Module]:
    return list(modules) if isinstance(modules, (list, tuple)) else [modules]


@torch.no_grad()
def load_hf_checkpoint(
    path: str | os.PathLike, modules, plan: Plan, *, strict: bool = True, check_config: bool = True
) -> LoadReport:
    """Load a DeepSeek-V3-format checkpoint into this rank's stage module(s).

    `modules`: a StageModule or a list of them (what `Trainer` builds for this rank, or
    `build_full_model(plan)`). Every problem is raised together as `HFCheckpointError`
    before anything is copied. With `strict=False`, unexpected tensors and config
    mismatches are warnings instead of errors (missing and wrong-shape tensors never are)."""
    ck, soft = _checked(path, plan, strict, check_config)
    m = plan.model
    for msg in soft:
        warnings.warn(msg, stacklevel=3)  # past torch.no_grad's wrapper: the caller's line
    targets: dict[tuple[str, int, tuple], tuple[str, torch.Tensor]] = {}
    for mod in _as_list(modules):
        for name, t in named_tensors(mod, len(m.layers)):
            targets.setdefault((name, t.data_ptr(), tuple(t.shape)), (name, t))
    by_file: dict[pathlib.Path, list[tuple[str, torch.Tensor]]] = {}
    for name, t in targets.values():
        by_file.setdefault(ck.tensors[name].file, []).append((name, t))
    from safetensors import safe_open

    loaded, dequantized, nbytes = [], [], 0
    for f in sorted(by_file):
        with safe_open(str(f), framework="pt") as h:
            for name, dest in by_file[f]:
                src = h.get_tensor(name)
                nbytes += src.numel() * src.element_size()
                if is_fp8_dtype(ck.tensors[name].dtype):
                    s_entry = ck.tensors[name + SCALE_SUFFIX]
                    if s_entry.file == f:
                        scale = h.get_tensor(name + SCALE_SUFFIX)
                    else:
                        with safe_open(str(s_entry.file), framework="pt") as hs:
                            scale = hs.get_tensor(name + SCALE_SUFFIX)
                    nbytes += scale.numel() * scale.element_size()
                    src = dequantize_blocks(src, scale, ck.block)
                    dequantized.append(name)
                dest.copy_(src.to(dest.dtype))
                loaded.append(name)
    return LoadReport(
        sorted(loaded), sorted(dequantized), [p.name for p in sorted(by_file)], nbytes, soft
    )


def check_hf_checkpoint(path: str | os.PathLike, plan: Plan, *, strict: bool = True) -> list[str]:
    """What `load_hf_checkpoint` checks before it copies anything, without copying: raises
    `HFCheckpointError` with every problem, or returns the warnings of a non-strict load.
    Reads tensor headers only, so a launcher can refuse a checkpoint before any process
    group exists."""
    return _checked(path, plan, strict, True)[1]


def _checked(path, plan: Plan, strict: bool, check_config: bool) -> tuple[Checkpoint, list[str]]:
    ck = Checkpoint(path)
    problems = validate(ck, plan)
    soft: list[str] = []
    if ck.config is not None and check_config:
        soft += check_hf_config(plan, ck.config, source=str(ck.root / "config.json"))
    if not strict:
        soft += [p for p in problems if p.startswith("unexpected")]
        problems = [p for p in problems if not p.startswith("unexpected")]
    elif soft:
        problems, soft = soft + problems, []
    if problems:
        raise HFCheckpointError(f"cannot load {path} into the planned model", problems)
    return ck, soft


# -- writing a checkpoint -----------------------------------------------------------------


def _owned(modules, plan: Plan, mesh) -> dict[str, torch.Tensor]:
    """The tensors this rank writes: each checkpoint tensor is written by exactly one rank
    (dense ones by data-parallel rank 0, routed experts by expert-data-parallel rank 0,
    the shared embedding by the embedding stage, DualPipe's copy B never)."""
    dp_rank = getattr(mesh, "dp_rank", 0)
    edp_rank = getattr(mesh, "edp_rank", 0)
    m = plan.model
    out: dict[str, torch.Tensor] = {}
    for mod in _as_list(modules):
        stage = mod.stage
        if stage.copy != "A":
            continue
        for name, t in named_tensors(mod, len(m.layers)):
            expert = ".mlp.experts." in name
            if (expert and edp_rank != 0) or (not expert and dp_rank != 0):
                continue
            if name == "model.embed_tokens.weight" and not stage.embedding:
                continue
            out.setdefault(name, t)
        if stage.mtp and m.mtp.depth and dp_rank == 0:
            head = mod.embed_tokens.weight if m.tie_embeddings else mod.lm_head.weight
            sources = {"model.embed_tokens.weight": mod.embed_tokens.weight, "lm_head.weight": head}
            for copy, main in mtp_copy_names(len(m.layers), m.mtp.depth):
                out[copy] = sources[main]
    return out


def _encode(name: str, t: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """One tensor in the file format: fp32, bf16, or fp8 (e4m3 + weight_scale_inv)."""
    t = t.detach().to("cpu")
    if name.endswith("e_score_correction_bias") or dtype == "fp32":
        return {name: t.to(torch.float32).clone()}
    if dtype == "fp8" and FP8_WEIGHT.search(name):
        from .fp8 import quantize_weight

        q, s = quantize_weight(t.to(torch.float32), 128)
        return {name: q.contiguous(), name + SCALE_SUFFIX: s.to(torch.float32).contiguous()}
    return {name: t.to(torch.bfloat16).clone()}


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _export_target(plan: Plan, out_dir, dtype: str, overwrite: bool) -> tuple[dict, pathlib.Path]:
    """The config.json an export writes for `dtype`, and its directory, refused if it exists."""
    if dtype not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"dtype must be fp32, bf16 or fp8, not {dtype!r}")
    config = hf_config_from_plan(plan, "float32" if dtype == "fp32" else "bfloat16")
    if dtype == "fp8":
        config["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        }  # fmt: skip
    out = pathlib.Path(out_dir)
    if out.exists() and not overwrite:
        raise HFCheckpointError(
            f"cannot export to {out}", ["it exists; pass overwrite=True to replace it"]
        )
    return config, out


def export_hf_checkpoint(
    modules, plan: Plan, out_dir: str | os.PathLike, *, mesh=None, dtype: str = "bf16",
    overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
) -> pathlib.Path:  # fmt: skip
    """Write the model as a DeepSeek-V3 checkpoint: safetensors shards, their index and a
    `config.json` that transformers loads as DeepseekV3ForCausalLM.

    Collective when torch.distributed is initialised (every rank calls it with its stage
    modules and `mesh`, a `ProcessMesh`); each tensor is written once. `dtype`: "fp32",
    "bf16" (router bias kept fp32) or "fp8" (block linears as e4m3 + 128x128
    weight_scale_inv, the rest bf16: DeepSeek-V3's release format). Atomic: written into
    `<out_dir>.partial` and renamed when complete. An existing `out_dir` is refused unless
    `overwrite`."""
    config, out = _export_target(plan, out_dir, dtype, overwrite)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    partial = out.with_name(out.name + ".partial")
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)  # left by an interrupted export
        partial.mkdir(parents=True)
    _barrier()
    _write_parts(sorted(_owned(modules, plan, mesh).items()), partial, rank, dtype,
                 max_shard_bytes)
    _barrier()
    if rank == 0:
        _assemble(partial, config)
        if out.exists():
            old = out.with_name(out.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old)
        else:
            partial.rename(out)
    _barrier()
    return out


def export_hf_from_checkpoint(
    path: str | os.PathLike, plan: Plan, out_dir: str | os.PathLike, *, dtype: str = "bf16",
    overwrite: bool = False, max_shard_bytes: int = 5 * 2**30,
) -> pathlib.Path:  # fmt: skip
    """A dsvc training checkpoint (`path`, written under `plan`) as a DeepSeek-V3 checkpoint in
    `out_dir`, in this process alone and one tensor at a time: no process group, no model
    built, memory of one routed-expert stack. Same format as `export_hf_checkpoint` (routed
    experts unstacked by the plan's placement, DeepSeek's per-MTP-layer embedding and head
    copies); a checkpoint lacking a tensor the plan needs, or holding one of another shape,
    raises `HFCheckpointError` and leaves nothing behind."""
    from . import train_state
    from .hf_names import hf_name, schema

    config, out = _export_target(plan, out_dir, dtype, overwrite)
    m, want = plan.model, schema(plan)
    num_layers, copies = len(m.layers), {}
    for copy, main in mtp_copy_names(num_layers, m.mtp.depth) if m.mtp.depth else []:
        copies.setdefault("lm_head.weight" if main == "lm_head.weight" and not m.tie_embeddings
                          else "model.embed_tokens.weight", []).append(copy)
    written: set[str] = set()
    bad: list[str] = []

    def tensors():
        for name, ep_rank, t in train_state.model_entries(str(path)):
            if ep_rank is None:
                pieces = [(hf_name(name, num_layers), t)]
            else:  # one EP rank's stack: slice j is expert per_rank[ep_rank][j] of the layer's ffn
                prefix, _, pname = name.rpartition(".")
                parts = name.split(".")
                ffn = m.layers[int(parts[1])].ffn if parts[0] == "layers" else m.mtp_block().ffn
                ids = plan.experts[ffn].per_rank[ep_rank]
                base = hf_name(prefix, num_layers)
                pieces = [(f"{base}.{e}.{pname}.weight", t[j]) for j, e in enumerate(ids)]
            for hf, tensor in pieces:
                if hf not in want or tuple(tensor.shape) != want[hf]:
                    bad.append(f"{hf}: {list(tensor.shape)}, the plan's model has "
                               f"{list(want[hf]) if hf in want else 'no such tensor'}")
                    continue
                written.add(hf)
                yield hf, tensor
                for copy in copies.get(hf, []):
                    yield copy, tensor

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted export
    partial.mkdir(parents=True)
    try:
        _write_parts(tensors(), partial, 0, dtype, max_shard_bytes)
        missing = sorted(set(want) - written)
        if bad or missing:
            raise HFCheckpointError(f"cannot export {path}: it does not hold the plan's model",
                                    bad[:20] + [f"missing: {n}" for n in missing[:20]])
        _assemble(partial, config)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def _write_parts(tensors, partial: pathlib.Path, rank: int, dtype: str, limit: int):
    """This rank's (name, tensor) pairs, in the order given, into `part-RRRRR-JJJ.safetensors`
    files of at most ~limit bytes, and a manifest of which names went where (rank 0
    assembles the index from them)."""
    from safetensors.torch import save_file

    manifest, shard, size, j = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, j
        if shard:
            fname = f"part-{rank:05d}-{j:03d}.safetensors"
            save_file(shard, str(partial / fname), metadata={"format": "pt"})
            manifest[fname] = {k: v.numel() * v.element_size() for k, v in shard.items()}
            shard, size, j = {}, 0, j + 1

    for name, tensor in tensors:
        enc = _encode(name, tensor, dtype)
        nbytes = sum(v.numel() * v.element_size() for v in enc.values())
        if shard and size + nbytes > limit:
            flush()
        shard.update(enc)
        size += nbytes
    flush()
    (partial / f"part-{rank:05d}.json").write_text(json.dumps(manifest), encoding="utf-8")


def _assemble(partial: pathlib.Path, config: dict) -> None:
    """Name the parts model-XXXXX-of-NNNNN.safetensors, write the index and config.json."""
    parts: dict[str, dict[str, int]] = {}
    for mf in sorted(partial.glob("part-*.json")):
        parts.update(json.loads(mf.read_text(encoding="utf-8")))
        mf.unlink()
    names = sorted(parts)
    weight_map, total = {}, 0
    for i, fname in enumerate(names):
        final = SINGLE if len(names) == 1 else f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        (partial / fname).rename(partial / final)
        for tensor, nbytes in parts[fname].items():
            weight_map[tensor] = final
            total += nbytes
    if len(names) != 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (partial / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (partial / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


# -- logits -------------------------------------------------------------------------------


@torch.no_grad()
def model_logits(module, tokens_BS: torch.Tensor, mtp: bool = False):
    """Logits (B, S, V) fp32 of a stage module that holds the whole model (`build_full_model`).

    With `mtp=True` returns (main logits, [MTP depth-k logits (B, S, V) for k = 1..depth]),
    from the module's own MTP chain (`StageModule.mtp_states`, the one its loss runs), so
    they follow its MTP semantics exactly; depth k's logits at position i predict token
    i+k+1 (valid for i < S-k). Expert-load counters are left as they were."""
    st = module.stage
    if not (st.embedding and st.head):
        raise ValueError(
            "model_logits needs a module holding the embedding and the head (build_full_model)"
        )
    moes = module.moe_layers()
    saved = {name: moe.load_E.clone() for name, moe in moes.items()}
    try:
        h = module.embed(tokens_BS)
        for layer in module.layers.values():
            h = layer(h)
        hn = module.norm(h)
        if not mtp:
            return module.logits(hn)
        chain = module.mtp_states(hn, torch.roll(tokens_BS, -1, dims=1))
        return module.logits(hn), [module.logits(prev) for _, prev, _ in chain]
    finally:
        for name, moe in moes.items():
            moe.load_E.copy_(saved[name])
