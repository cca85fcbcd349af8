"""A small plan built in Python, so tests and benches need no compiler.

`tiny_plan()` returns the dict form of plan.json for a tiny DeepSeek-V3-like
model (MLA + 1 dense and 3 MoE layers + MTP depth 1, hidden 64, 8 routed
experts in 4 groups, vocab 256, sequence 32) on any PP x DP x EP mesh, under
1F1B or DualPipeV, in fp32, bf16 or FP8-emulation precision. It stands in for
what `dsvc compile` emits; the 1F1B action lists it can add are the textbook
order (warm-up forwards, one-forward-one-backward, cool-down backwards).
"""

from __future__ import annotations

import copy

from .plan import split_layers

PRECISIONS = ("fp32", "bf16", "fp8")


def tiny_model(num_layers: int = 4, mtp_depth: int = 1, score: str = "sigmoid") -> dict:
    """The `model` section: layer 0 dense, the rest MoE."""
    return {
        "vocab": 256,
        "hidden": 64,
        "norm_eps": 1e-6,
        "max_seq_len": 64,
        "init_std": 0.02,
        "rope": {
            "kind": "yarn", "theta": 10000.0, "factor": 40.0, "original_max_seq": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
        },
        "attention": {
            "mla": {
                "kind": "mla", "heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32,
                "qk_nope_dim": 16, "qk_rope_dim": 8, "v_dim": 16,
            }
        },
        "ffn": {
            "dense": {"kind": "dense", "intermediate": 128},
            "moe": {
                "kind": "moe", "routed": 8, "shared": 1, "top_k": 2, "intermediate": 32,
                "shared_intermediate": 32, "score": score, "groups": 4, "top_groups": 2,
                "route_scale": 2.5, "bias_update_rate": 0.001, "seq_aux_loss": 0.0001,
            },
        },
        "layers": [{"attention": "mla", "ffn": "dense" if i == 0 else "moe"} for i in range(num_layers)],
        "mtp": {"depth": mtp_depth, "loss_weight": 0.3},
        "tie_embeddings": False,
    }  # fmt: skip


def tiny_precision(mode: str = "fp32") -> dict:
    """`fp32`: everything fp32 (equivalence tests); `bf16`; `fp8`: DeepSeek-V3 recipe, emulated."""
    if mode not in PRECISIONS:
        raise ValueError(f"precision mode must be one of {PRECISIONS}, got {mode!r}")
    if mode == "fp32":
        return {"default": "fp32", "linear": "fp32", "master_weights": "fp32", "grads": "fp32",
                "optimizer_states": "fp32", "dispatch": "fp32", "combine": "fp32"}  # fmt: skip
    kept = {
        "embedding": "bf16",
        "head": "bf16",
        "router": "fp32",
        "attention_core": "bf16",
        "norm": "fp32",
    }
    linear = (
        {"format": "fp8_e4m3", "act_tile": 128, "weight_block": [128, 128], "ue8m0": False}
        if mode == "fp8"
        else "bf16"
    )
    return {
        "default": "bf16", "linear": linear, "kept": kept, "master_weights": "fp32",
        "grads": "fp32", "optimizer_states": "bf16",
        "dispatch": "fp8_e4m3" if mode == "fp8" else "bf16", "combine": "bf16",
        "fp8_backend": "torch",
    }  # fmt: skip


def one_f_one_b_actions(pp: int, num_microbatches: int) -> list[list[str]]:
    """Per-rank 1F1B compute actions in torch's `_Action` string form."""
    actions = []
    for rank in range(pp):
        warmup = min(pp - 1 - rank, num_microbatches)
        order = [f"{rank}F{m}" for m in range(warmup)]
        f = warmup
        for b in range(num_microbatches):
            if f < num_microbatches:
                order.append(f"{rank}F{f}")
                f += 1
            order.append(f"{rank}B{b}")
        actions.append(order)
    return actions


def tiny_plan(
    pp: int = 2,
    dp: int = 2,
    ep: int = 2,
    schedule: str = "1f1b",
    num_microbatches: int = 4,
    micro_batch: int = 1,
    seq_len: int = 32,
    precision: str = "fp32",
    with_actions: bool = True,
    num_layers: int = 4,
    mtp_depth: int = 1,
    seed: int = 0,
    two_hop: bool = False,
    gpus_per_node: int = 0,
    lr: float = 1e-3,
    actions: list[list[str]] | None = None,
) -> dict:
    """The dict form of plan.json for the tiny model (see the module docstring).

    `actions` replaces the schedule's action lists (one list per pipeline rank, e.g. from dsvc.compiler.schedules)."""
    model = tiny_model(num_layers, mtp_depth)
    if schedule == "dualpipev":
        chunks = [list(c) for c in split_layers(num_layers, 2 * pp)]
        ranks = [min(i, 2 * pp - 1 - i) for i in range(2 * pp)]
    elif schedule in ("1f1b", "zb1p"):
        chunks = [list(c) for c in split_layers(num_layers, pp)]
        ranks = list(range(pp))
    else:
        raise ValueError(f"tiny_plan builds 1f1b, zb1p or dualpipev stages, not {schedule!r}")
    last = len(chunks) - 1
    stages = [
        {"index": i, "rank": ranks[i], "copy": "A", "layers": layers, "embedding": i == 0,
         "head": i == last, "mtp": i == last and mtp_depth > 0}
        for i, layers in enumerate(chunks)
    ]  # fmt: skip
    routed = model["ffn"]["moe"]["routed"]
    per = routed // ep
    experts = {
        "moe": {
            "per_rank": [list(range(r * per, (r + 1) * per)) for r in range(ep)],
            "group_of_expert": [
                e // (routed // model["ffn"]["moe"]["groups"]) for e in range(routed)
            ],
            "two_hop": two_hop,
        }
    }
    if actions is None:
        actions = (
            one_f_one_b_actions(pp, num_microbatches) if with_actions and schedule == "1f1b" else []
        )
    mesh = {"pipeline": pp, "data": dp, "expert": ep, "world_size": pp * dp}
    if gpus_per_node:
        mesh.update(nodes=pp * dp // gpus_per_node, gpus_per_node=gpus_per_node)
    return copy.deepcopy({
        "version": 1,
        "model": model,
        "precision": tiny_precision(precision),
        "mesh": mesh,
        "stages": stages,
        "experts": experts,
        "schedule": {"kind": schedule, "num_microbatches": num_microbatches, "overlap": False,
                     "actions": actions},
        "train": {
            "seq_len": seq_len,
            "global_batch": dp * micro_batch * num_microbatches,
            "micro_batch": micro_batch,
            "optimizer": {"kind": "adamw", "lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                          "weight_decay": 0.1, "grad_clip": 1.0},
            "lr_schedule": {"kind": "warmup_cosine", "warmup_steps": 2, "final_lr": lr / 10,
                            "total_steps": 100},
            "data": {"kind": "synthetic"},
            "seed": seed,
        },
    })  # fmt: skip
