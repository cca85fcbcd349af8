"""The fusion and memory benches' own machinery, on a CPU.

bench/fusion_cpu.py counts launches and bytes from the run: its Triton launch hook must
see one launch per kernel call and tell written tensors from read ones, and the whole
bench on the tiny example must find the fused program's launches at most half and
bytes per token at least 30% lower (the issue's bar, on a layer a test can afford).
bench/memory_gpu.py's replay of an allocator trace is checked on a trace written here.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json

from tests.bench_scripts import load_bench
from tests.conftest import EXAMPLES


def test_launch_hook_counts_each_kernel_and_what_it_writes(tmp_path):
    from dsvc.compiler.codegen.kernels import generic_config, render_kernels
    from dsvc.runtime import fp8

    bench = load_bench("fusion_cpu")
    path = tmp_path / "fp8_kernels.py"
    path.write_text(render_kernels(generic_config()))
    kernels = fp8.load_kernel_module(path)
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    tally = bench.Tally()
    counter = bench.OpCounter(tally)
    with bench.triton_launch_hook(tally, counter), counter:
        q, s = kernels.quantize_act(x, 128)
        y = x.float() * 2.0  # one torch op: one launch, x read and y written
    triton = {n: c for n, c in tally.launches.items() if n.startswith("triton.")}
    assert triton == {"triton._quant_act_kernel": 1}, tally.launches
    name = "triton._quant_act_kernel"
    assert tally.read[name] == x.numel() * 2  # the input, unchanged by the launch
    assert tally.written[name] == q.numel() + s.numel() * 4  # fp8 values and fp32 scales
    assert tally.launches["torch.mul"] == 1
    assert tally.written["torch.mul"] == y.numel() * 4
    assert "torch.view" not in tally.launches  # views launch nothing


def test_fusion_bench_halves_launches_on_the_tiny_example(tmp_path):
    bench = load_bench("fusion_cpu")
    out = tmp_path / "fusion.json"
    rc = bench.main(["--spec", str(EXAMPLES / "tiny.dsv"), "--tokens", "8", "--json", str(out)])
    res = json.loads(out.read_text())
    before, after = res["runs"]["before (eager)"], res["runs"]["after (program)"]
    assert res["launch_ratio"] == after["launches"] / before["launches"] <= 0.5, res
    assert 0 < res["byte_ratio"] <= 0.7, res
    for run in (before, after):  # T and 2T ran the same kernels (each quantises its weights)
        assert run["launches_2t"] == run["launches"] and run["bytes_per_token"] > 0, res
    assert rc == 0
    # the core is counted apart, as two fused kernels per run
    assert before["core"]["launches"] == after["core"]["launches"] == 2


def test_memory_replay_finds_the_peak_and_its_categories():
    bench = load_bench("memory_gpu")

    def frames(*names, file="model.py"):
        return [{"name": n, "filename": f"/x/{file}", "line": i} for i, n in enumerate(names)]

    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames("init_parameters")},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frames("step", file="optim.py")},
        {"action": "alloc", "addr": 3, "size": 30, "frames": frames("forward", "step")},
        {"action": "alloc", "addr": 4, "size": 20, "frames": frames("forward")},
        {"action": "free_completed", "addr": 4},
        {"action": "alloc", "addr": 5, "size": 40, "frames": frames("backward_input")},
        {"action": "free_completed", "addr": 3},
        {"action": "free_completed", "addr": 5},
        {"action": "alloc", "addr": 6, "size": 10, "frames": []},
    ]
    res = bench.peak_by_category({"device_traces": [trace]})
    assert res["peak"] == 220  # 100 + 50 + 30 + 40, before the activation is freed
    cats = res["categories"]
    assert cats["parameters and buffers"] == 100 and cats["optimizer states"] == 50
    assert cats["activations"] == 30 and cats["backward"] == 40 and cats["other"] == 0
    assert res["activation_sites"] == [("model.py:0 forward", 30)]
