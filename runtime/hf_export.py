"""The Hugging Face `config.json` of a plan's model, and the check of a checkpoint's config.

`hf_config_from_plan` writes what `transformers.DeepseekV3ForCausalLM` (and
DeepSeek's own config readers: vLLM, SGLang) need to rebuild the model the
plan describes; `check_hf_config` compares a checkpoint's `config.json`
against a plan and lists every difference that would change the numbers.

RoPE is compared by what is *computed*, not by what is written: the runtime
applies YaRN only when `max_seq_len` exceeds `rope.original_max_seq` (as
DeepSeek-V3's reference does), while transformers applies a `yarn` entry at
any length. So a plan whose YaRN is inactive exports plain RoPE, and a
checkpoint config with YaRN does not match a plan that would not apply it.
Standard library only (a build directory reads configs without dsvc).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from .hf_config import read_hf_config, read_rope
from .plan import Plan

# keys compared one to one (absent from the checkpoint's config: its transformers default, as
# hf_config.read_hf_config fills it in)
_COMPARED = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
    "first_k_dense_replace", "norm_topk_prob", "scoring_func", "topk_method", "moe_layer_freq",
    "rms_norm_eps", "tie_word_embeddings", "num_nextn_predict_layers", "hidden_act",
    "attention_bias", "rope_interleave",
)  # fmt: skip

HF_NORM_EPS = 1e-6  # transformers' DeepseekV3 builds q_a_layernorm / kv_a_layernorm with this eps


class HFFormatError(ValueError):
    """A plan or a checkpoint config that the DeepSeek-V3 format cannot express or does not match;
    `problems` lists every reason, one a line."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(what + ":\n  " + "\n  ".join(self.problems))


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def effective_rope_of_plan(plan: Plan) -> dict:
    """The rotary embedding the runtime computes for this plan (runtime/layers.py): with YaRN,
    softmax scale x m(mscale_all_dim)^2 and cos/sin x m(mscale) / m(mscale_all_dim)."""
    m, r = plan.model, plan.model.rope
    if r.kind == "yarn" and m.max_seq_len > r.original_max_seq:
        m_all = _yarn_mscale(r.factor, r.effective_mscale_all_dim)
        return {
            "kind": "yarn", "theta": float(r.theta), "factor": float(r.factor),
            "original_max_seq": int(r.original_max_seq), "beta_fast": float(r.beta_fast),
            "beta_slow": float(r.beta_slow), "softmax_mscale": m_all,
            "cos_sin_scale": _yarn_mscale(r.factor, r.mscale) / m_all,
        }  # fmt: skip
    return {"kind": "plain", "theta": float(r.theta)}


def effective_rope_of_config(cfg: dict) -> dict:
    """The rotary embedding transformers computes for a DeepseekV3 config.json (new
    `rope_parameters` or legacy `rope_scaling` + `rope_theta`, as hf_config.read_rope reads
    them)."""
    params = read_rope(cfg)
    theta, kind = float(params["theta"]), params["type"]
    if kind == "default":
        return {"kind": "plain", "theta": theta}
    if kind != "yarn":
        return {"kind": str(kind), "theta": theta}
    max_pos = cfg.get("max_position_embeddings", 0)
    orig = params.get(
        "original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_pos)
    )
    factor = params.get("factor") or (max_pos / orig if orig else 1.0)
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:  # transformers' _compute_yarn_parameters
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attention_factor = _yarn_mscale(factor, 1.0)
    # transformers' yarn_apply_mscale: softmax scale x m(mscale_all_dim)^2 when it is nonzero
    softmax = _yarn_mscale(factor, mscale_all) if mscale_all else 1.0
    out = {
        "kind": "yarn", "theta": theta, "factor": float(factor), "original_max_seq": int(orig),
        "beta_fast": float(params.get("beta_fast") or 32), "beta_slow": float(params.get("beta_slow") or 1),
        "softmax_mscale": float(softmax), "cos_sin_scale": float(attention_factor),
    }  # fmt: skip
    if not params.get("truncate", True):
        out["truncate"] = (
            False  # the runtime (and DeepSeek's reference) always floor/ceil the range
        )
    return out


def _hf_rope(plan: Plan) -> tuple[dict, dict | None]:
    """(rope_parameters, legacy rope_scaling) that make transformers compute the plan's RoPE."""
    eff, r = effective_rope_of_plan(plan), plan.model.rope
    if eff["kind"] == "plain":
        return {"rope_type": "default", "rope_theta": eff["theta"]}, None
    mscale, mscale_all = float(r.mscale), float(r.effective_mscale_all_dim)
    scaling = {
        "type": "yarn", "factor": eff["factor"], "original_max_position_embeddings": eff["original_max_seq"],
        "beta_fast": eff["beta_fast"], "beta_slow": eff["beta_slow"],
        # both written: DeepSeek's readers (vLLM, SGLang) and transformers take the softmax
        # correction from mscale_all_dim and cos/sin x m(mscale) / m(mscale_all_dim)
        "mscale": mscale, "mscale_all_dim": mscale_all,
    }  # fmt: skip
    if not (mscale and mscale_all):
        # transformers infers cos/sin x m(mscale)/m(mscale_all_dim) only when both are nonzero
        # (else m(factor) with mscale 1): state the runtime's factor instead
        scaling["attention_factor"] = eff["cos_sin_scale"]
    params = {k: v for k, v in scaling.items() if k != "type"}
    params.update(rope_type="yarn", rope_theta=eff["theta"])
    return params, scaling


def _structure(plan: Plan, problems: list[str]):
    """(attention, dense ffn or None, moe ffn or None, number of leading dense layers)."""
    m = plan.model
    blocks = [(i, s) for i, s in enumerate(m.layers)]
    if m.mtp.depth:
        blocks.append(("mtp", m.mtp_block()))
    attns = {m.attention[s.attention] for _, s in blocks}
    attn = next(iter(attns))
    if len(attns) > 1:
        problems.append(
            "every layer must use the same attention (DeepseekV3 has one attention shape)"
        )
    if attn.kind != "mla":
        problems.append(
            f"attention is {attn.kind}, DeepseekV3 is multi-head latent attention (mla)"
        )
    kinds = [m.ffn[s.ffn].kind for s in m.layers]
    first_moe = kinds.index("moe") if "moe" in kinds else len(kinds)
    if "dense" in kinds[first_moe:]:
        problems.append("DeepseekV3 runs dense FFN layers first, then only MoE layers")
    dense = {m.ffn[s.ffn] for s in m.layers if m.ffn[s.ffn].kind == "dense"}
    moe = {m.ffn[s.ffn] for _, s in blocks if m.ffn[s.ffn].kind == "moe"}
    if len(dense) > 1 or len(moe) > 1:
        problems.append("all dense layers must share one FFN shape and all MoE layers another")
    if m.mtp.depth and m.ffn[m.mtp_block().ffn].kind != "moe" and first_moe < len(kinds):
        problems.append(
            "the MTP block must be a MoE block (DeepSeek's MTP layers follow the MoE layers)"
        )
    moe_ffn = next(iter(moe)) if moe else None
    if moe_ffn is not None:
        if moe_ffn.score != "sigmoid":
            problems.append(f"routing score {moe_ffn.score}: DeepseekV3 routes with sigmoid scores")
        if moe_ffn.shared and moe_ffn.shared_intermediate != moe_ffn.intermediate:
            problems.append(
                f"shared experts {moe_ffn.shared_intermediate} wide but routed {moe_ffn.intermediate}: "
                "DeepseekV3 sizes shared experts as n_shared_experts x moe_intermediate_size"
            )
    return attn, next(iter(dense)) if dense else None, moe_ffn, first_moe


def hf_config_from_plan(plan: Plan, torch_dtype: str = "bfloat16") -> dict:
    """`config.json` for the plan's model as a DeepSeek-V3 checkpoint (model_type deepseek_v3).

    Raises HFFormatError listing everything the format cannot express (GQA, softmax
    routing, interleaved dense/MoE layers, ...). The whole plan `model` section is also
    kept under `"dsvc"` so that nothing of it (bias update rate, MTP loss weight) is lost."""
    cfg, problems = _config_of_plan(plan, torch_dtype)
    if problems:
        raise HFFormatError(
            "the plan's model cannot be written as a DeepSeek-V3 checkpoint", problems
        )
    if plan.model.norm_eps != HF_NORM_EPS:
        warnings.warn(
            f"norm_eps {plan.model.norm_eps}: transformers' DeepseekV3 uses {HF_NORM_EPS} in q_a_layernorm and "
            "kv_a_layernorm whatever rms_norm_eps says, so its logits will differ slightly",
            stacklevel=2,
        )
    return cfg


def _config_of_plan(plan: Plan, torch_dtype: str = "bfloat16") -> tuple[dict, list[str]]:
    """(config.json of the plan's model, what the format cannot express): the config is
    written even then, so that a check can compare everything else too."""
    m = plan.model
    problems: list[str] = []
    attn, dense, moe, first_k = _structure(plan, problems)
    rope_parameters, rope_scaling = _hf_rope(plan)
    moe_inter = moe.intermediate if moe else (dense.intermediate if dense else 0)
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": m.vocab,
        "hidden_size": m.hidden,
        "intermediate_size": dense.intermediate if dense else moe_inter,
        "moe_intermediate_size": moe_inter,
        "num_hidden_layers": len(m.layers),
        "num_attention_heads": attn.heads,
        "num_key_value_heads": attn.heads,
        "q_lora_rank": attn.q_lora_rank or None,
        "kv_lora_rank": attn.kv_lora_rank,
        "qk_nope_head_dim": attn.qk_nope_dim,
        "qk_rope_head_dim": attn.qk_rope_dim,
        "v_head_dim": attn.v_dim,
        "n_routed_experts": moe.routed if moe else 0,
        "n_shared_experts": moe.shared if moe else 0,
        "num_experts_per_tok": moe.top_k if moe else 0,
        "n_group": moe.groups if moe else 1,
        "topk_group": moe.top_groups if moe else 1,
        "routed_scaling_factor": moe.route_scale if moe else 1.0,
        "first_k_dense_replace": first_k,
        "moe_layer_freq": 1,
        "norm_topk_prob": moe.effective_renormalize if moe else True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "aux_loss_alpha": moe.seq_aux_loss if moe else 0.0,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "rope_theta": rope_parameters["rope_theta"],
        "rope_parameters": rope_parameters,
        "rope_scaling": rope_scaling,
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_nextn_predict_layers": m.mtp.depth,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "dsvc": {"model": dataclasses.asdict(m)},
    }
    return cfg, problems


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_hf_config(plan: Plan, cfg: dict, source: str = "config.json") -> list[str]:
    """Every way the checkpoint config `cfg` disagrees with the plan, all at once (empty:
    they agree): what the plan's model cannot be in this format, the config's own problems
    (wrong types), and every compared value and the computed RoPE that differ. Keys the
    config omits take transformers' defaults (hf_config.read_hf_config)."""
    want, problems = _config_of_plan(plan)
    problems = [f"{source}: {p}" for p in problems]
    read = read_hf_config(cfg)
    problems += [f"{source}: {path}: {message}" for path, message in read.problems]
    if read.model_type != "deepseek_v3":
        return problems if read.problems else problems + [
            f"{source}: model_type is {read.model_type!r}, the plan's checkpoint format is "
            "'deepseek_v3'"]
    got = dict(read.values, model_type=read.model_type)
    if not got.get("q_lora_rank"):
        got["q_lora_rank"] = None
    dense_layers = any(plan.model.ffn[s.ffn].kind == "dense" for s in plan.model.layers)
    for key in _COMPARED:
        if key == "intermediate_size" and not dense_layers:
            continue  # unused without dense layers
        if got.get(key) is None and any(path == key for path, _ in read.problems):
            continue  # reported above
        if not _same(got.get(key), want[key]):
            problems.append(
                f"{source}: {key} is {got.get(key)!r} in the checkpoint, {want[key]!r} in the plan"
            )
    rope_got, rope_want = effective_rope_of_config(cfg), effective_rope_of_plan(plan)
    if not _same(rope_got, rope_want):
        hint = ""
        if (
            rope_got["kind"] == "yarn"
            and plan.model.rope.kind == "yarn"
            and rope_want["kind"] == "plain"
        ):
            hint = (
                f" (the runtime applies YaRN only when max_seq_len {plan.model.max_seq_len} exceeds "
                f"original_max_seq {plan.model.rope.original_max_seq})"
            )
        problems.append(
            f"{source}: RoPE computed from the checkpoint {rope_got}, from the plan {rope_want}{hint}"
        )
    return problems
