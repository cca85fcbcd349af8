"""`dsvc import-hf`: public Hugging Face configs become .dsv specs that check clean."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import pytest

from dsvc import dsl
from dsvc.compiler.cli import main
from dsvc.compiler.import_hf import import_config, sanitize_name
from dsvc.dsl.diagnostics import SpecError
from dsvc.dsl.fmt import format_source
from tests.golden import check_golden

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Field values of the public config.json files (deepseek-ai/DeepSeek-V3,
# deepseek-ai/DeepSeek-V2-Lite, meta-llama/Meta-Llama-3-8B, Qwen/Qwen2-7B).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
    "use_cache": True, "pad_token_id": None, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "attention_bias": False, "aux_loss_alpha": 0.001, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
    "v_head_dim": 128, "vocab_size": 102400,
}
LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 152064,
}


def imported(cfg: dict, name: str = "m"):
    text, _ = import_config(json.dumps(cfg, indent=2), "config.json", name)
    assert format_source(text) == text  # already canonical
    return dsl.loads(text, filename="imported.dsv").model, text


def test_deepseek_v3_matches_the_example():
    got, text = imported(DEEPSEEK_V3)
    want = dsl.load(ROOT / "examples/deepseek_v3.dsv").model
    assert got.attentions == want.attentions and got.layers == want.layers
    assert got.ffns["dense"] == want.ffns["dense"]
    differs = {"seq_aux_loss"}  # config.json: aux_loss_alpha 0.001; the report's run: 0.0001
    for field in type(want.ffns["moe"]).model_fields:
        if field not in differs:
            assert getattr(got.ffns["moe"], field) == getattr(want.ffns["moe"], field), field
    assert (got.vocab, got.hidden, got.norm, got.mtp) == (want.vocab, want.hidden, want.norm,
                                                          want.mtp)
    assert got.rope.factor == 40 and got.rope.mscale_all_dim == 1.0
    assert got.max_seq == 163840 and not got.tie_embeddings
    assert "0..2 = block(mla, dense)" in text and "3..60 = block(mla, moe)" in text


def test_deepseek_v3_import_compiles_to_a_plan_the_released_config_matches():
    """max_seq from max_position_embeddings (163840 > 4096: YaRN applies, as in the released
    model) and both mscales: the runtime's config check accepts the released config.json."""
    from dsvc.compiler.codegen.emit_plan import model_record
    from dsvc.runtime.hf import check_hf_config
    from dsvc.runtime.plan import parse_plan
    from dsvc.runtime.schema import to_json as dump_plan_part
    from dsvc.runtime.tiny import tiny_plan

    text, _ = import_config(json.dumps(DEEPSEEK_V3), "config.json", "v3")
    raw = tiny_plan(pp=1, dp=1, ep=1, num_layers=61)
    raw["model"] = dump_plan_part(model_record(dsl.loads(text, filename="v3.dsv").model))
    raw["experts"]["moe"] = {"per_rank": [list(range(256))],
                             "group_of_expert": [e // 32 for e in range(256)]}
    plan = parse_plan(raw)
    assert plan.model.max_seq_len == 163840 and plan.model.rope.mscale_all_dim == 1.0
    assert check_hf_config(plan, DEEPSEEK_V3) == []


def test_yarn_without_mscale_all_dim_is_imported_with_a_note():
    scaling = {k: v for k, v in DEEPSEEK_V3["rope_scaling"].items() if k != "mscale_all_dim"}
    text, notes = import_config(json.dumps(dict(DEEPSEEK_V3, rope_scaling=scaling)),
                                "config.json", "m")
    assert dsl.loads(text).model.rope.mscale_all_dim == 0  # "same as mscale"
    assert any("no mscale_all_dim" in n and "transformers" in n for n in notes)
    _, notes = import_config(json.dumps(DEEPSEEK_V3), "config.json", "m")
    assert not any("mscale_all_dim" in n for n in notes)


def test_deepseek_v2_lite_matches_the_example():
    got, _ = imported(DEEPSEEK_V2_LITE)
    want = dsl.load(ROOT / "examples/deepseek_v2_lite.dsv").model
    for field in ("vocab", "hidden", "norm", "rope", "attentions", "ffns", "layers", "mtp"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.attentions["mla"].q_lora_rank == 0


def test_llama_3_8b():
    got, text = imported(LLAMA_3_8B)
    attn = got.attentions["gqa"]
    assert (attn.heads, attn.kv_heads, attn.head_dim, attn.qkv_bias) == (32, 8, 128, False)
    assert got.ffns["dense"].intermediate == 14336 and got.num_layers == 32
    assert (got.vocab, got.hidden, got.max_seq, got.norm.eps) == (128256, 4096, 8192, 1e-5)
    assert got.rope.kind == "plain" and got.rope.theta == 500000
    assert "rope = rope(theta = 500000)" in text


def test_qwen2_7b():
    got, _ = imported(QWEN2_7B)
    attn = got.attentions["gqa"]
    assert (attn.heads, attn.kv_heads, attn.head_dim, attn.qkv_bias) == (28, 4, 128, True)
    assert got.ffns["dense"].intermediate == 18944 and got.num_layers == 28
    assert (got.vocab, got.hidden, got.rope.theta) == (152064, 3584, 1e6)


def test_moe_layer_freq_and_notes():
    cfg = dict(DEEPSEEK_V3, moe_layer_freq=2, first_k_dense_replace=1, num_hidden_layers=6,
               rope_scaling={"type": "linear", "factor": 2.0})
    text, notes = import_config(json.dumps(cfg), "config.json", "m")
    model = dsl.loads(text).model
    assert [layer.ffn for layer in model.layers] == ["dense", "dense", "moe", "dense", "moe",
                                                     "dense"]
    assert any("rope_scaling" in n for n in notes) and "# note: rope_scaling" in text


@pytest.mark.parametrize("raw, name", [
    ("deepseek-ai/DeepSeek-V3", "deepseek_v3"), ('a"); import os', "a_import_os"),
    ("class", "class_model"), ("3B-chat", "m_3b_chat"), ("", "model"), ("include", "include_model"),
    ("__init__", "init"),
])
def test_names_are_sanitised(raw, name):
    assert sanitize_name(raw) == name


def test_name_from_the_config():
    cfg = dict(LLAMA_3_8B, _name_or_path="meta-llama/Meta-Llama-3-8B")
    text, _ = import_config(json.dumps(cfg), "config.json")
    assert "model meta_llama_3_8b {" in text


def diag(text: str):
    with pytest.raises(SpecError) as info:
        import_config(text, "config.json")
    return info.value


def test_bad_json_points_at_line_and_column():
    err = diag('{\n  "model_type": "llama",\n  "hidden_size": 4096,,\n}\n')
    (d,) = err.diagnostics
    assert (d.span.line, d.span.col) == (3, 23) and d.message.startswith("not valid JSON")
    assert "    3 |" in err.render() and "^" in err.render()


def test_unknown_model_type_names_the_supported_ones():
    err = diag(json.dumps({"model_type": "mistral"}, indent=1))
    assert 'config.json:2:2: error: model_type: "mistral" is not supported' in err.render()
    assert "deepseek_v2, deepseek_v3, llama, qwen2" in err.render()
    assert "model_type: is missing" in diag("{}").render()
    # a wrong type is named as such, not as missing
    assert "model_type: must be a string, got 5 (a number)" in diag('{"model_type": 5}').render()
    assert "a config.json holds one JSON object" in diag("[1, 2]").render()


def test_bad_values_are_located():
    cfg = dict(LLAMA_3_8B, hidden_size="big", hidden_act="gelu")
    err = diag(json.dumps(cfg, indent=1))
    text = err.render()
    assert 'config.json:11:2: error: hidden_size: must be an integer, got "big" (a string)' in text
    assert 'hidden_act: "gelu" is not supported (supported: silu, swiglu)' in text
    line = json.dumps(cfg, indent=1).splitlines().index(' "hidden_size": "big",') + 1
    assert any(d.span.line == line for d in err.diagnostics)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["import-hf", *args])
    return code, out.getvalue(), err.getvalue()


def test_cli_writes_a_spec_that_checks(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(QWEN2_7B))
    out = tmp_path / "qwen.dsv"
    out.write_text("old contents")
    code, stdout, stderr = run_cli(str(cfg), "-o", str(out), "--name", "qwen2-7b")
    assert code == 0 and stdout == "" and f"replaced {out}" in stderr
    assert "model qwen2_7b {" in out.read_text()
    assert main(["check", "-q", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "qwen.dsv"]
    code, stdout, _ = run_cli(str(cfg))  # to stdout, named after the model type
    assert code == 0 and stdout == out.read_text().replace("model qwen2_7b {", "model qwen2 {")


def test_cli_errors_write_nothing(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "gpt2"}')
    out = tmp_path / "out.dsv"
    code, _, stderr = run_cli(str(cfg), "-o", str(out))
    assert code == 1 and "not supported" in stderr and not out.exists()
    assert run_cli(str(cfg), "-o", str(tmp_path / "out.txt"))[0] == 2
    assert run_cli(str(cfg), "-o", str(tmp_path / "no" / "out.dsv"))[0] == 2
    code, _, stderr = run_cli(str(tmp_path / "missing.json"))
    assert code == 1 and stderr.count("\n") == 1 and "missing.json: no such file" in stderr


# -- transformers 4 and 5 layouts, defaults, unmappable keys (issue 14) ---------------------

CONFIGS = ROOT / "tests" / "compiler" / "hf_configs"


@pytest.mark.parametrize("name", ["deepseek_v3_transformers4", "deepseek_v3_transformers5"])
def test_golden_imports(name):
    """The released DeepSeek-V3 config as published (transformers 4 layout: rope_scaling,
    rope_theta beside it, DeepSeek's scoring_func/topk_method) and as transformers 5 writes
    the same model (rope_parameters; no scoring_func, topk_method, aux loss keys)."""
    path = CONFIGS / f"{name}.json"
    text, _ = import_config(path.read_text(), str(path.relative_to(ROOT)), "deepseek_v3")
    check_golden(f"import_hf/{name}.dsv", text)


def test_both_layouts_give_the_same_model():
    t4, t5 = (dsl.loads(import_config((CONFIGS / f"deepseek_v3_transformers{v}.json").read_text(),
                                      "config.json", "v3")[0]).model for v in (4, 5))
    moe4, moe5 = t4.ffns["moe"], t5.ffns["moe"]
    # transformers 5 drops aux_loss_alpha (the released 0.001): the only difference
    assert moe4.seq_aux_loss == 0.001 and moe5.seq_aux_loss == 0.0
    assert moe4.model_copy(update={"seq_aux_loss": 0.0}) == moe5
    assert t4.model_copy(update={"ffns": t5.ffns}) == t5
    assert t5 == dsl.load(ROOT / "examples/deepseek_v3.dsv").model.model_copy(update={
        "name": "v3", "max_seq": 163840, "rope": t5.rope,
        "ffns": {**t5.ffns}})  # the example trains at 4096 without YaRN; the rest agrees


def test_transformers_5_deepseek_v3_config(tmp_path):
    """What transformers 5 writes (`DeepseekV3Config(...).save_pretrained`): sigmoid scores,
    the groups, bias balancing and YaRN, from the model type's own behaviour and
    rope_parameters, with rope_theta 50000 kept (it was lost as 10000 before)."""
    from transformers import DeepseekV3Config

    rope = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 40.0,
            "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    DeepseekV3Config(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
        first_k_dense_replace=1, max_position_embeddings=163840, rope_parameters=rope,
    ).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "scoring_func" not in written and "rope_scaling" not in written  # the 5.x layout
    text, notes = import_config((tmp_path / "config.json").read_text(), "config.json", "m")
    model = dsl.loads(text).model
    moe = model.ffns["moe"]
    assert (moe.score, moe.groups, moe.top_groups, moe.balance) == ("sigmoid", 4, 2, "bias")
    assert (moe.routed, moe.top_k, moe.renormalize, moe.route_scale) == (16, 4, True, 2.5)
    r = model.rope
    assert (r.kind, r.theta, r.factor, r.original_max_seq) == ("yarn", 50000, 40, 4096)
    assert (r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim) == (32, 1, 1.0, 1.0)
    assert model.mtp.depth == 1 and [layer.ffn for layer in model.layers] == ["dense"] + ["moe"] * 5
    assert notes == []  # every key transformers wrote is read or has no model meaning


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2", "llama", "qwen2"])
def test_defaults_are_the_installed_transformers_defaults(model_type):
    """The reader's defaults for keys a config omits agree with the installed transformers'
    configuration classes (their public attribute values), where a class has the key."""
    import transformers

    from dsvc.runtime.hf_config import DEFAULTS

    cls = {"deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config,
           "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    theirs = cls()
    derived = {  # None in the table means what the class derives in its __post_init__
        "num_key_value_heads": theirs.num_attention_heads,
        "head_dim": theirs.hidden_size // theirs.num_attention_heads,
    }
    compared = 0
    for key, mine in DEFAULTS[model_type].items():
        if not hasattr(theirs, key) or key in ("sliding_window", "layer_types", "head_dim") \
                and model_type != "llama":
            continue  # a key the class does not have (its modeling code's behaviour), or
            # one its __post_init__ rewrites from use_sliding_window / qk_rope_head_dim
        got = getattr(theirs, key)
        assert (mine if mine is not None else derived.get(key)) == got or mine == got, key
        compared += 1
    assert compared >= 14
    default = theirs.to_dict()
    if model_type == "deepseek_v2":  # its default num_experts_per_tok is null: no MoE to run
        with pytest.raises(SpecError, match="num_experts_per_tok: is null"):
            import_config(json.dumps(default), "config.json", "m")
        return
    text, _ = import_config(json.dumps(default), "config.json", "m")  # imports cleanly
    assert dsl.loads(text).model.num_layers == default["num_hidden_layers"]


def test_an_unmappable_key_is_named_and_ignored_keys_are_not():
    cfg = dict(LLAMA_3_8B, rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "rope_theta": 500000.0},
               router_jitter=0.1, attention_dropout=0.1)
    _, notes = import_config(json.dumps(cfg), "config.json", "m")
    assert any(n.startswith("router_jitter: router_jitter = 0.1 (a number) is not modelled")
               for n in notes)
    assert any(n.startswith('rope_parameters.rope_type: "llama3" is not modelled') for n in notes)
    assert any(n.startswith("attention_dropout: 0.1") for n in notes)
    for ignored in ("bos_token_id", "torch_dtype", "architectures", "use_cache"):
        assert not any(n.startswith(ignored) for n in notes), ignored


def test_diagnostics_point_into_the_json_by_key_path():
    cfg = dict(DEEPSEEK_V3, rope_scaling=dict(DEEPSEEK_V3["rope_scaling"], factor="forty"),
               q_lora_rank=True)
    text = json.dumps(cfg, indent=1)
    err = diag(text)
    rendered = err.render()
    assert 'rope_scaling.factor: must be a number, got "forty" (a string)' in rendered
    assert "q_lora_rank: must be an integer, got true (true or false)" in rendered
    factor = next(d for d in err.diagnostics if d.message.startswith("rope_scaling.factor"))
    line = text.splitlines()[factor.span.line - 1]
    assert factor.span.file == "config.json" and '"factor": "forty"' in line


def test_a_billion_layers_is_judged_by_dsvcs_own_limits_at_once():
    """num_hidden_layers 1e9 writes two layer ranges, not a line per layer, and dsvc's own
    range limit rejects it, reported at the config key (no generated file to point into)."""
    import time

    t0 = time.perf_counter()
    err = diag(json.dumps(dict(DEEPSEEK_V3, num_hidden_layers=1e9), indent=1))
    assert time.perf_counter() - t0 < 5
    (d,) = err.diagnostics
    assert d.span.file == "config.json" and d.span.line == 10
    assert d.message == "num_hidden_layers: layer 999999999 is past the limit of 256 layers (0..255)"
    err = diag(json.dumps(dict(DEEPSEEK_V3, num_hidden_layers=10**9, moe_layer_freq=2)))
    assert "spec over dsvc's 2 MB limit" in err.render()


@pytest.mark.parametrize("n, first, freq", [(10, 1, 2), (10, 0, 3), (7, 3, 1), (5, 9, 1),
                                            (12, 4, 4), (1, 0, 1), (9, 2, 2)])
def test_layer_runs_follow_deepseeks_rule(n, first, freq):
    from dsvc.compiler.import_hf_spec import layer_runs, run_count

    runs = list(layer_runs(n, first, freq))
    kinds = [moe for lo, hi, moe in runs for _ in range(lo, hi + 1)]
    assert kinds == [i >= first and i % freq == 0 for i in range(n)]
    assert all(a[2] != b[2] for a, b in zip(runs, runs[1:]))  # maximal runs
    assert len(runs) <= run_count(n, first, freq)
