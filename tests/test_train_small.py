"""Compiled trainers of the small test specs (tests/train_specs/), on one process.

- the generated Triton kernels in the loop: two steps with `--backend triton`
  under TRITON_INTERPRET=1 call the build's own kernel module (registered with
  `runtime.fp8.use_kernels`) and give the torch emulation's losses within the
  FP8 tolerance;
- a build directory is self-contained: copied elsewhere, it trains with dsvc,
  lark, pydantic, jinja2, networkx, sympy and matplotlib made unimportable.
"""

from __future__ import annotations

import functools
import math
import shutil
import subprocess
import sys

import pytest

from dsvc.runtime import fp8, fp8_triton, fused_torch
from dsvc.runtime.fused_torch import FUSED_PROTOCOL
from tests.test_train_support import SPECS, child_env, compile_spec, losses, train_here
from tests.tolerances import tol


@pytest.fixture(scope="module")
def kernels1_build(tmp_path_factory):
    return compile_spec(SPECS / "kernels1.dsv", tmp_path_factory.mktemp("k1") / "build")


@pytest.fixture(scope="module")
def w1_build(tmp_path_factory):
    return compile_spec(SPECS / "w1.dsv", tmp_path_factory.mktemp("w1") / "build")


def test_generated_triton_kernels_match_torch_emulation(kernels1_build, tmp_path, monkeypatch):
    kernel_file = kernels1_build / "kernels" / "fp8_kernels.py"
    module = fp8.load_kernel_module(kernel_file)  # the instance use_kernels will register
    calls: dict[str, int] = {}

    def counted(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    for name in (*fp8_triton.PROTOCOL, *FUSED_PROTOCOL):
        if hasattr(module, name):  # a build carries the kernels of its graph's groups only
            monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    registered = []
    monkeypatch.setattr(fp8_triton, "_registered", None)  # restored after the test
    real_use = fp8.use_kernels
    monkeypatch.setattr(fp8, "use_kernels", lambda m: (registered.append(m), real_use(m)))

    assert (
        train_here(
            kernels1_build,
            "--run-dir",
            str(tmp_path / "triton"),
            "--steps",
            "2",
            "--backend",
            "triton",
        )
        == 0
    )
    assert [str(p) for p in registered] == [str(kernel_file)]
    assert fp8_triton._registered is module
    # forward, dgrad and wgrad GEMMs of the dense and the routed-expert linears all ran here,
    # and every fused kernel of the block's groups (the generated program runs the block)
    for name in (
        "quantize_weight",
        "gemm",
        "grouped_gemm",
        "grouped_gemm_wgrad",
        "swiglu_quant",
        *(n for n in FUSED_PROTOCOL if not n.startswith("gqa")),
    ):
        assert calls.get(name, 0) > 0, f"{name} was never called: {calls}"

    calls.clear()
    assert (
        train_here(
            kernels1_build,
            "--run-dir",
            str(tmp_path / "torch"),
            "--steps",
            "2",
            "--backend",
            "torch",
        )
        == 0
    )
    assert calls == {}  # the emulation does not touch the kernels
    with_kernels, emulated = losses(tmp_path / "triton"), losses(tmp_path / "torch")
    rtol, atol = tol("fp8_triton_vs_torch_loss")
    assert sorted(with_kernels) == sorted(emulated) == [1, 2]
    for step in (1, 2):
        assert math.isclose(with_kernels[step], emulated[step], rel_tol=rtol, abs_tol=atol), (
            step,
            with_kernels[step],
            emulated[step],
        )


def _record_tiles(monkeypatch, namespace, seen: dict[str, set]):
    """Wrap every protocol function of `namespace` to record the tile (or weight block)
    each call received, by function name."""
    import inspect

    for name in (*fp8_triton.PROTOCOL, *FUSED_PROTOCOL):
        fn = getattr(namespace, name, None)
        if fn is None or not {"tile", "block"} & set(inspect.signature(fn).parameters):
            continue  # a kernel the build leaves out, or a fused op without tiles
        sig = inspect.signature(fn)

        def wrapper(*args, _fn=fn, _sig=sig, _name=name, **kwargs):
            bound = _sig.bind(*args, **kwargs)
            bound.apply_defaults()
            seen.setdefault(_name, set()).add(bound.arguments.get("tile", bound.arguments.get("block")))
            return _fn(*args, **kwargs)

        monkeypatch.setattr(namespace, name, wrapper)


def test_the_plans_tile_reaches_every_quantisation_and_gemm(tmp_path, monkeypatch):
    """tile(1, 64) / block(64, 64) / promote_every 64: plan.json, the generated kernels and
    every FP8 call of a 3-step run, torch emulation and generated Triton kernels alike,
    use 64, and the two backends agree."""
    import json

    build = compile_spec(SPECS / "kernels64.dsv", tmp_path / "build")
    linear = json.loads((build / "plan.json").read_text())["precision"]["linear"]
    assert (linear["act_tile"], linear["weight_block"]) == (64, [64, 64])
    module = fp8.load_kernel_module(build / "kernels" / "fp8_kernels.py")
    assert (module.TILE, module.WBLOCK_N, module.PROMOTE_EVERY) == (64, 64, 64)
    monkeypatch.setattr(fp8_triton, "_registered", None)  # restored after the test
    seen = {"triton": {}, "torch": {}}
    _record_tiles(monkeypatch, module, seen["triton"])
    _record_tiles(monkeypatch, fp8.resolve_backend("torch"), seen["torch"])
    _record_tiles(monkeypatch, fused_torch, seen["torch"])
    for backend in ("triton", "torch"):
        run = ["--run-dir", str(tmp_path / backend), "--steps", "3", "--backend", backend]
        assert train_here(build, *run) == 0
    # the generated program's block: its fused ops and GEMMs; the eager MTP projection: the
    # plain quantisers
    used = {"quantize_act_both", "quantize_weight", "gemm", "grouped_gemm",
            "grouped_gemm_wgrad", "swiglu_quant", "rmsnorm_quant", "rmsnorm_bwd",
            "mla_rope_qkv_bwd", "quantize_bhsd", "swiglu_bwd_quant", "quantize_grouped"}
    for backend, calls in seen.items():
        assert used <= set(calls), (backend, sorted(calls))
        assert all(tiles == {64} for tiles in calls.values()), (backend, calls)
    with_kernels, emulated = losses(tmp_path / "triton"), losses(tmp_path / "torch")
    rtol, atol = tol("fp8_triton_vs_torch_loss_3_steps")
    assert sorted(with_kernels) == sorted(emulated) == [1, 2, 3]
    for step in (1, 2, 3):
        assert math.isclose(with_kernels[step], emulated[step], rel_tol=rtol, abs_tol=atol), (
            step, with_kernels[step], emulated[step])  # fmt: skip


# Never needed by a build. torch itself imports sympy, networkx and jinja2 (they are its own
# dependencies, present wherever torch is), so those three are refused only to code outside
# torch and triton: the build's train.py, kernels and runtime copy.
BLOCKED = ("dsvc", "dsl", "compiler", "runtime", "lark", "pydantic", "matplotlib")
BLOCKED_OUTSIDE_TORCH = ("jinja2", "networkx", "sympy")

WRAPPER = """
import importlib.abc, importlib.util, os, runpy, sys

BLOCKED = {blocked!r}
BLOCKED_OUTSIDE_TORCH = {outside!r}
TORCH_DIRS = tuple(os.path.dirname(importlib.util.find_spec(p).origin) + os.sep
                   for p in ("torch", "triton"))


def importer():
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        # a package's own submodules come after its top level, which is what gets checked
        if top in BLOCKED or (name in BLOCKED_OUTSIDE_TORCH
                              and not importer().startswith(TORCH_DIRS)):
            raise ModuleNotFoundError(f"{{name}} is blocked (imported by {{importer()}})")
        return None


sys.meta_path.insert(0, Blocker())
build = sys.argv[1]
sys.argv = [os.path.join(build, "train.py")] + sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    import dsvc_runtime
    assert os.path.dirname(dsvc_runtime.__file__) == os.path.join(build, "dsvc_runtime")
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
"""


@pytest.mark.slow
def test_build_directory_runs_without_dsvc_and_compile_time_packages(w1_build, tmp_path):
    elsewhere = tmp_path / "copied" / "trainer"
    shutil.copytree(w1_build, elsewhere)
    wrapper = tmp_path / "run_blocked.py"
    wrapper.write_text(WRAPPER.format(blocked=BLOCKED, outside=BLOCKED_OUTSIDE_TORCH))
    proc = subprocess.run(  # noqa: PLW1510 - the exit code is asserted
        [sys.executable, str(wrapper), str(elsewhere), "--run-dir", "run", "--steps", "3"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    assert "done: 3 steps" in proc.stderr


def _bench_module():
    from tests.bench_scripts import load_bench

    return load_bench("trainer_gpu")


def test_gpu_bench_flops_agree_with_the_report(tmp_path):
    import json

    from dsvc import dsl
    from dsvc.compiler.driver import build_report

    bench = _bench_module()
    spec = dsl.load(str(bench.SPEC))
    raw = json.loads((compile_spec(bench.SPEC, tmp_path / "b") / "plan.json").read_text())
    params = build_report(spec).value("model.params_total")
    assert 0.9e9 < params < 1.3e9  # "about 1B parameters"
    raw["model"]["mtp"]["depth"] = 0  # the report counts the MTP module apart
    assert bench.flops_per_token(raw) == build_report(spec).value("model.train_flops_per_token")


def test_gpu_bench_without_cuda_says_so():
    import torch

    from tests.test_train_support import ROOT

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the bench would run")
    proc = subprocess.run(  # noqa: PLW1510 - the exit code is the test
        [sys.executable, str(ROOT / "bench" / "trainer_gpu.py")],
        capture_output=True, text=True, timeout=120, env=child_env(),
    )  # fmt: skip
    assert proc.returncode == 0 and "no CUDA device here" in proc.stdout
