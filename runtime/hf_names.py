"""Runtime parameter names <-> DeepSeek-V3 checkpoint tensor names, and FP8 block scales.

The runtime already uses Hugging Face's names inside a block, so the mapping is
short:

    embed_tokens.weight                     model.embed_tokens.weight
    layers.{i}.<rest>                       model.layers.{i}.<rest>
    layers.{i}.mlp.experts.gate_proj [j]    model.layers.{i}.mlp.experts.{e_j}.gate_proj.weight
    norm.weight                             model.norm.weight
    lm_head.weight                          lm_head.weight
    mtp.{k}.block.<rest>                    model.layers.{L+k}.<rest>
    mtp.{k}.{enorm,hnorm,eh_proj}.weight    model.layers.{L+k}.{enorm,hnorm,eh_proj}.weight
    mtp.{k}.shared_head.norm.weight         model.layers.{L+k}.shared_head.norm.weight

(L = number of main layers; routed experts are stacked per layer in the runtime,
slice j holding global expert e_j.) DeepSeek's checkpoints also store, per MTP
layer, copies of the embedding and the head (`model.layers.{L+k}.embed_tokens`,
`.shared_head.head`); the runtime shares the main ones, so those copies are
written on export and accepted but not read on load.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from .moe import RoutedExperts

# weights DeepSeek-V3's release stores as e4m3 with 128x128 `weight_scale_inv` block scales:
# every linear of a decoder block (attention, dense FFN, shared and routed experts)
FP8_WEIGHT = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|k_proj|v_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj))\.weight$"
)
SCALE_SUFFIX = "_scale_inv"  # `<name>.weight_scale_inv` beside `<name>.weight`
_FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}


def hf_name(name: str, num_layers: int) -> str:
    """Checkpoint name of a runtime state-dict name (routed experts: see `named_tensors`)."""
    if name.startswith("layers."):
        return "model." + name
    if name.startswith("mtp."):
        _, k, rest = name.split(".", 2)
        rest = rest.removeprefix("block.")
        return f"model.layers.{num_layers + int(k)}.{rest}"
    if name.startswith("lm_head."):
        return name
    return "model." + name


def named_tensors(module: torch.nn.Module, num_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every persistent tensor of a stage module; a routed
    expert's weight is a view of one slice of its layer's stacked parameter."""
    experts = {name: mod for name, mod in module.named_modules() if isinstance(mod, RoutedExperts)}
    for name, tensor in module.state_dict(keep_vars=True).items():
        prefix, _, pname = name.rpartition(".")
        if prefix in experts:
            base = hf_name(prefix, num_layers)
            for j, e in enumerate(experts[prefix].expert_ids):
                yield f"{base}.{e}.{pname}.weight", tensor[j]
        else:
            yield hf_name(name, num_layers), tensor


def mtp_copy_names(num_layers: int, depth: int) -> list[tuple[str, str]]:
    """(copy name, the main tensor it copies) for DeepSeek's per-MTP-layer embedding and head."""
    out = []
    for k in range(depth):
        out.append(
            (f"model.layers.{num_layers + k}.embed_tokens.weight", "model.embed_tokens.weight")
        )
        out.append((f"model.layers.{num_layers + k}.shared_head.head.weight", "lm_head.weight"))
    return out


def schema(plan) -> dict[str, tuple[int, ...]]:
    """Every tensor the whole planned model loads, by checkpoint name, with its shape.

    Built from the runtime's own modules on the meta device (no memory), so it always
    agrees with what `StageModule` holds."""
    from .model import build_full_model

    with torch.device("meta"):
        full = build_full_model(plan)
    return {name: tuple(t.shape) for name, t in named_tensors(full, len(plan.model.layers))}


def is_fp8_dtype(safetensors_dtype: str) -> bool:
    return safetensors_dtype in _FP8_DTYPES


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    n, k = shape
    return (-(-n // block[0]), -(-k // block[1]))


def dequantize_blocks(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """w = q * scale_inv per (block[0] x block[1]) block -> fp32 (DeepSeek's `weight_dequant`)."""
    n, k = q.shape
    s = scale_inv.to(torch.float32).repeat_interleave(block[0], dim=0)[:n]
    s = s.repeat_interleave(block[1], dim=1)[:, :k]
    return q.to(torch.float32) * s
