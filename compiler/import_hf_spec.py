"""The model block `dsvc import-hf` writes from a read config (runtime/hf_config.py).

`SpecWriter(read).model_lines()` gives the block's lines; `problems` and `notes`
collect (config key path, message) for what cannot be written or is not modelled,
and `origins` maps each written (block, key) back to the config key it came from,
so that `origin_of` can point a diagnostic of the generated spec at the user's
config. Layers are written as ranges, one line per run of equal layers, computed
from first_k_dense_replace and moe_layer_freq without visiting every layer, and
refused when so many runs would make a spec larger than dsvc reads.
"""

from __future__ import annotations

import json
import math

from dsvc.dsl import ast
from dsvc.dsl.lexer import MAX_BYTES
from dsvc.runtime.hf_config import HFConfig

_LINE_BYTES = 28  # the shortest layer-range line written, `  12..34 = block(mla, dense)`
INIT_STD = 0.02  # the runtime's initialisation std (runtime/plan.py init_std)
V3_BIAS_UPDATE_RATE = 0.001  # DeepSeek-V3 report sec. 4.2: gamma = 0.001 for the first 14.3T
V3_MTP_LOSS_WEIGHT = 0.3  # DeepSeek-V3 report sec. 4.2: lambda = 0.3 for the first 10T tokens


def num_text(v) -> str:
    """A number as .dsv text: integral values without a fraction, others as Python writes them."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


class SpecWriter:
    def __init__(self, read: HFConfig):
        self.read, self.v = read, read.values
        self.problems: list[tuple[str, str]] = []
        self.notes: list[tuple[str, str]] = []
        self.origins: dict[tuple[str, str | None], str] = {}
        self.attn_kind = "mla"

    def put(self, block: str, key: str | None, text: str, origin: str) -> str:
        self.origins.setdefault((block, key), origin)
        return text

    def model_lines(self) -> list[str]:
        deepseek = self.read.model_type.startswith("deepseek")
        lines = self._common()
        lines += self._mla() if deepseek else self._gqa()
        lines += self._ffns_and_layers(deepseek)
        return ["  " + ln if ln else "" for ln in lines]

    # -- pieces ------------------------------------------------------------------------

    def _common(self) -> list[str]:
        v, put = self.v, self.put
        if v.get("attention_dropout"):
            self.notes.append(("attention_dropout", f"{v['attention_dropout']}: dsvc trains "
                                                    "without attention dropout"))
        if "initializer_range" in self.read.given and v["initializer_range"] != INIT_STD:
            self.notes.append(("initializer_range", f"{v['initializer_range']}: dsvc "
                                                    f"initialises with std {INIT_STD}"))
        tie = "true" if v["tie_word_embeddings"] else "false"
        lines = [put("model", "vocab", f"vocab = {v['vocab_size']}", "vocab_size"),
                 put("model", "hidden", f"hidden = {v['hidden_size']}", "hidden_size"),
                 put("model", "max_seq", f"max_seq = {v['max_position_embeddings']}",
                     "max_position_embeddings"),
                 put("model", "tie_embeddings", f"tie_embeddings = {tie}", "tie_word_embeddings"),
                 put("model", "norm", f"norm = rmsnorm(eps = {num_text(v['rms_norm_eps'])})",
                     "rms_norm_eps")]
        return lines + [self._rope(), ""]

    def _rope(self) -> str:
        r = self.read.rope
        where = r["where"] if r["type"] != "default" else "rope_theta"
        for key in r["unread"]:
            self.notes.append((f"{r['where']}.{key}", "is not modelled"))
        theta = num_text(r["theta"])
        if r["type"] != "yarn":
            if r["type"] != "default":
                self.notes.append((f"{r['where']}.rope_type", f"{json.dumps(r['type'])} is not "
                                   "modelled; plain RoPE is used"))
            return self.put("model", "rope", f"rope = rope(theta = {theta})", where)
        orig = r.get("original_max_position_embeddings", self.v["max_position_embeddings"])
        factor = r.get("factor") or self.v["max_position_embeddings"] / orig
        args = [f"theta = {theta}", f"factor = {num_text(factor)}", f"original_max_seq = {orig}",
                f"beta_fast = {num_text(r.get('beta_fast', 32))}",
                f"beta_slow = {num_text(r.get('beta_slow', 1))}"]
        mscale, mscale_all = r.get("mscale", 1.0), r.get("mscale_all_dim", 0)
        args += [f"mscale = {num_text(mscale)}", f"mscale_all_dim = {num_text(mscale_all)}"]
        if not mscale_all and factor > 1:
            # every released DeepSeek config states both; without it the two readings differ
            self.notes.append((f"{r['where']}", "no mscale_all_dim: dsvc takes it equal to "
                               "mscale (DeepSeek's reference: softmax scale x m(mscale)^2, "
                               "cos/sin unscaled); transformers would leave the softmax scale "
                               "alone and scale cos/sin by 0.1 ln(factor) + 1"))
        if "attention_factor" in r:
            self.notes.append((f"{r['where']}.attention_factor", "is not modelled: dsvc "
                               "derives the cos/sin scale from mscale and mscale_all_dim"))
        if r.get("truncate") is False:
            self.notes.append((f"{r['where']}.truncate", "false is not modelled: dsvc rounds "
                               "the YaRN correction range as DeepSeek's reference does"))
        return self.put("model", "rope", f"rope = yarn({', '.join(args)})", r["where"])

    def _mla(self) -> list[str]:
        v, put = self.v, self.put
        heads = v["num_attention_heads"]
        if "num_key_value_heads" in self.read.given and v["num_key_value_heads"] not in (None, heads):
            self.notes.append(("num_key_value_heads", f"{v['num_key_value_heads']}: MLA has as "
                               f"many key/value heads as query heads ({heads})"))
        for key, what in (("attention_bias", "attention projections"), ("mlp_bias", "MLPs")):
            if v.get(key):
                self.notes.append((key, f"biases on the {what} are not modelled"))
        if v.get("rope_interleave") is False:
            self.notes.append(("rope_interleave", "false is not modelled: dsvc rotates "
                               "interleaved pairs, as DeepSeek's checkpoints do"))
        q_lora = v["q_lora_rank"] or 0
        self.attn_kind = "mla"
        return [put("attention", None, "attention mla {", "num_attention_heads"),
                put("attention", "heads", f"  heads = {heads}", "num_attention_heads"),
                put("attention", "q_lora_rank", f"  q_lora_rank = {q_lora}"
                    + ("" if q_lora else "  # a plain q projection"), "q_lora_rank"),
                put("attention", "kv_lora_rank", f"  kv_lora_rank = {v['kv_lora_rank']}",
                    "kv_lora_rank"),
                put("attention", "qk_nope_dim", f"  qk_nope_dim = {v['qk_nope_head_dim']}",
                    "qk_nope_head_dim"),
                put("attention", "qk_rope_dim", f"  qk_rope_dim = {v['qk_rope_head_dim']}",
                    "qk_rope_head_dim"),
                put("attention", "v_dim", f"  v_dim = {v['v_head_dim']}", "v_head_dim"), "}", ""]

    def _gqa(self) -> list[str]:
        v, put = self.v, self.put
        hidden, heads = v["hidden_size"], v["num_attention_heads"]
        kv = v["num_key_value_heads"] or heads
        head_dim = v.get("head_dim") or (hidden // heads if hidden % heads == 0 else None)
        if head_dim is None:
            self.problems.append(("num_attention_heads", f"{heads} heads do not divide hidden_size "
                                  f"{hidden} and the config has no head_dim"))
            head_dim = 1
        kind = self.attn_kind = "mha" if kv == heads else "mqa" if kv == 1 else "gqa"
        qwen2 = self.read.model_type == "qwen2"
        if v.get("attention_bias"):
            self.notes.append(("attention_bias", "true: dsvc models the q, k and v biases, not "
                                                 "the output projection's"))
        if v.get("mlp_bias"):
            self.notes.append(("mlp_bias", "biases on the MLPs are not modelled"))
        sliding = [i for i, t in enumerate(v.get("layer_types") or []) if t != "full_attention"]
        if v.get("use_sliding_window") or sliding:
            self.notes.append(("use_sliding_window" if v.get("use_sliding_window") else
                               "layer_types", "sliding-window attention is not modelled; "
                               "attention is full"))
        attn = [put("attention", "heads", f"  heads = {heads}", "num_attention_heads")]
        if kind == "gqa":
            attn.append(put("attention", "kv_heads", f"  kv_heads = {kv}", "num_key_value_heads"))
        if hidden != heads * head_dim:
            attn.append(put("attention", "head_dim", f"  head_dim = {head_dim}", "head_dim"))
        if qwen2 or v.get("attention_bias"):
            attn.append(put("attention", "qkv_bias", "  qkv_bias = true",
                            "model_type" if qwen2 else "attention_bias"))
        return [put("attention", None, f"attention {kind} {{", "num_attention_heads"),
                *attn, "}", ""]

    def _ffns_and_layers(self, deepseek: bool) -> list[str]:
        v, put = self.v, self.put
        n = v["num_hidden_layers"]
        routed = v["n_routed_experts"] if deepseek else 0
        first, freq = (v["first_k_dense_replace"], v["moe_layer_freq"]) if deepseek else (n, 1)
        count = run_count(n, first if routed else n, freq)
        if count * _LINE_BYTES > MAX_BYTES:
            self.problems.append(("num_hidden_layers", f"{n} layers with moe_layer_freq {freq} "
                                  f"make {count} runs of equal layers, a spec over dsvc's "
                                  f"{MAX_BYTES // 10**6} MB limit"))
            return []
        runs = list(layer_runs(n, first if routed else n, freq))
        layers = [put("layers", None, f"  {lo}{'' if lo == hi else f'..{hi}'} = "
                      f"block({self.attn_kind}, {'moe' if moe else 'dense'})", "num_hidden_layers")
                  for lo, hi, moe in runs]
        lines = []
        if any(not moe for _, _, moe in runs):
            lines.append(put("ffn dense", "intermediate",
                             f"ffn dense {{ intermediate = {v['intermediate_size']} }}",
                             "intermediate_size"))
        if any(moe for _, _, moe in runs):
            lines += self._moe()
        lines += ["", put("layers", None, "layers {", "num_hidden_layers"), *layers, "}"]
        depth = v.get("num_nextn_predict_layers") or 0
        if deepseek and "num_nextn_predict_layers" not in self.read.given and depth:
            self.notes.append(("num_nextn_predict_layers", f"not stated: transformers 5 takes "
                               f"{depth} MTP module(s) (4.x none); write `mtp {{ depth = 0 }}` "
                               "if the checkpoint has no MTP layers"))
        if depth:
            lines += ["", put("mtp", "depth", f"mtp {{ depth = {depth}, loss_weight = "
                              f"{V3_MTP_LOSS_WEIGHT} }}  # loss weight: not in config.json; "
                              "the V3 report's value for the first 10T tokens",
                              "num_nextn_predict_layers")]
        return lines

    def _moe(self) -> list[str]:
        v, put = self.v, self.put
        if v["num_experts_per_tok"] is None:
            self.problems.append(("num_experts_per_tok", "is null; an MoE model needs its "
                                                         "experts per token"))
            return []
        method, groups = v["topk_method"], v["n_group"] or 1
        top_groups = v["topk_group"] or groups
        moe = [put("ffn moe", "routed", f"routed = {v['n_routed_experts']}", "n_routed_experts"),
               put("ffn moe", "shared", f"shared = {v['n_shared_experts'] or 0}",
                   "n_shared_experts"),
               put("ffn moe", "top_k", f"top_k = {v['num_experts_per_tok']}", "num_experts_per_tok"),
               put("ffn moe", "intermediate", f"intermediate = {v['moe_intermediate_size']}",
                   "moe_intermediate_size"),
               put("ffn moe", "score", f"score = {v['scoring_func']}", "scoring_func")]
        if groups > 1 and method != "greedy":
            moe += [put("ffn moe", "groups", f"groups = {groups}", "n_group"),
                    put("ffn moe", "top_groups", f"top_groups = {top_groups}", "topk_group")]
            if method == "group_limited_greedy":
                self.notes.append(("topk_method", "group_limited_greedy ranks groups by their "
                                   "best expert; dsvc ranks them by the sum of their top-2 (as "
                                   "DeepSeek-V3 does)"))
        elif groups > 1 and "n_group" in self.read.given:
            self.notes.append(("n_group", f"{groups} groups are unused with topk_method greedy"))
        renorm = "true" if v["norm_topk_prob"] else "false"
        moe += [put("ffn moe", "route_scale",
                    f"route_scale = {num_text(v['routed_scaling_factor'])}", "routed_scaling_factor"),
                put("ffn moe", "renormalize", f"renormalize = {renorm}", "norm_topk_prob")]
        if method == "noaux_tc":
            moe.append(put("ffn moe", "balance", f"balance = bias(update_rate = "
                           f"{V3_BIAS_UPDATE_RATE})  # not in config.json: the V3 report's value",
                           "topk_method"))
        alpha = v["aux_loss_alpha"]
        if alpha and v["seq_aux"]:
            moe.append(put("ffn moe", "seq_aux_loss", f"seq_aux_loss = {num_text(alpha)}",
                           "aux_loss_alpha"))
        elif alpha:
            self.notes.append(("seq_aux", "false: a batch-level auxiliary loss is not modelled"))
        return [put("ffn moe", None, "ffn moe {", "n_routed_experts"),
                *[f"  {m}" for m in moe], "}"]


# -- layer runs ---------------------------------------------------------------------------


def run_count(n: int, first_moe: int, freq: int) -> int:
    """How many runs of equal layers `layer_runs` gives (without making them): layer i is
    MoE when i >= first_moe and i % freq == 0 (DeepSeek's modeling code)."""
    if first_moe >= n:
        return 1
    multiples = (n - 1) // freq - (first_moe - 1) // freq if first_moe else (n - 1) // freq + 1
    return 1 + 2 * multiples if freq > 1 else 1 + (first_moe > 0)


def layer_runs(n: int, first_moe: int, freq: int):
    """(first, last, is MoE) for each run of equal layers, in order; O(runs), not O(layers)."""
    if first_moe >= n:
        yield 0, n - 1, False
        return
    if freq == 1:
        if first_moe:
            yield 0, first_moe - 1, False
        yield first_moe, n - 1, True
        return
    start = 0
    i = math.ceil(first_moe / freq) * freq  # the first MoE layer
    while i < n:
        if i > start:
            yield start, i - 1, False
        yield i, i, True
        start, i = i + 1, i + freq
    if start < n:
        yield start, n - 1, False


def origin_of(tree: ast.File, span, origins: dict) -> str:
    """The config key a position in the generated spec came from: the innermost written
    (block, key) holding it, else its block's, else the model's size."""
    def inside(sp) -> bool:
        return sp is not None and span is not None and (sp.line, sp.col) <= (
            span.line, span.col) and (span.line, span.col) < (sp.end_line, sp.end_col)

    found = origins.get(("model", "hidden"), "hidden_size")
    for top in tree.items:
        if not isinstance(top, ast.Block) or not inside(top.span):
            continue
        for e in top.entries:
            if isinstance(e, ast.Assign) and inside(e.span):
                return origins.get(("model", e.key), found)
            if isinstance(e, ast.Block) and inside(e.span):
                block = e.kind if e.kind != "ffn" else f"ffn {e.label}"
                for sub in e.entries:
                    key = sub.key if isinstance(sub, ast.Assign) else None
                    if inside(sub.span) and (block, key) in origins:
                        return origins[(block, key)]
                return origins.get((block, None), found)
    return found
