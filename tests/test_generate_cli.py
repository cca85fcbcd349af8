"""`dsvc tokenize` and `dsvc generate` from the command line, end to end on one process.

Text -> `dsvc tokenize` (an HF tokenizer.json made here with the `tokenizers` package,
and the byte-level tokenizer) -> a token file that `train { data = tokens(...) }`
reads -> a short training run of the small spec (tests/train_specs/w1.dsv) ->
`dsvc generate` from its run directory and from its checkpoint, with text (the
tokenizer the token file recorded) and with ids, plain and with MTP drafting, and
from an HF export of it and from transformers' own tiny DeepseekV3 checkpoint
(`--hf`). Bad input: one line, exit 1 (2 for usage), nothing written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dsvc.compiler.cli import main
from tests.test_train_support import SPECS, compile_spec, train_here

TEXTS = ["the cat sat on the mat and the dog ran to the park",
         "a dog ran to the park where the sun is up",
         "the sun is up and the cat is on the mat"] * 4  # fmt: skip


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A BPE tokenizer.json of fewer than 256 ids (the small model's vocabulary), eos </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=120,
                                                           special_tokens=["<unk>", "</s>"]))
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(TEXTS):
        (d / f"doc{i:02d}.txt").write_text(text + "\n")
    (d / "skip.bin").write_bytes(b"\xff\xfe not text")  # not UTF-8: skipped
    return d


@pytest.fixture(scope="module")
def run(tok_dir, corpus, tmp_path_factory):
    """w1 (the small spec on one process) trained 3 steps on the tokenised corpus."""
    root = tmp_path_factory.mktemp("gen")
    data = root / "data.bin"
    assert main(["tokenize", str(corpus), "-o", str(data), "--tokenizer", str(tok_dir),
                 "--glob", "*.txt"]) == 0
    build = compile_spec(SPECS / "w1.dsv", root / "build")
    assert train_here(build, "--run-dir", str(root / "run"), "--steps", "3", "--data",
                      str(data), "--data-dtype", "uint16", "--fp32", "--checkpoint-every", "3") == 0
    return root / "run"


def test_tokenize_bytes_writes_tokens_and_a_record(corpus, tmp_path, capsys):
    out = tmp_path / "b.bin"
    code, _, err = _run(capsys, "tokenize", corpus / "doc00.txt", corpus / "doc01.txt",
                        "-o", out, "--tokenizer", "bytes")
    assert code == 0 and "2 document(s)" in err
    ids = np.fromfile(out, dtype=np.uint16).tolist()
    want = list((TEXTS[0] + "\n").encode()) + [256] + list((TEXTS[1] + "\n").encode()) + [256]
    assert ids == want
    record = json.loads((tmp_path / "b.bin.json").read_text())
    assert record["tokenizer"] == {"kind": "bytes", "eos": 256} and record["tokens"] == len(want)


def test_tokenize_hf_skips_what_is_not_text(corpus, tok_dir, tmp_path, capsys):
    from tokenizers import Tokenizer

    out = tmp_path / "h.bin"
    code, _, err = _run(capsys, "tokenize", corpus, "-o", out, "--tokenizer", tok_dir)
    assert code == 0 and "skipped 1 file" in err
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    want = []
    for text in TEXTS:  # sorted file order: doc00 .. doc11
        want += tok.encode(text + "\n").ids + [tok.token_to_id("</s>")]
    assert np.fromfile(out, dtype=np.uint16).tolist() == want


def test_tokenize_errors_are_one_line(tmp_path, capsys):
    code, _, err = _run(capsys, "tokenize", tmp_path / "nope", "-o", tmp_path / "x.bin",
                        "--tokenizer", "bytes")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "tokenize", tmp_path, "-o", tmp_path / "x.bin",
                        "--tokenizer", tmp_path)
    assert code == 1 and "no tokenizer.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.bin").exists()


def test_generate_text_from_the_run_and_its_checkpoint(run, tok_dir, tmp_path, capsys):
    from tokenizers import Tokenizer

    prompt = "the cat sat on"
    jsonl = tmp_path / "out.jsonl"
    code, out, err = _run(capsys, "generate", run, "--prompt", prompt, "--max-new-tokens", 8,
                          "--jsonl", jsonl)
    assert code == 0, err
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    ids = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(prompt).ids
    assert rows[0]["prompt_ids"] == ids and rows[0]["text"] == out.splitlines()[0]
    assert 1 <= len(rows[0]["ids"]) <= 8 and "tokens/s" in err and "KV cache" in err
    summary = rows[-1]["summary"]
    # the small model, trained (so decoded) in fp32: 2 MLA layers of 128 latent + 16 rope
    # values of 4 B per token; no MTP cache without drafting
    assert summary["kv_cache_bytes_per_token"] == 2 * (128 + 16) * 4
    assert summary["kv_cache_bytes_per_token_mtp"] == 0
    # the same ids from the checkpoint itself, given as ids, drafting with MTP
    step = sorted((run / "checkpoints").iterdir())[-1]
    code, out2, err2 = _run(capsys, "generate", step, "--ids", ",".join(map(str, ids)),
                            "--max-new-tokens", 8, "--mtp", "--jsonl", "-")
    assert code == 0, err2
    again = [json.loads(line) for line in out2.splitlines()]
    assert again[0]["ids"] == rows[0]["ids"] and "acceptance" in err2
    assert again[-1]["summary"]["drafted"][0] >= 1
    assert again[-1]["summary"]["kv_cache_bytes_per_token_mtp"] == (128 + 16) * 4


def test_generate_errors_are_one_line_and_exit_1(run, tmp_path, capsys):
    from tests.conftest import EXAMPLES

    def one_line(code, err, want):
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and want in lines[0], err

    # a checkpoint from another spec
    one_line(*_run(capsys, "generate", run, "--spec", EXAMPLES / "tiny.dsv", "--ids", "1 2")[::2],
             "different model")
    # a prompt longer than the context (the small model: 64 positions)
    one_line(*_run(capsys, "generate", run, "--ids", " ".join(["5"] * 70))[::2],
             "longer than the model's context")
    one_line(*_run(capsys, "generate", run, "--ids", " ".join(["5"] * 60),
                   "--max-new-tokens", 10)[::2], "at most 4 new tokens")
    # a text prompt where no tokenizer is known: an HF export carries none
    export = tmp_path / "hf"
    from dsvc.runtime import checkpoint as ckpt
    from dsvc.runtime.hf import export_hf_checkpoint
    from dsvc.runtime.trained import (
        build_serving_model,
        find_checkpoint,
        load_checkpoint_weights,
        serving_plan,
    )

    path = find_checkpoint(str(run))
    meta = ckpt.read_meta(path)
    plan = serving_plan(meta["plan"]["model"], meta["plan"]["precision"])
    model = build_serving_model(plan)
    load_checkpoint_weights(path, model, plan, meta)
    export_hf_checkpoint(model, plan, export, dtype="fp32")
    capsys.readouterr()
    one_line(*_run(capsys, "generate", "--hf", export, "--prompt", "the cat")[::2],
             "needs a tokenizer")
    # ... and the export decodes as the run does
    code, out, _ = _run(capsys, "generate", "--hf", export, "--ids", "3 4 5", "--precision",
                        "fp32", "--max-new-tokens", 6)
    code2, out2, _ = _run(capsys, "generate", run, "--ids", "3 4 5", "--max-new-tokens", 6)
    assert code == code2 == 0 and out == out2
    # no checkpoint there; an id outside the vocabulary
    one_line(*_run(capsys, "generate", tmp_path, "--ids", "1")[::2], "no complete checkpoint")
    one_line(*_run(capsys, "generate", run, "--ids", "999")[::2], "outside the model's vocab")
    # usage errors: exit 2
    code, _, err = _run(capsys, "generate", "--ids", "1")
    assert code == 2 and "one of them" in err
    code, _, err = _run(capsys, "generate", run)
    assert code == 2 and "--prompt" in err


def test_generate_from_a_checkpoint_transformers_wrote(tmp_path_factory, tmp_path, capsys):
    """`--hf` on weights transformers saved (tests/runtime/_hf_case.py): the model comes
    through `dsvc import-hf`'s reading of config.json and decodes as the runtime does with
    the test's own plan. The config is the one `hf_config_from_plan` writes (transformers
    built the model from it): transformers 5's own `save_pretrained` config keeps RoPE under
    `rope_parameters` only, which import-hf reads once the fresh-machine issue lands."""
    from dsvc.runtime.decode import Decoder
    from dsvc.runtime.generate import GenerationConfig, generate
    from dsvc.runtime.hf import hf_config_from_plan
    from tests.runtime._hf_case import get_case

    case = get_case(tmp_path_factory, "yarn")
    hf = shutil.copytree(case.dir, tmp_path / "hf")
    (hf / "config.json").write_text(json.dumps(hf_config_from_plan(case.plan, "float32")))
    prompt = case.tokens[0, :10].tolist()
    code, out, err = _run(capsys, "generate", "--hf", hf, "--ids", " ".join(map(str, prompt)),
                          "--max-new-tokens", 6)
    assert code == 0, err
    rt, _ = case.load()
    want = generate(Decoder.allocate(rt, 1, 64, mtp=False), [prompt],
                    GenerationConfig(max_new_tokens=6)).tokens[0]
    assert out.split() == [str(t) for t in want]
