"""A user's-eye sweep of every `dsvc` command: wrong input ends in exit 0/1/2 and a clear message.

Each case of the sweep runs `compiler.cli.main` in-process in a scratch directory
holding the files below (a copy of examples/tiny.dsv and variants of it, bad JSON,
a directory). A case fails if the exit code differs, if stderr shows a traceback
or the "internal error" fallback (exit 3), or if an error wrote a file. `train`
is swept only up to the errors raised before training starts.

The second half (issue 19) runs `dsvc` as a real process with a timeout, once per
failure class that used to hang, exhaust memory, print a traceback or lose a file:
a FIFO or /dev/zero given as a spec or reached through `include`, unbounded counts
and numbers, output to a full device or a closed pipe, output paths under a file
or /proc, a run directory under a file. Each asserts the exit code, a message of
one line (one diagnostic for a spec), no traceback, bounded time, and that nothing
on disk changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

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


# ----------------------------------------------------------------------------- real processes

DSVC = [sys.executable, "-m", "dsvc"]
BOUND_S = 60  # every case finishes in seconds; a hang or a memory blow-up does not


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A scratch directory with the hostile inputs, made by the test (FIFOs, /dev/zero links)."""
    root = tmp_path_factory.mktemp("hostile")
    shutil.copy(ROOT / "examples" / "tiny.dsv", root / "tiny.dsv")
    shutil.copytree(ROOT / "examples" / "clusters", root / "clusters")
    os.mkfifo(root / "pipe.dsv")
    os.mkfifo(root / "pipe.json")
    (root / "zero.dsv").symlink_to("/dev/zero")
    (root / "zero.json").symlink_to("/dev/zero")
    (root / "afile").write_text("a file, not a directory\n")
    include = 'include "clusters/cpu4.dsv"'
    (root / "inc_pipe.dsv").write_text(TINY.replace(include, include + '\ninclude "pipe.dsv"'))
    (root / "inc_zero.dsv").write_text(TINY.replace(include, include + '\ninclude "zero.dsv"'))
    (root / "long_number.dsv").write_text(TINY.replace("vocab = 512", "vocab = " + "9" * 5000))
    (root / "infinities.dsv").write_text(
        TINY.replace("eps = 1e-6", "eps = 1e400").replace("lr = 3e-3", "lr = 1e400"))
    (root / "clusters" / "inf_hbm.dsv").write_text(
        (ROOT / "examples" / "clusters" / "cpu4.dsv").read_text()
        .replace("hbm = 20 GB/s", "hbm = 1e400 GB/s"))
    (root / "inf_hbm.dsv").write_text(TINY.replace("cpu4.dsv", "inf_hbm.dsv"))
    (root / "layers_range.dsv").write_text(
        TINY.replace("1..3 = block(mla, moe)", "1..100001 = block(mla, moe)"))
    lines = "\n".join(f"    {i} = block(mla, moe)" for i in range(1, 20_001))
    (root / "layers_lines.dsv").write_text(TINY.replace("    1..3 = block(mla, moe)", lines))
    (root / "chunks.dsv").write_text(  # pipeline 2 x 100,000 micro-batches
        TINY.replace("global_batch = 8", "global_batch = 200000"))
    (root / "cr_only.dsv").write_bytes(TINY.replace("\n", "\r").encode())
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "long_int.json").write_text("[" + "9" * 5000 + "]")
    return root


def _state(root: pathlib.Path) -> dict:
    """Every entry under `root` (lstat: links and FIFOs are not followed), with its size and
    modification time: a command that fails must leave this unchanged."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _dsvc(root, *argv, stdout=subprocess.PIPE, env=None):
    start = time.monotonic()
    proc = subprocess.run(DSVC + list(argv), cwd=root, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=BOUND_S, env=env, stdin=subprocess.DEVNULL,
                          check=False)
    took = time.monotonic() - start
    assert took < BOUND_S
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    return proc


# (argv, exit code, what the one error says). A spec error is one diagnostic: its line,
# the source line and caret, a hint, and the count.
HOSTILE = [
    (["check", "pipe.dsv"], 1, "is a FIFO (named pipe); dsvc reads regular files only"),
    (["fmt", "pipe.dsv"], 1, "is a FIFO"),
    (["check", "inc_pipe.dsv"], 1, "cannot read 'pipe.dsv': is a FIFO"),
    (["check", "zero.dsv"], 1, "is a device; dsvc reads regular files only"),
    (["report", "inc_zero.dsv"], 1, "cannot read 'zero.dsv': is a device"),
    (["check", "long_number.dsv"], 1, "integer of 5000 digits is too large"),
    (["check", "infinities.dsv"], 1, "not a finite real number"),
    (["check", "inf_hbm.dsv"], 1, "not a finite real number"),
    (["check", "layers_range.dsv"], 1, "layer 100001 is past the limit of 256 layers"),
    (["report", "layers_lines.dsv"], 1, "layer 256 is past the limit of 256 layers"),
    (["report", "chunks.dsv"], 1, "200,000 schedule chunks, past the limit of 8,192"),
    (["report", "tiny.dsv", "--expert-load", "zero.json"], 2,
     "--expert-load zero.json: is a device; dsvc reads regular files only"),
    (["report", "tiny.dsv", "--expert-load", "pipe.json"], 2, "is a FIFO"),
    (["report", "tiny.dsv", "--expert-load", "deep.json"], 1, "JSON nested 100000 deep"),
    (["inspect", "tiny.dsv", "--expert-load", "long_int.json"], 1,
     "a JSON integer of 5000 digits"),
    (["schedule", "--kind", "1f1b", "--stages", "4", "--micro-batches", "8", "--f",
      "1e999999999"], 2, "is out of range"),
    (["schedule", "--kind", "1f1b", "--stages", "100000", "--micro-batches", "4"], 2,
     "more than the 8,192 schedule chunks"),
    (["compile", "tiny.dsv", "-o", "afile/build"], 2, "afile' is a file, not a directory"),
    (["compile", "tiny.dsv", "-o", "/proc/dsvc-build"], 2, "cannot write /proc/dsvc-build: cannot "
     "create files in '/proc'"),
    (["inspect", "tiny.dsv", "-o", "afile/graph.txt"], 2, "cannot write afile/graph.txt"),
    (["schedule", "--kind", "1f1b", "--stages", "2", "--micro-batches", "2", "-o",
      "/proc/schedule.txt"], 2, "cannot write /proc/schedule.txt"),
    (["train", "tiny.dsv", "--run-dir", "afile/run"], 2, "afile' is a file, not a directory"),
]


@pytest.mark.parametrize("argv, code, says", HOSTILE, ids=[" ".join(a)[:60] for a, _, _ in HOSTILE])
def test_hostile_input_in_a_real_process(hostile, argv, code, says):
    before = _state(hostile)
    env = dict(os.environ, DSVC_CACHE=str(hostile / "cache"))  # train: nothing compiled
    env.pop("DSVC_DEBUG", None)
    proc = _dsvc(hostile, *argv, env=env)
    assert proc.returncode == code, proc.stderr
    assert says in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    if code == 2 or argv[0] == "train":  # one line, perhaps with a hint below it
        lines = proc.stderr.strip().splitlines()
        if lines[0].startswith("usage:"):  # argparse puts its usage above its own line
            lines = lines[lines.index(errors[0]):]
        assert lines[:1] == errors and all(x.startswith("  hint:") for x in lines[1:]), lines
    else:  # spec diagnostics: one per problem, the first is the one asked about
        assert says in errors[0] or says in proc.stderr.split("\n\n")[0], proc.stderr
    assert _state(hostile) == before, "a failed command changed files"


def test_cr_only_line_endings_read_as_lines(hostile):
    proc = _dsvc(hostile, "check", "cr_only.dsv")
    assert proc.returncode == 0, proc.stderr
    assert "cr_only.dsv: ok (model tiny: 4 layers)" in proc.stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("argv", [["check", "tiny.dsv"], ["report", "tiny.dsv"],
                                  ["schedule", "--kind", "zb1p", "--stages", "4",
                                   "--micro-batches", "8", "--format", "json"]])
def test_a_full_device_on_stdout_is_one_line(hostile, argv):
    before = _state(hostile)
    with open("/dev/full", "w") as full:
        proc = _dsvc(hostile, *argv, stdout=full)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"dsvc {argv[0]}: error: cannot write standard output: No space left on device"]
    assert _state(hostile) == before


def test_a_closed_pipe_ends_quietly(hostile):
    # megabytes of JSON, far more than a pipe holds: dsvc is still writing when the reader goes
    argv = ["schedule", "--kind", "zb1p", "--stages", "16", "--micro-batches", "64",
            "--format", "json"]
    proc = subprocess.Popen(DSVC + argv, cwd=hostile, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout.readline().startswith(b"{")  # what `| head -1` reads
    proc.stdout.close()
    try:
        code = proc.wait(timeout=BOUND_S)
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert code == 0 and err == "", err
