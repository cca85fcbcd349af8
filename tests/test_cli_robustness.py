"""A user's-eye sweep of every `dsvc` command: wrong input ends in exit 0/1/2 and a clear message.

Each case runs `compiler.cli.main` in-process in a scratch directory holding the
files below (a copy of examples/tiny.dsv and variants of it, bad JSON, a
directory). A case fails if the exit code differs, if stderr shows a traceback
or the "internal error" fallback (exit 3), or if an error wrote a file. `train`
is swept only up to the errors raised before training starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil

import pytest

from dsvc.compiler.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = (ROOT / "examples" / "tiny.dsv").read_text()


def _variant(*subs: tuple[str, str]) -> str:
    text = TINY
    for old, new in subs:
        assert old in text, old
        text = text.replace(old, new)
    return text


SPECS = {
    "model_only.dsv": TINY[TINY.index("model tiny"):TINY.index("precision fp8")],
    "no_train.dsv": TINY[:TINY.index("train {")],
    "no_parallel.dsv": _variant((TINY[TINY.index("parallel {"):TINY.index("train {")], "")),
    "no_cluster.dsv": _variant(('include "clusters/cpu4.dsv"', "")),
    "vocab_huge.dsv": _variant(("vocab = 512", "vocab = 1000000000000")),
    "layers_huge.dsv": _variant(("1..3 = block(mla, moe)", "1..999999 = block(mla, moe)")),
    "micro_batches_huge.dsv": _variant(("global_batch = 8", "global_batch = 100000000")),
    "pp_is_layers.dsv": _variant(("pipeline = 2", "pipeline = 4"), ("expert = 2", "expert = 1")),
    "pp_not_dividing.dsv": _variant(("pipeline = 2", "pipeline = 5")),
    "mtp3.dsv": _variant(("depth = 1", "depth = 3")),
    "q_lora_0.dsv": _variant(("q_lora_rank = 128", "q_lora_rank = 0")),
    "one_micro_batch.dsv": _variant(("global_batch = 8", "global_batch = 2")),
    "dualpipe.dsv": _variant(("schedule = 1f1b", "schedule = dualpipe")),
    "single_gpu.dsv": _variant(
        ('include "clusters/cpu4.dsv"',
         "cluster one {\n  nodes = 1\n  gpus_per_node = 1\n"
         "  gpu = cpu { bf16 = 1 TFLOPS, fp8 = 1 TFLOPS, memory = 4 GB, hbm = 20 GB/s }\n"
         "  nvlink { domain = 1, bandwidth = 10 GB/s, effective = 5 GB/s }\n"
         "  network ethernet { nic = 10 Gb/s, effective = 1 GB/s }\n}"),
        ("pipeline = 2", "pipeline = 1"), ("expert = 2", "expert = 1")),
}
LOADS = {
    "bad.json": "{not json",
    "short.json": "[1, 2, 3]",
    "negative.json": json.dumps([-1] + [1] * 7),
    "infinite.json": "[Infinity, 1, 1, 1, 1, 1, 1, 1]",
    "huge.json": json.dumps([1e308] * 8),
    "string.json": '"hello"',
    "canonical.json": json.dumps({"format": "dsvc-expert-load", "version": 1,
                                  "layers": {"1": [5, 1, 1, 1, 1, 1, 1, 1]}, "default": [1] * 8}),
}
HF = {
    # a key without a default (DeepseekV2's experts per token is null in transformers)
    "hf_missing_keys.json": json.dumps({"model_type": "deepseek_v2"}),
    "hf_defaults.json": json.dumps({"model_type": "llama"}),  # transformers' LlamaConfig()
    "hf_wrong_types.json": json.dumps({"model_type": "llama", "vocab_size": "many",
                                       "hidden_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "intermediate_size": 128}),
    "hf_list.json": "[1, 2]",
}

SCHED = ["schedule", "--kind"]
# (argv, exit code). 0 ok, 1 spec error, 2 usage error.
CASES = [
    # check / fmt
    (["check", "nosuch.dsv"], 1), (["check", "adir"], 1), (["check", "empty.dsv"], 1),
    (["check", "junk.dsv"], 1), (["check", "model_only.dsv"], 0),
    (["check", "tiny.dsv", "junk.dsv"], 1), (["check", "layers_huge.dsv"], 1),
    (["check", "micro_batches_huge.dsv"], 1), (["check", "pp_not_dividing.dsv"], 1),
    (["check", "vocab_huge.dsv"], 0),
    (["fmt", "nosuch.dsv"], 1), (["fmt", "adir"], 1), (["fmt", "junk.dsv"], 1),
    (["fmt", "--check", "model_only.dsv"], 1),
    # import-hf
    (["import-hf", "nosuch.json"], 1), (["import-hf", "adir"], 1), (["import-hf", "bad.json"], 1),
    (["import-hf", "empty.dsv"], 1), (["import-hf", "junk.dsv"], 1),
    (["import-hf", "hf_missing_keys.json"], 1), (["import-hf", "hf_wrong_types.json"], 1),
    (["import-hf", "hf_list.json"], 1), (["import-hf", "hf_defaults.json"], 0),
    (["import-hf", "hf_missing_keys.json", "-o", "nodir/x.dsv"], 2),
    (["import-hf", "hf_missing_keys.json", "-o", "adir"], 2),
    # report
    (["report", "nosuch.dsv"], 1), (["report", "empty.dsv"], 1), (["report", "junk.dsv"], 1),
    (["report", "model_only.dsv"], 0), (["report", "model_only.dsv", "--json"], 0),
    (["report", "no_train.dsv"], 0), (["report", "no_cluster.dsv"], 1),
    (["report", "tiny.dsv", "junk.dsv"], 1), (["report", "tiny.dsv", "model_only.dsv"], 0),
    (["report", "vocab_huge.dsv"], 0), (["report", "micro_batches_huge.dsv"], 1),
    (["report", "tiny.dsv", "--expert-load", "nosuch.json"], 2),
    (["report", "tiny.dsv", "--expert-load", "adir"], 2),
    (["report", "tiny.dsv", "--expert-load", "bad.json"], 1),
    (["report", "tiny.dsv", "--expert-load", "short.json"], 1),
    (["report", "tiny.dsv", "--expert-load", "negative.json"], 1),
    (["report", "tiny.dsv", "--expert-load", "infinite.json"], 1),
    (["report", "tiny.dsv", "--expert-load", "string.json"], 1),
    (["report", "tiny.dsv", "--expert-load", "huge.json"], 0),
    (["report", "tiny.dsv", "--expert-load", "canonical.json"], 0),
    # inspect
    (["inspect", "nosuch.dsv"], 1), (["inspect", "junk.dsv"], 1),
    (["inspect", "model_only.dsv"], 0), (["inspect", "model_only.dsv", "--stage", "0"], 0),
    (["inspect", "tiny.dsv", "--stage", "99"], 2), (["inspect", "tiny.dsv", "--stage", "-1"], 2),
    (["inspect", "tiny.dsv", "--rank", "-1"], 2), (["inspect", "tiny.dsv", "--layer", "1000"], 2),
    (["inspect", "tiny.dsv", "--after", "nosuch"], 2),
    (["inspect", "tiny.dsv", "--format", "nosuch"], 2),
    (["inspect", "tiny.dsv", "--format", "chrome"], 2),
    (["inspect", "tiny.dsv", "-o", "nodir/out.txt"], 2), (["inspect", "tiny.dsv", "-o", "adir"], 2),
    (["inspect", "tiny.dsv", "--expert-load", "nosuch.json"], 2),
    (["inspect", "tiny.dsv", "--expert-load", "bad.json"], 1),
    (["inspect", "tiny.dsv", "--expert-load", "short.json"], 1),
    (["inspect", "tiny.dsv", "--expert-load", "negative.json"], 1),
    (["inspect", "tiny.dsv", "--expert-load", "infinite.json"], 1),
    (["inspect", "tiny.dsv", "--expert-load", "canonical.json"], 0),
    (["inspect", "mtp3.dsv", "--layer", "6"], 0), (["inspect", "q_lora_0.dsv"], 0),
    (["inspect", "model_only.dsv", "--schedule"], 1),
    (["inspect", "no_train.dsv", "--schedule"], 1),
    (["inspect", "tiny.dsv", "--schedule", "--format", "dot"], 2),
    (["inspect", "tiny.dsv", "--schedule", "--format", "png"], 2),
    (["inspect", "tiny.dsv", "--schedule", "--format", "png", "-o", "adir"], 2),
    (["inspect", "tiny.dsv", "--schedule", "-o", "nodir/x.txt"], 2),
    (["inspect", "tiny.dsv", "--schedule", "--stage", "0"], 2),
    (["inspect", "pp_is_layers.dsv", "--schedule"], 0),
    (["inspect", "one_micro_batch.dsv", "--schedule"], 0),
    (["inspect", "dualpipe.dsv", "--schedule"], 0),
    (["inspect", "single_gpu.dsv", "--schedule"], 0),
    # schedule
    (SCHED + ["dualpipe", "--stages", "3", "--micro-batches", "6"], 2),
    (SCHED + ["dualpipe", "--stages", "4", "--micro-batches", "3"], 2),
    (SCHED + ["dualpipev", "--stages", "3", "--micro-batches", "6"], 2),
    (SCHED + ["1f1b", "--stages", "0", "--micro-batches", "4"], 2),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "0"], 2),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "8", "--f", "-1"], 2),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "8", "--f", "nan"], 2),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "8", "--f", "1/0"], 2),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "8", "--w", "3"], 2),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "8", "--f", "0", "--b", "0", "--w", "0"],
     0),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "8", "--format", "png"], 2),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "8", "--format", "png", "-o",
              "nodir/a.png"], 2),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "8", "--format", "png", "-o", "adir"], 2),
    (SCHED + ["1f1b", "--stages", "4", "--micro-batches", "8", "-o", "adir"], 2),
    (SCHED + ["1f1b", "--stages", "2", "--micro-batches", "1000000000"], 2),
    (SCHED + ["nosuch", "--stages", "4", "--micro-batches", "8"], 2),
    # compile
    (["compile", "nosuch.dsv", "-o", "out"], 1), (["compile", "junk.dsv", "-o", "out"], 1),
    (["compile", "tiny.dsv"], 2), (["compile", "tiny.dsv", "-o", "tiny.dsv"], 2),
    (["compile", "tiny.dsv", "-o", "clusters"], 2),
    (["compile", "model_only.dsv", "-o", "out"], 1), (["compile", "no_train.dsv", "-o", "out"], 1),
    (["compile", "tiny.dsv", "-o", "out", "--expert-load", "bad.json"], 1),
    (["compile", "tiny.dsv", "-o", "out", "--expert-load", "nosuch.json"], 2),
    (["compile", "micro_batches_huge.dsv", "-o", "out"], 1),
    # train: only what fails before a trainer starts
    (["train", "nosuch.dsv"], 1), (["train", "junk.dsv"], 1), (["train", "tiny.dsv", "--steps", "0"], 2),
    (["train", "tiny.dsv", "--steps", "-5"], 2), (["train", "model_only.dsv"], 2),
    (["train", "no_parallel.dsv"], 2), (["train", "layers_huge.dsv"], 1),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    shutil.copy(ROOT / "examples" / "tiny.dsv", root / "tiny.dsv")
    shutil.copytree(ROOT / "examples" / "clusters", root / "clusters")
    (root / "empty.dsv").write_bytes(b"")
    (root / "junk.dsv").write_bytes(bytes(range(256)) * 2)
    (root / "adir").mkdir()
    for name, text in {**SPECS, **LOADS, **HF}.items():
        (root / name).write_text(text)
    return root


def _listing(root: pathlib.Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("argv, code", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_wrong_input_gets_a_clear_answer(workdir, monkeypatch, argv, code):
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("DSVC_DEBUG", raising=False)
    monkeypatch.setenv("DSVC_CACHE", str(workdir / "cache"))
    before = _listing(workdir)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        got = main(list(argv))
    text = err.getvalue()
    assert "Traceback" not in text and "internal error" not in text, text
    assert got == code, text
    if code:
        assert text.strip(), "an error must say what went wrong"
        assert _listing(workdir) == before, "a failed command must not write files"
    shutil.rmtree(workdir / "out", ignore_errors=True)
    assert not os.path.exists(workdir / "adir.png")


def test_report_reads_the_canonical_expert_load_format(tmp_path):
    from dsvc import dsl
    from dsvc.compiler.report import expert_load_imbalance, moe_layer_indices

    spec = dsl.load(ROOT / "examples" / "tiny.dsv")
    hot = [5, 1, 1, 1, 1, 1, 1, 1]
    canonical, lists = tmp_path / "canonical.json", tmp_path / "lists.json"
    named = tmp_path / "named.json"
    first, *rest = moe_layer_indices(spec)
    canonical.write_text(json.dumps({"format": "dsvc-expert-load", "version": 1,
                                     "layers": {str(first): hot}, "default": [1] * 8}))
    lists.write_text(json.dumps([hot] + [[1] * 8] * len(rest)))
    # runtime parameter-name prefixes as keys
    named.write_text(json.dumps({f"layers.{first}.mlp": hot}))
    got = expert_load_imbalance(spec, str(canonical), 2)
    assert got == expert_load_imbalance(spec, str(lists), 2)
    assert got > 1.0  # the hot expert's rank carries more than the mean
    # only the hot layer listed: the others count as balanced, as a uniform default does
    assert expert_load_imbalance(spec, str(named), 2) == got


def test_huge_expert_loads_do_not_overflow(tmp_path):
    from dsvc import dsl
    from dsvc.compiler.report import expert_load_imbalance

    spec = dsl.load(ROOT / "examples" / "tiny.dsv")
    path = tmp_path / "huge.json"
    path.write_text(json.dumps([1e308] * 8))
    assert expert_load_imbalance(spec, str(path), 2) == 1.0  # uniform, however large
