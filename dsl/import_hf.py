"""`dsvc import-hf`: a Hugging Face `config.json` -> a .dsv model block.

Supported model types: DeepSeek-V3 and -V2 (MLA, MoE with shared experts,
group-limited routing, MTP) and LLaMA / Qwen2 (grouped-query attention, dense
SwiGLU). The text is generated from validated numbers and a sanitised name
only, formatted by `dsl.fmt`, and checked by `dsl.loads` before it is returned.
Values a config.json does not carry (the MTP loss weight, the bias update
rate of auxiliary-loss-free balancing) come from the DeepSeek-V3 report and are
marked as such in comments; settings dsvc does not model are named in notes.
"""

from __future__ import annotations

import json
import keyword
import math
import os
import re

from dsvc.dsl.diagnostics import DiagnosticSink, Span

SUPPORTED = ("deepseek_v2", "deepseek_v3", "llama", "qwen2")
RESERVED = {"include", "const", "true", "false"}


def import_config(text: str, file: str = "config.json", name: str | None = None):
    """(.dsv text, notes) for the config.json text `text`. Raises `SpecError`."""
    sink = DiagnosticSink(text, {file: text})
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as err:
        sink.error(f"not valid JSON: {err.msg}", Span(file, err.lineno, err.colno, err.lineno,
                                                      err.colno + 1))
        sink.raise_if_errors()
    except RecursionError:
        sink.error("JSON nested too deeply", Span(file, 1, 1))
        sink.raise_if_errors()
    if not isinstance(cfg, dict):
        sink.error("a config.json holds one JSON object `{...}`", Span(file, 1, 1))
        sink.raise_if_errors()
    c = _Config(cfg, text, file, sink)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        shown = f"'{model_type}'" if isinstance(model_type, str) else "missing"
        sink.error(f"model_type {shown} is not supported", c.where("model_type"),
                   f"supported model types: {', '.join(SUPPORTED)}")
        sink.raise_if_errors()
    notes: list[str] = []
    label = sanitize_name(name or _name_from(cfg, file) or model_type)
    if model_type.startswith("deepseek"):
        lines = _deepseek(c, notes)
    else:
        lines = _llama_like(c, model_type, notes)
    sink.raise_if_errors()
    head = [(f"# Imported by `dsvc import-hf` from {os.path.basename(file)} "
             f"(model_type {model_type})."),
            "# A model block only: add precision, cluster, parallel and train blocks to plan a run",
            "# (examples/deepseek_v3.dsv has all of them)."]
    head += [f"# note: {n}" for n in notes]
    body = "\n".join(head) + f"\n\nmodel {label} {{\n" + "\n".join(lines) + "\n}\n"
    from dsvc.dsl import loads
    from dsvc.dsl.fmt import format_source

    out = format_source(body, file)
    loads(out, filename=os.path.join(os.path.dirname(file), f"{label}.dsv"))  # must check clean
    return out, notes


def sanitize_name(raw: str) -> str:
    """A name usable in .dsv and as a Python identifier: `DeepSeek-V3` -> `deepseek_v3`."""
    word = re.sub(r"[^a-z0-9_]+", "_", str(raw).rsplit("/", 1)[-1].lower())
    word = re.sub(r"_+", "_", word).strip("_") or "model"
    if word[0].isdigit():
        word = "m_" + word
    if keyword.iskeyword(word) or word in RESERVED:
        word += "_model"
    return word


def _name_from(cfg: dict, file: str) -> str | None:
    given = cfg.get("_name_or_path")
    if isinstance(given, str) and given.strip():
        return given
    stem = os.path.splitext(os.path.basename(file))[0]
    return None if stem in ("config", "") else stem


class _Config:
    """Typed reads of config.json fields, each problem reported at the key's line."""

    def __init__(self, cfg: dict, text: str, file: str, sink: DiagnosticSink):
        self.cfg, self.text, self.file, self.sink = cfg, text, file, sink
        self.reported: set[str] = set()  # one diagnostic per key, however often it is read

    def bad(self, key: str, message: str, hint: str | None = None) -> None:
        if key not in self.reported:
            self.reported.add(key)
            self.sink.error(message, self.where(key), hint)

    def where(self, key: str) -> Span:
        m = re.search(r'"' + re.escape(key) + r'"\s*:', self.text)
        if m is None:
            return Span(self.file, 1, 1)
        line = self.text.count("\n", 0, m.start()) + 1
        col = m.start() - (self.text.rfind("\n", 0, m.start()) + 1) + 1
        return Span(self.file, line, col, line, col + len(key) + 2)

    def get(self, key: str, default=None):
        v = self.cfg.get(key, default)
        return default if v is None else v

    def int(self, key: str, default=None, lo: int = 1) -> int:
        v = self.get(key, default)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if v is None:
            self.bad(key, f"config.json has no '{key}'", "this model type needs it")
            return lo
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            self.bad(key, f"'{key}' must be an integer of at least {lo}, got {json.dumps(v)}")
            return lo
        return v

    def num(self, key: str, default=None) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            self.bad(key, f"'{key}' must be a non-negative number, got {json.dumps(v)}")
            return 1.0
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            self.bad(key, f"'{key}' must be true or false, got {json.dumps(v)}")
            return default
        return v

    def word(self, key: str, options: tuple[str, ...], default: str) -> str:
        v = self.get(key, default)
        if v not in options:
            self.bad(key, f"'{key}' = {json.dumps(v)} is not supported",
                     f"supported: {', '.join(options)}")
            return default
        return v


def num_text(v) -> str:
    """A number as .dsv text: integral values without a fraction, others as Python writes them."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


def _common(c: _Config, notes: list[str]) -> list[str]:
    hidden = c.int("hidden_size")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swiglu"):
        c.bad("hidden_act", f"hidden_act {json.dumps(act)} is not supported",
              "dsvc models SwiGLU feed-forward layers (hidden_act silu)")
    lines = [f"vocab = {c.int('vocab_size')}", f"hidden = {hidden}",
             f"max_seq = {c.int('max_position_embeddings', 4096)}",
             f"tie_embeddings = {'true' if c.bool('tie_word_embeddings', False) else 'false'}",
             f"norm = rmsnorm(eps = {num_text(c.num('rms_norm_eps', 1e-6))})"]
    theta = num_text(c.num("rope_theta", 10000))
    scaling = c.get("rope_scaling")
    kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
    if kind == "yarn":
        args = [f"theta = {theta}"]
        for src, dst, default in (("factor", "factor", 1.0),
                                  ("original_max_position_embeddings", "original_max_seq", 4096),
                                  ("beta_fast", "beta_fast", 32), ("beta_slow", "beta_slow", 1),
                                  ("mscale", "mscale", 1.0),
                                  ("mscale_all_dim", "mscale_all_dim", 0)):
            v = scaling.get(src, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                c.bad(src, f"rope_scaling.{src} must be a non-negative number, got "
                      f"{json.dumps(v)}")
                continue
            args.append(f"{dst} = {int(v) if dst == 'original_max_seq' else num_text(v)}")
        lines.append(f"rope = yarn({', '.join(args)})")
        factor = scaling.get("factor", 1.0)
        if not scaling.get("mscale_all_dim") and isinstance(factor, (int, float)) and factor > 1:
            # every released DeepSeek config states both; without it the two readings differ
            notes.append("rope_scaling has no mscale_all_dim: dsvc takes it equal to mscale "
                         "(DeepSeek's reference: softmax scale x m(mscale)^2, cos/sin "
                         "unscaled); transformers would leave the softmax scale alone and "
                         "scale cos/sin by 0.1 ln(factor) + 1")
    else:
        if scaling is not None:
            notes.append(f"rope_scaling {json.dumps(kind)} is not modelled; plain RoPE is used")
        lines.append(f"rope = rope(theta = {theta})")
    return lines + [""]


def _layers(n: int, kind_of) -> list[str]:
    """`a..b = block(...)` lines for runs of layers of equal kind."""
    out, start = [], 0
    for i in range(1, n + 1):
        if i == n or kind_of(i) != kind_of(start):
            rng = f"{start}" if i - 1 == start else f"{start}..{i - 1}"
            out.append(f"  {rng} = block({kind_of(start)})")
            start = i
    return out


def _deepseek(c: _Config, notes: list[str]) -> list[str]:
    lines = _common(c, notes)
    n = c.int("num_hidden_layers")
    q_lora = c.get("q_lora_rank") or 0
    lines += ["attention mla {", f"  heads = {c.int('num_attention_heads')}",
              f"  q_lora_rank = {c.int('q_lora_rank', 0, lo=0) if q_lora else 0}"
              + ("" if q_lora else "  # a plain q projection"),
              f"  kv_lora_rank = {c.int('kv_lora_rank')}",
              f"  qk_nope_dim = {c.int('qk_nope_head_dim')}",
              f"  qk_rope_dim = {c.int('qk_rope_head_dim')}",
              f"  v_dim = {c.int('v_head_dim')}", "}", ""]
    routed = c.get("n_routed_experts")
    first_dense = c.int("first_k_dense_replace", 0, lo=0)
    freq = c.int("moe_layer_freq", 1)

    def kind_of(i: int) -> str:
        return "mla, moe" if routed and i >= first_dense and i % freq == 0 else "mla, dense"

    if any(kind_of(i) == "mla, dense" for i in range(n)):
        lines.append(f"ffn dense {{ intermediate = {c.int('intermediate_size')} }}")
    if routed:
        method = c.word("topk_method", ("greedy", "group_limited_greedy", "noaux_tc"), "greedy")
        groups = c.int("n_group", 1)
        moe = [f"routed = {c.int('n_routed_experts')}",
               f"shared = {c.int('n_shared_experts', 0, lo=0)}",
               f"top_k = {c.int('num_experts_per_tok')}",
               f"intermediate = {c.int('moe_intermediate_size')}",
               f"score = {c.word('scoring_func', ('softmax', 'sigmoid'), 'softmax')}"]
        if groups > 1 and method != "greedy":
            moe += [f"groups = {groups}", f"top_groups = {c.int('topk_group', groups)}"]
            if method == "group_limited_greedy":
                notes.append("group_limited_greedy ranks groups by their best expert; dsvc "
                             "ranks them by the sum of their top-2 (as DeepSeek-V3 does)")
        moe += [f"route_scale = {num_text(c.num('routed_scaling_factor', 1.0))}",
                f"renormalize = {'true' if c.bool('norm_topk_prob', False) else 'false'}"]
        if method == "noaux_tc":
            moe.append("balance = bias(update_rate = 0.001)  # not in config.json: the V3 "
                       "report's value")
        alpha = c.num("aux_loss_alpha", 0.0)
        if alpha and c.bool("seq_aux", True):
            moe.append(f"seq_aux_loss = {num_text(alpha)}")
        elif alpha:
            notes.append("a batch-level auxiliary loss (seq_aux false) is not modelled")
        lines += ["ffn moe {"] + [f"  {m}" for m in moe] + ["}"]
    lines += ["", "layers {"] + _layers(n, kind_of) + ["}"]
    depth = c.int("num_nextn_predict_layers", 0, lo=0)
    if depth:
        lines.append("")
        lines.append(f"mtp {{ depth = {depth}, loss_weight = 0.3 }}  # loss weight: not in "
                     "config.json; the V3 report's value for the first 10T tokens")
    return ["  " + ln if ln else "" for ln in lines]


def _llama_like(c: _Config, model_type: str, notes: list[str]) -> list[str]:
    lines = _common(c, notes)
    hidden = c.int("hidden_size")
    heads = c.int("num_attention_heads")
    kv_heads = c.int("num_key_value_heads", heads)
    head_dim = c.int("head_dim", hidden // heads if heads and hidden % heads == 0 else 0)
    bias = model_type == "qwen2" or c.bool("attention_bias", False)
    kind = "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"
    attn = [f"heads = {heads}"] + ([f"kv_heads = {kv_heads}"] if kind == "gqa" else [])
    if heads and hidden != heads * head_dim:
        attn.append(f"head_dim = {head_dim}")
    if bias:
        attn.append("qkv_bias = true")
    if c.bool("mlp_bias", False):
        notes.append("mlp_bias is not modelled")
    if c.bool("use_sliding_window", False):
        notes.append("sliding-window attention is not modelled; attention is full")
    lines += [f"attention {kind} {{"] + [f"  {a}" for a in attn] + ["}", ""]
    lines.append(f"ffn dense {{ intermediate = {c.int('intermediate_size')} }}")
    n = c.int("num_hidden_layers")
    lines += ["", "layers {", f"  {'0' if n == 1 else f'0..{n - 1}'} = block({kind}, dense)", "}"]
    return ["  " + ln if ln else "" for ln in lines]
