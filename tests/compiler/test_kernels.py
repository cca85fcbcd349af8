"""Rendering of the FP8 kernel module: golden output, determinism, formatting, config checks."""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys

import jinja2
import pytest

from dsvc.compiler.codegen import render
from dsvc.compiler.codegen.kernels import (
    FUSED_KINDS,
    GemmShape,
    KernelConfig,
    check_kernel_config,
    gpu_autotune_configs,
    pick_tile_config,
    render_kernels,
)
from tests.golden import check_golden

ROOT = pathlib.Path(__file__).resolve().parents[2]

# the GEMMs of a tiny MLA-free model: hidden 256, FFN 512 (what examples/tiny.dsv lowers to)
TINY = KernelConfig(
    gemms=(
        GemmShape("layers.attn.wq", 256, 256),
        GemmShape("layers.attn.wo", 256, 256),
        GemmShape("layers.ffn.w1", 512, 256),
        GemmShape("layers.ffn.w3", 512, 256),
        GemmShape("layers.ffn.w2", 256, 512),
    ),
    title="tiny",
    spec_file="examples/tiny.dsv",
    span=(1, 40),
    passes=("parse", "elaborate", "lower", "assign_precision"),
)


def test_tiny_kernels_match_golden():
    check_golden("kernels/tiny_fp8_kernels.py.txt", render_kernels(TINY))


def test_rendering_is_deterministic_and_order_independent():
    first = render_kernels(TINY)
    assert render_kernels(TINY) == first
    shuffled = dataclasses.replace(TINY, gemms=tuple(reversed(TINY.gemms)))
    assert render_kernels(shuffled) == first


@pytest.mark.parametrize("scale_format,fused", [("fp32", ()), ("ue8m0", ()),
                                                 ("fp32", FUSED_KINDS), ("fp32", ("router_topk",)),
                                                 ("fp32", ("moe_combine", "gqa_rope"))])
def test_generated_code_parses_and_is_formatted(tmp_path, scale_format, fused):
    text = render_kernels(dataclasses.replace(TINY, scale_format=scale_format, fused=fused))
    tree = ast.parse(text)
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"quantize_act", "gemm", "grouped_gemm", "swiglu_quant"} <= defined
    assert f"DEFAULT_UE8M0 = {scale_format == 'ue8m0'}" in text
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).with_name("ruff"))
    path = tmp_path / "fp8_kernels.py"
    path.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [ruff, "format", "--check", "--config", str(ROOT / "pyproject.toml"), str(path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_module_carries_the_kernels_of_its_graphs_fusion_groups_only():
    """One kernel (forward and backward) per kind of fusion group the spec's graph has."""
    def defs(kinds):
        tree = ast.parse(render_kernels(dataclasses.replace(TINY, fused=kinds)))
        return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}

    plain, routing = defs(()), defs(("router_topk",))
    assert not any(name.startswith("_router") or name == "rmsnorm_quant" for name in plain)
    assert {"_router_topk_kernel", "_router_bwd_kernel", "router_topk", "router_bwd"} <= routing
    assert "_rmsnorm_quant_kernel" not in routing and "rmsnorm_quant" not in routing
    everything = defs(FUSED_KINDS)
    from dsvc.runtime.fused_torch import FUSED_PROTOCOL

    assert set(FUSED_PROTOCOL) <= everything
    with pytest.raises(ValueError, match="fused kinds"):
        render_kernels(dataclasses.replace(TINY, fused=("nonsense",)))


def test_gemm_table_has_forward_and_dgrad_shapes_with_their_configs():
    text = render_kernels(TINY)
    for key in ("(256, 256)", "(512, 256)", "(256, 512)"):
        assert f"    {key}: {{" in text
    # (512, 256) is w1/w3 forward and w2 dgrad, merged into one row with all names
    assert "# layers.ffn.w1 forward, layers.ffn.w2 dgrad, layers.ffn.w3 forward" in text
    assert text.count("    (256, 256): {") == 1


def test_provenance_header_is_on_top_and_hashes_the_body():
    text = render_kernels(TINY)
    header, body = render.split_generated(text)
    assert header.splitlines() == [
        "# generated: do not edit",
        "# source: examples/tiny.dsv lines 1-40",
        "# passes: parse, elaborate, lower, assign_precision",
        "# tile config: act=1x128, weight=128x128, promote_every=128, scales=fp32, gemms=5",
        f"# dsvc version: {__import__('dsvc').__version__}",
        f"# content hash: sha256:{render.content_hash(body)}",
    ]
    assert body.startswith('"""FP8 kernels for tiny')


def test_user_strings_cannot_break_out_of_comments():
    header = render.provenance_header("evil\nimport os", None, ["a\rb"], {"x": "1\n2"}, "0" * 16)
    assert all(line.startswith("# ") for line in header.splitlines())
    assert "evil\\nimport os" in header
    assert render.pyrepr({"a": [1, 2.5, None, ("x",)]}) == '{"a": [1, 2.5, None, ("x",)]}'
    with pytest.raises(TypeError, match="not a plain literal"):
        render.pyrepr(object())


def test_environment_is_strict():
    env = render.environment()
    assert env.undefined is jinja2.StrictUndefined and env.keep_trailing_newline
    with pytest.raises(jinja2.UndefinedError):
        render.render_template("fp8_kernels.py.jinja")


def test_bad_configs_report_every_problem_at_once():
    bad = KernelConfig(
        act_tile=96,
        promote_every=64,
        scale_format="e8m0",
        out_dtype="fp8",
        title='x"""; import os',
        gemms=(GemmShape("w q", 10, 0), GemmShape("w q", 10, 10)),
    )
    with pytest.raises(ValueError) as info:
        check_kernel_config(bad)
    message = str(info.value)
    for fragment in (
        "act_tile 96 must be a power of two",
        "must be equal",
        "scale_format 'e8m0'",
        "out_dtype 'fp8'",
        "title",
        "'w q' is not a dotted identifier",
        "'w q' appears twice",
        "positive integer sizes",
    ):
        assert fragment in message
    with pytest.raises(ValueError):
        render_kernels(bad)


def test_tile_configs_keep_one_scale_per_k_step_and_one_weight_block_per_tile():
    configs = [pick_tile_config(g, dev) for g in TINY.gemms for dev in ("cpu", "cuda")]
    configs += [pick_tile_config(GemmShape("small", 40, 7168), "cuda"), *gpu_autotune_configs()]
    for cfg in configs:
        assert cfg.block_k == 128 and 128 % cfg.block_n == 0
    assert pick_tile_config(GemmShape("small", 40, 7168), "cpu").block_n == 64


def test_no_kernel_module_is_checked_in():
    """What a build generates runs from the build; the runtime ships no rendering of it."""
    rendered = [p for p in (ROOT / "runtime").glob("*.py")
                if "@triton.jit" in p.read_text(encoding="utf-8")]
    assert rendered == []


def test_numeric_constants_agree_with_the_runtime_reference():
    from dsvc.compiler.codegen import kernels
    from dsvc.runtime import fp8_torch

    assert kernels.AMAX_FLOOR == fp8_torch.AMAX_FLOOR and kernels.FP8_MAX == fp8_torch.FP8_MAX


def test_codegen_modules_do_not_import_torch():
    code = "import sys, dsvc.compiler.codegen.kernels; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT
    )
    assert done.stdout.strip() == "False", done.stderr


def test_gpu_bench_exits_cleanly_without_cuda():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels_gpu.py")],
        check=False,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    import torch

    assert done.returncode == 0, done.stderr
    if not torch.cuda.is_available():
        assert "no CUDA device" in done.stdout and "Nothing measured" in done.stdout


@pytest.mark.slow
def test_gpu_bench_runs_end_to_end_in_the_interpreter():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels_gpu.py"), "--cpu-smoke"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bitwise equal" in done.stdout and "FAILED" not in done.stdout
    for table in ("## GEMMs", "## Quantisers", "## Grouped GEMM"):
        assert table in done.stdout
