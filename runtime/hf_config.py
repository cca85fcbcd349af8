"""Reading a Hugging Face `config.json`: dsvc's one reader of that format.

`read_hf_config(cfg)` gives an `HFConfig`: the model type, every value the
model needs with the model type's own defaults filled in where the file omits
a key (as transformers applies them: its configuration classes' defaults, and
for keys those classes do not have, such as DeepSeek's `scoring_func`, what
transformers' modeling code does), RoPE read from either form (transformers 5's
`rope_parameters`, or the legacy `rope_scaling` with `rope_theta` beside it),
and every key of the file accounted for: read, ignored (`IGNORED`: no model
meaning), or noted (stated but not modelled). Problems (a value of the wrong
type, a missing key without a default, a value dsvc cannot model) are
collected with their key path, never raised one at a time.

`dsvc import-hf` turns an `HFConfig` into a spec (compiler/import_hf.py); the
HF checkpoint loader compares one against a plan (runtime/hf_export.py).
Standard library only: a build directory reads configs without dsvc.
"""

from __future__ import annotations

import dataclasses
import json
import math

SUPPORTED = ("deepseek_v2", "deepseek_v3", "llama", "qwen2")

# Keys with no model meaning (token ids, storage dtypes, bookkeeping, inference
# switches); docs/hf.md lists them. A key neither read nor here is noted.
IGNORED = frozenset({
    "architectures", "auto_map", "transformers_version", "_name_or_path", "model_type",
    "torch_dtype", "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "quantization_config", "output_router_logits", "pretraining_tp", "ep_size", "return_dict",
    "output_hidden_states", "output_attentions", "tokenizer_class", "id2label", "label2id",
    "num_labels", "problem_type", "is_encoder_decoder", "tie_encoder_decoder",
    "use_return_dict", "chunk_size_feed_forward", "_attn_implementation",
    "attn_implementation", "use_flash_attention_2", "keys_to_ignore_at_inference",
})  # fmt: skip

# Keys transformers recomputes from others whatever the file says (DeepSeek: head_dim is
# qk_rope_head_dim, qk_head_dim is qk_nope_head_dim + qk_rope_head_dim): ignored there.
RECOMPUTED = {"deepseek_v2": ("head_dim", "qk_head_dim"), "deepseek_v3": ("head_dim", "qk_head_dim")}

_LLAMA = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
    "mlp_bias": False, "head_dim": None,
}  # fmt: skip
# transformers' configuration classes' defaults (5.25; the keys shared with 4.x have the same
# defaults there), plus, for keys a class does not have, what its modeling code hard-codes:
# DeepseekV3 routes with sigmoid scores, the group-limited top-k of noaux_tc and an MoE FFN
# on every layer past first_k_dense_replace; DeepseekV2 with softmax scores; Qwen2 puts
# biases on q, k and v. tests/compiler/test_import_hf.py holds this table to the installed
# classes.
DEFAULTS: dict[str, dict[str, object]] = {
    "llama": _LLAMA,
    "qwen2": {
        **{k: v for k, v in _LLAMA.items() if k not in ("attention_bias", "mlp_bias", "head_dim")},
        "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
        "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28, "layer_types": None, "head_dim": None,
    },
    "deepseek_v3": {
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
        "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 4096,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_interleave": True, "attention_bias": False, "attention_dropout": 0.0,
        "num_nextn_predict_layers": 1,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1,
        "aux_loss_alpha": 0.0, "seq_aux": True,
    },
    "deepseek_v2": {
        "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
        "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "first_k_dense_replace": 0,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "n_group": None, "n_routed_experts": 64,
        "n_shared_experts": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "routed_scaling_factor": 1.0, "topk_group": None, "topk_method": "greedy",
        "norm_topk_prob": False, "v_head_dim": 128, "num_experts_per_tok": None,
        "moe_intermediate_size": 1407,
        "scoring_func": "softmax", "moe_layer_freq": 1, "aux_loss_alpha": 0.0, "seq_aux": True,
        "num_nextn_predict_layers": 0,
    },
}  # fmt: skip
ROPE_THETA = 10000.0  # every class's default `rope_theta`
ALIASES = {"num_mtp_layers": "num_nextn_predict_layers"}  # transformers' attribute_map

# key -> (kind, lower bound or choices, None allowed); kinds: int, num, bool, word, words
_TYPES: dict[str, tuple[str, object, bool]] = {
    "vocab_size": ("int", 1, False), "hidden_size": ("int", 1, False),
    "intermediate_size": ("int", 1, False), "num_hidden_layers": ("int", 1, False),
    "num_attention_heads": ("int", 1, False), "num_key_value_heads": ("int", 1, True),
    "head_dim": ("int", 1, True), "hidden_act": ("word", ("silu", "swiglu"), False),
    "max_position_embeddings": ("int", 1, False), "initializer_range": ("num", 0.0, False),
    "rms_norm_eps": ("num", 0.0, False), "tie_word_embeddings": ("bool", None, False),
    "attention_bias": ("bool", None, False), "attention_dropout": ("num", 0.0, False),
    "mlp_bias": ("bool", None, False), "use_sliding_window": ("bool", None, False),
    "sliding_window": ("int", 1, True), "max_window_layers": ("int", 0, False),
    "layer_types": ("words", ("full_attention", "sliding_attention"), True),
    "moe_intermediate_size": ("int", 1, False), "n_shared_experts": ("int", 0, True),
    "n_routed_experts": ("int", 0, True), "routed_scaling_factor": ("num", 0.0, False),
    "kv_lora_rank": ("int", 1, False), "q_lora_rank": ("int", 0, True),
    "qk_rope_head_dim": ("int", 1, False), "v_head_dim": ("int", 1, False),
    "qk_nope_head_dim": ("int", 1, False), "n_group": ("int", 1, True),
    "topk_group": ("int", 1, True), "num_experts_per_tok": ("int", 1, True),
    "first_k_dense_replace": ("int", 0, False), "norm_topk_prob": ("bool", None, False),
    "rope_interleave": ("bool", None, False), "num_nextn_predict_layers": ("int", 0, False),
    "scoring_func": ("word", ("softmax", "sigmoid"), False),
    "topk_method": ("word", ("greedy", "group_limited_greedy", "noaux_tc"), False),
    "moe_layer_freq": ("int", 1, False), "aux_loss_alpha": ("num", 0.0, False),
    "seq_aux": ("bool", None, False),
}  # fmt: skip
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
# RoPE parameter -> (kind, lower bound); the `rope_type`/`type` word is read apart
_ROPE_TYPES = {
    "rope_theta": ("num", 0.0), "factor": ("num", 0.0), "original_max_position_embeddings": ("int", 1),
    "beta_fast": ("num", 0.0), "beta_slow": ("num", 0.0), "mscale": ("num", 0.0),
    "mscale_all_dim": ("num", 0.0), "attention_factor": ("num", 0.0), "truncate": ("bool", None),
}  # fmt: skip


@dataclasses.dataclass
class HFConfig:
    """What a config.json says, read. `values`: every key the model type reads, the file's
    value or the default (None where the type allows none); `given`: keys the file states;
    `rope`: see `read_rope`; `problems` / `notes`: (key path, message)."""

    model_type: str
    values: dict[str, object]
    given: frozenset[str]
    rope: dict
    problems: list[tuple[str, str]]
    notes: list[tuple[str, str]]


def _shown(v) -> str:
    kind = ("true or false" if isinstance(v, bool) else "a number" if isinstance(v, (int, float))
            else "a string" if isinstance(v, str) else "a list" if isinstance(v, list)
            else "an object" if isinstance(v, dict) else "null")
    text = json.dumps(v)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({kind})"


def check_value(v, kind: str, bound, nullable: bool = False) -> tuple[object, str | None]:
    """(the value as dsvc reads it, None) or (None, what is wrong): integers may be written
    as integral floats (4096.0); a bool is never a number."""
    if v is None:
        return (None, None) if nullable else (None, f"must not be null, got {_shown(v)}")
    if kind in ("int", "num"):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            what = "an integer" if kind == "int" else "a number"
            return None, f"must be {what}, got {_shown(v)}"
        if kind == "int":
            if isinstance(v, float) and not v.is_integer():
                return None, f"must be an integer, got {_shown(v)}"
            v = int(v)
        if v < bound:
            return None, f"must be at least {bound}, got {json.dumps(v)}"
        return v, None
    if kind == "bool":
        return (v, None) if isinstance(v, bool) else (None, f"must be true or false, got {_shown(v)}")
    if kind == "word":
        if not isinstance(v, str):
            return None, f"must be a string, got {_shown(v)}"
        if bound is not None and v not in bound:
            return None, f"{json.dumps(v)} is not supported (supported: {', '.join(bound)})"
        return v, None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):  # words
        return None, f"must be a list of strings, got {_shown(v)}"
    unknown = sorted({x for x in v if x not in bound})
    if unknown:
        return None, f"holds {', '.join(map(json.dumps, unknown))} (supported: {', '.join(bound)})"
    return v, None


def read_rope(cfg: dict, problems: list | None = None) -> dict:
    """RoPE as transformers reads it: `rope_parameters` (transformers 5) or `rope_scaling`
    (legacy), `rope_theta` inside it or beside it. -> {"type": "default" | "yarn" | other,
    "theta", and the parameters the file states under their HF names}; problems, if a list
    is given, receive (key path, message) for wrong-typed parameters."""
    problems = [] if problems is None else problems
    where, params = "rope_parameters", cfg.get("rope_parameters")
    if params is None:
        where, params = "rope_scaling", cfg.get("rope_scaling")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        problems.append((where, f"must be an object, got {_shown(params)}"))
        params = {}
    out = {"type": params.get("rope_type", params.get("type", "default")), "where": where}
    if not isinstance(out["type"], str):
        problems.append((f"{where}.rope_type", f"must be a string, got {_shown(out['type'])}"))
        out["type"] = "default"
    theta_at = f"{where}.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = params.get("rope_theta", cfg.get("rope_theta", ROPE_THETA))
    for name, raw, path in [("rope_theta", theta, theta_at)] + [
            (k, v, f"{where}.{k}") for k, v in params.items() if k in _ROPE_TYPES
            and k != "rope_theta"]:
        kind, lo = _ROPE_TYPES[name]
        value, why = check_value(raw, kind, lo, nullable=name != "rope_theta")
        if why:
            problems.append((path, why))
        elif value is not None:
            out["theta" if name == "rope_theta" else name] = value
    out.setdefault("theta", ROPE_THETA)
    out["unread"] = sorted(k for k in params if k not in _ROPE_TYPES and k not in ("rope_type", "type"))
    return out


def read_hf_config(cfg: dict) -> HFConfig:
    """Read a parsed config.json (see the module docstring); never raises for its content."""
    problems: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        why = "is missing" if "model_type" not in cfg else f"must be a string, got {_shown(model_type)}"
        problems.append(("model_type", f"{why}; dsvc reads {', '.join(SUPPORTED)}"))
        return HFConfig("", {}, frozenset(cfg), {}, problems, notes)
    if model_type not in SUPPORTED:
        problems.append(("model_type", f"{json.dumps(model_type)} is not supported; dsvc reads "
                                       f"{', '.join(SUPPORTED)}"))
        return HFConfig(model_type, {}, frozenset(cfg), {}, problems, notes)
    defaults = DEFAULTS[model_type]
    raw = dict(cfg)
    for alias, key in ALIASES.items():
        if alias in raw and key not in raw and key in defaults:
            raw[key] = raw.pop(alias)
    values: dict[str, object] = {}
    for key, default in defaults.items():
        kind, bound, nullable = _TYPES[key]
        value, why = check_value(raw.get(key, default), kind, bound, nullable)
        if why:
            problems.append((key, why))
        values[key] = value
    rope = read_rope(raw, problems)
    skip = set(defaults) | set(_ROPE_KEYS) | IGNORED | set(RECOMPUTED.get(model_type, ()))
    for key in sorted(k for k in raw if k not in skip):
        notes.append((key, f"{key} = {_shown(raw[key])} is not modelled (dsvc has no such setting)"))
    return HFConfig(model_type, values, frozenset(raw), rope, problems, notes)
