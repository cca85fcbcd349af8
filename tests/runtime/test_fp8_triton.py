"""Generated Triton FP8 kernels against the torch reference: interpreted on a CPU, compiled on CUDA.

Every kernel is fed the same quantised inputs as runtime/fp8_torch; quantisers must
match it bit for bit, GEMMs up to fp32 summation order (tests/tolerances.py).
Without CUDA the kernels run under TRITON_INTERPRET=1, which must be set before
triton is first imported in the process (done here at import; tests/conftest.py
should do it too so that test order cannot matter).
"""

from __future__ import annotations

import os
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("DSVC_FP8_AUTOTUNE", "0")  # the compiler's config: no autotuning

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsvc.runtime import fp8
from dsvc.runtime import fp8_torch as ref
from tests.runtime.triton_helpers import OnDevice, load_kernels, on_dev
from tests.runtime.triton_helpers import bits_equal as _bits_equal
from tests.tolerances import tol

triton = pytest.importorskip("triton")

@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The kernel module rendered for no particular spec (no GEMM table)."""
    from dsvc.compiler.codegen.kernels import generic_config, render_kernels

    path = tmp_path_factory.mktemp("generic") / "fp8_kernels.py"
    path.write_text(render_kernels(generic_config()))
    return OnDevice(load_kernels(path, "_dsvc_test_fp8_generic"))


@pytest.fixture(scope="module")
def tiny_kernels(tmp_path_factory):
    """A module rendered for two spec GEMMs, so their shape-specialised kernel runs."""
    from dsvc.compiler.codegen.kernels import GemmShape, KernelConfig, render_kernels

    config = KernelConfig(gemms=(GemmShape("wq", 96, 160), GemmShape("wo", 160, 96)), title="t")
    path = tmp_path_factory.mktemp("kernels") / "fp8_kernels.py"
    path.write_text(render_kernels(config), encoding="utf-8")
    return OnDevice(load_kernels(path, "_dsvc_test_fp8_tiny"))


def _close(actual, expected, name):
    rtol, atol = tol(name)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol)


def _data(*shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    # magnitudes spread over 2**-12..2**12 so that tiles see normals and e4m3 subnormals
    spread = torch.exp2(torch.randint(-12, 13, shape, generator=gen).float())
    return (torch.randn(*shape, generator=gen) * spread).to(dtype)


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantisers_are_bitwise_the_reference(kernels, ue8m0, dtype):
    x = _data(150, 300, seed=1, dtype=dtype)
    q, s = kernels.quantize_act(x, 128, ue8m0)
    q_ref, s_ref = ref.quantize_act(x, 128, ue8m0)
    assert _bits_equal(q, q_ref) and _bits_equal(s, s_ref)
    # scales of consecutive rows are adjacent: what the GEMMs and torch._scaled_mm read
    assert s.stride() == (1, 150)
    qt, st_ = kernels.quantize_act_t(x, 128, ue8m0)
    qt_ref, st_ref = ref.quantize_act_t(x, 128, ue8m0)
    assert _bits_equal(qt, qt_ref) and _bits_equal(st_, st_ref)
    both = kernels.quantize_act_both(x, 128, ue8m0)
    for got, want in zip(both, (q_ref, s_ref, qt_ref, st_ref)):
        assert _bits_equal(got, want)


def test_token_tiles_by_tma_store_are_bitwise_the_reference(kernels):
    if kernels.TensorDescriptor is None:
        pytest.skip("this triton has no host tensor descriptors")
    # M = 272 rows (a multiple of 16: qt's rows are 16-byte aligned), ragged in both tiles
    x = on_dev(_data(272, 200, seed=23, dtype=torch.bfloat16))
    for rows in (True, False):
        got = kernels.module._quant_act(x, False, rows, True, use_tma=True)
        q_ref, s_ref, qt_ref, st_ref = ref.quantize_act_both(x.cpu())
        assert _bits_equal(got[2], qt_ref) and _bits_equal(got[3], st_ref)
        if rows:
            assert _bits_equal(got[0], q_ref) and _bits_equal(got[1], s_ref)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_weight_and_grouped_quantisers_are_bitwise_the_reference(kernels, ue8m0):
    w = _data(3, 200, 260, seed=2)
    q, s = kernels.quantize_weight(w, 128, ue8m0)
    q_ref, s_ref = ref.quantize_weight(w, 128, ue8m0)
    assert _bits_equal(q, q_ref) and _bits_equal(s, s_ref)
    x = _data(300, 140, seed=3)
    offsets = torch.tensor([0, 129, 130, 130, 290], dtype=torch.int32)  # empty, 1-row, ragged
    got = kernels.quantize_act_t_grouped(x, offsets, 128, ue8m0)
    want = ref.quantize_act_t_grouped(x, offsets, 128, ue8m0)
    assert _bits_equal(got[0], want[0]) and _bits_equal(got[1], want[1])


def test_zero_and_huge_tiles_stay_finite_and_saturate(kernels):
    x = torch.zeros(4, 256)
    x[0] = torch.tensor([3.0e38, -3.0e38, 1.0e30, 1.0] * 64)
    x[1, :128] = 1.0e-20
    q, s = kernels.quantize_act(x)
    assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(q.float()).all()
    assert q.float()[0, 0] == 448.0 and q.float()[0, 1] == -448.0 and q.float()[1, 0] == 448.0
    assert not q.float()[2:].any()
    assert _bits_equal(s, ref.quantize_act(x)[1])
    qw, sw = kernels.quantize_weight(torch.zeros(130, 70))
    assert torch.isfinite(sw).all() and (sw > 0).all() and not qw.float().any()


def test_dequantisers_and_fused_swiglu(kernels):
    q, s = ref.quantize_act(_data(70, 200, seed=4))
    assert _bits_equal(kernels.dequantize_act(q, s), ref.dequantize_act(q, s))
    qw, sw = ref.quantize_weight(_data(2, 150, 130, seed=5))
    assert _bits_equal(kernels.dequantize_weight(qw, sw), ref.dequantize_weight(qw, sw))
    out = kernels.dequantize_act(q, s, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    g, u = torch.randn(70, 200), torch.randn(70, 200)
    h, hs = kernels.swiglu_quant(g, u)
    h_ref, hs_ref = ref.swiglu_quant(g, u)
    _close(hs, hs_ref, "fp8_swiglu_scale")
    rtol, atol = tol("fp8_e4m3_one_ulp")
    torch.testing.assert_close(h.cpu().float(), h_ref.float(), rtol=rtol, atol=atol)


def _normal(*shape, seed=0):
    # GEMM operands: N(0, 1), so that fp32 summation order stays within the tolerance
    # (the spread-out magnitudes of _data would make sums cancel catastrophically)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gemm_case(m, n, k, seed, rowwise=False):
    a, a_s = ref.quantize_act(_normal(m, k, seed=seed))
    if rowwise:
        b, b_s = ref.quantize_act(_normal(n, k, seed=seed + 1))
    else:
        b, b_s = ref.quantize_weight(_normal(n, k, seed=seed + 1))
    return a, a_s, b, b_s


@pytest.mark.parametrize("rowwise", [False, True], ids=["blocks", "rows"])
def test_gemm_matches_reference_with_ragged_edges(kernels, rowwise):
    a, a_s, b, b_s = _gemm_case(70, 200, 300, seed=6, rowwise=rowwise)
    want = ref.gemm(a, a_s, b, b_s, torch.float32)
    _close(kernels.gemm(a, a_s, b, b_s, torch.float32), want, "fp8_gemm_fp32_out")
    got = kernels.gemm(a, a_s, b, b_s, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    _close(got.float(), want, "fp8_gemm_bf16_out")


def test_dgrad_reads_the_transposed_weight_view(kernels):
    dy, dy_s = ref.quantize_act(_normal(50, 200, seed=7))
    w, w_s = ref.quantize_weight(_normal(200, 300, seed=8))
    want = ref.gemm(dy, dy_s, w.t(), w_s.t(), torch.float32)
    _close(kernels.gemm(dy, dy_s, w.t(), w_s.t(), torch.float32), want, "fp8_gemm_fp32_out")


def test_tensor_descriptor_path(kernels):
    if kernels.TensorDescriptor is None:
        pytest.skip("this triton has no host tensor descriptors")
    a, a_s, b, b_s = _gemm_case(70, 200, 272, seed=9)  # K % 16 == 0 for TMA strides
    a, a_s, b, b_s, c = on_dev(a, a_s, b, b_s, torch.empty(70, 200))
    kernels.module._launch_gemm(a, a_s, b, b_s, c, False, use_tma=True)
    _close(c, ref.gemm(a, a_s, b, b_s, torch.float32), "fp8_gemm_fp32_out")
    # grouped: one descriptor over all experts' weights; rows past an expert's end unused
    offsets = on_dev(torch.tensor([30, 30, 65], dtype=torch.int32))
    w, w_s = on_dev(*ref.quantize_weight(_normal(3, 96, 272, seed=19)))
    got = kernels.module.grouped_gemm(a, a_s, w, w_s, offsets, torch.float32, use_tma=True)
    want = ref.grouped_gemm(a.cpu(), a_s.cpu(), w.cpu(), w_s.cpu(), offsets.cpu(), torch.float32)
    _close(got, want, "fp8_gemm_fp32_out")
    # grouped wgrad: token tiles by TMA from each expert's origin (its first token rounded
    # down to 16), the neighbours' tokens zeroed in the edge tiles only. Expert 0: one
    # tile, its end inside it; 1: empty; 2 (37..230): both edges in two tiles; 3
    # (230..480): a masked first tile, then an untouched one ending on the tile edge;
    # 4 (480..528): aligned start, ragged end; the last 16 of 544 tokens unrouted;
    # N = 130 ragged (rows past it zero-filled)
    offsets = on_dev(torch.tensor([37, 37, 230, 480, 528], dtype=torch.int32))
    dyt, dyt_s = ref.quantize_act_t_grouped(_normal(544, 130, seed=23), offsets.cpu())
    xt, xt_s = ref.quantize_act_t_grouped(_normal(544, 96, seed=24), offsets.cpu())
    want = ref.grouped_gemm_wgrad(dyt, dyt_s, xt, xt_s, offsets.cpu())
    for use_tma in (True, False):
        got = kernels.module.grouped_gemm_wgrad(
            *on_dev(dyt, dyt_s, xt, xt_s), offsets, torch.float32, use_tma=use_tma
        )
        _close(got, want, "fp8_gemm_fp32_out")
        assert not got[1].any()


@pytest.mark.parametrize("split_k", [2, 3, 40])
def test_split_k_adds_up_shares_of_the_k_steps(kernels, split_k):
    # 8 K-steps, ragged in M, N and K; 40 shares leave most programs with no K-step
    a, a_s, b, b_s = _gemm_case(70, 200, 1000, seed=21)
    want = ref.gemm(a, a_s, b, b_s, torch.float32)
    for out_dtype, name in (
        (torch.float32, "fp8_gemm_fp32_out"),
        (torch.bfloat16, "fp8_gemm_bf16_out"),
    ):
        c = on_dev(torch.full((70, 200), float("nan"), dtype=out_dtype))
        kernels.module._launch_gemm(*on_dev(a, a_s, b, b_s), c, False, split_k=split_k)
        _close(c.float(), want, name)


@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "descriptors"])
def test_persistent_programs_walk_every_tile(kernels, monkeypatch, use_tma):
    if use_tma and kernels.TensorDescriptor is None:
        pytest.skip("this triton has no host tensor descriptors")
    module = kernels.module
    for device in ("cpu", "gpu"):  # the launch config on either, without autotuning
        cfg = dict(module.DEFAULT_GEMM_CONFIG[device], PERSISTENT=True)
        monkeypatch.setitem(module.DEFAULT_GEMM_CONFIG, device, cfg)
    monkeypatch.setattr(module, "_autotuning", lambda t: False)
    # two "SMs": two programs take the 3 x 2 tiles in turns (0, 2, 4 and 1, 3, 5)
    monkeypatch.setattr(module, "_sm_count", lambda device: 2)
    a, a_s, b, b_s = _gemm_case(70, 200, 272, seed=22)
    want = ref.gemm(a, a_s, b, b_s, torch.float32)
    # 3 K-steps: split 4 ways, the last share is empty inside the flattened loop
    for split_k in (1, 2, 4):
        c = on_dev(torch.full((70, 200), float("nan")))
        module._launch_gemm(*on_dev(a, a_s, b, b_s), c, False, use_tma=use_tma, split_k=split_k)
        _close(c, want, "fp8_gemm_fp32_out")


def test_warp_specialised_programs_make_their_own_descriptors(kernels, monkeypatch):
    # WS configs (Hopper) load through descriptors the kernel makes from the base pointers
    # (the interpreter runs their indexing; the warp specialisation itself is a GPU
    # compile's, bench/kernels_sm90.py): plain, split-K and persistent, a TMA-stored bf16
    # output, the dense wgrad's row scales, and the grouped GEMM (a over all rows, b over
    # E x N)
    if kernels.TensorDescriptor is None:
        pytest.skip("this triton has no host tensor descriptors")
    module = kernels.module
    for device in ("cpu", "gpu"):
        cfg = dict(module.DEFAULT_GEMM_CONFIG[device], WS=True)
        monkeypatch.setitem(module.DEFAULT_GEMM_CONFIG, device, cfg)
    monkeypatch.setattr(module, "_autotuning", lambda t: False)
    a, a_s, b, b_s = _gemm_case(70, 200, 272, seed=25)
    want = ref.gemm(a, a_s, b, b_s, torch.float32)
    for split_k, out_dtype, name in ((1, torch.float32, "fp8_gemm_fp32_out"),
                                     (1, torch.bfloat16, "fp8_gemm_bf16_out"),
                                     (2, torch.float32, "fp8_gemm_fp32_out")):  # fmt: skip
        c = on_dev(torch.full((70, 200), float("nan"), dtype=out_dtype))
        module._launch_gemm(*on_dev(a, a_s, b, b_s), c, False, use_tma=True, split_k=split_k)
        _close(c.float(), want, name)
    # row scales on both operands (dW = dY^T X from token tiles)
    dyt, dyt_s = ref.quantize_act(_normal(96, 256, seed=26))
    xt, xt_s = ref.quantize_act(_normal(80, 256, seed=27))
    c = on_dev(torch.full((96, 80), float("nan")))
    module._launch_gemm(*on_dev(dyt, dyt_s, xt, xt_s), c, True, use_tma=True)
    _close(c, ref.gemm(dyt, dyt_s, xt, xt_s, torch.float32), "fp8_gemm_fp32_out")
    offsets = on_dev(torch.tensor([30, 30, 65], dtype=torch.int32))
    w, w_s = on_dev(*ref.quantize_weight(_normal(3, 96, 272, seed=28)))
    got = module.grouped_gemm(*on_dev(a, a_s, w, w_s), offsets, torch.float32, use_tma=True)
    _close(got, ref.grouped_gemm(a, a_s, w, w_s, offsets.cpu(), torch.float32),
           "fp8_gemm_fp32_out")  # fmt: skip
    # persistent: two "SMs" walk the 3 x 2 tiles (the tile loop is the warp-specialised one)
    monkeypatch.setattr(module, "_sm_count", lambda device: 2)
    for device in ("cpu", "gpu"):
        cfg = dict(module.DEFAULT_GEMM_CONFIG[device], PERSISTENT=True)
        monkeypatch.setitem(module.DEFAULT_GEMM_CONFIG, device, cfg)
    c = on_dev(torch.full((70, 200), float("nan"), dtype=torch.bfloat16))
    module._launch_gemm(*on_dev(a, a_s, b, b_s), c, False, use_tma=True, split_k=1)
    _close(c.float(), want, "fp8_gemm_bf16_out")


def test_warp_specialised_configs_are_hopper_only(kernels, monkeypatch):
    # triton's Blackwell pass fails on the persistent WS config: off Hopper the launch
    # fixes WS=False (off a GPU only tests force the TMA path, and the interpreter runs it)
    import types

    module = kernels.module
    gpu = types.SimpleNamespace(is_cuda=True, device="cuda:0")
    for major, usable in ((9, True), (10, False), (12, False), (8, False)):
        monkeypatch.setattr(module.torch.cuda, "get_device_capability", lambda d, m=major: (m, 0))
        assert module._ws_usable(gpu) is usable, major
    assert module._ws_usable(torch.empty(1))


def test_autotuning_tries_warp_specialised_configs_where_k_is_not_split(kernels, monkeypatch):
    import triton

    module = kernels.module
    monkeypatch.setattr(module, "_sm_count", lambda device: 132)
    configs = [triton.Config(dict(c)) for c in module.GPU_GEMM_CONFIGS]
    ws = [c for c in configs if c.kwargs.get("WS")]
    assert ws, "the autotuning space has warp-specialised configs"
    big = {"M": 4096, "N": 7168}  # 32 x 56 tiles: persistent ones are tried too
    kept = module._prune_configs(configs, big, SPLIT_K=1)
    assert all(c in kept for c in ws) and len(kept) == len(configs)
    kept = module._prune_configs(configs, {"M": 128, "N": 2112}, SPLIT_K=7)
    assert not any(c.kwargs.get("WS") or c.kwargs.get("PERSISTENT") for c in kept) and kept


def test_split_k_is_chosen_only_when_tiles_leave_sms_idle(kernels, monkeypatch):
    module = kernels.module
    monkeypatch.setattr(module, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    # (M, N, K) -> shares: 17 tiles of 2112 x 7168 fill 7 x 17 = 119 SMs; 56 tiles get 2;
    # enough tiles, or too few K-steps to share, keep one
    cases = {(128, 2112, 7168): 7, (128, 7168, 2048): 2, (128, 4096, 7168): 4,
             (4096, 2112, 7168): 1, (128, 24576, 1536): 1, (128, 2112, 512): 1}  # fmt: skip
    for (m, n, k), shares in cases.items():
        assert module._pick_split_k(m, n, k, cuda) == shares, (m, n, k)
    assert module._pick_split_k(128, 2112, 7168, torch.device("cpu")) == 1
    monkeypatch.setenv("DSVC_FP8_SPLIT_K", "0")
    assert module._pick_split_k(128, 2112, 7168, cuda) == 1


def test_autotuning_tries_persistent_programs_only_where_they_differ(kernels, monkeypatch):
    import triton

    module = kernels.module
    monkeypatch.setattr(module, "_sm_count", lambda device: 132)
    configs = [triton.Config(module._tile(128, 128, 128, 8, 8, 3, persistent=p)) for p in (0, 1)]

    def kept(m, n, split_k):
        chosen = module._prune_configs(configs, {"M": m, "N": n}, SPLIT_K=split_k)
        return [bool(cfg.kwargs["PERSISTENT"]) for cfg in chosen]

    assert kept(4096, 32768, 1) == [False, True]  # 8192 tiles on 132 SMs
    assert kept(128, 2112, 1) == [False]  # 17 tiles: one program per tile either way
    assert kept(4096, 32768, 2) == [False]  # split K: never persistent
    assert module._tile(64, 128, 128, 8, 4, 3)["PERSISTENT"] is False  # the default


def test_shape_specialised_kernel_for_spec_gemms(tiny_kernels):
    assert set(tiny_kernels.GEMM_TABLE) == {(96, 160), (160, 96)}
    a, a_s, b, b_s = _gemm_case(40, 96, 160, seed=10)
    want = ref.gemm(a, a_s, b, b_s, torch.float32)
    _close(tiny_kernels.gemm(a, a_s, b, b_s, torch.float32), want, "fp8_gemm_fp32_out")


def test_grouped_gemms_without_padding(kernels):
    # expert 0 and 3 empty, expert 1 spans two token tiles, 10 trailing rows unrouted
    offsets = torch.tensor([0, 135, 150, 150, 170], dtype=torch.int64)
    a, a_s = ref.quantize_act(_normal(180, 260, seed=11))
    w, w_s = ref.quantize_weight(_normal(5, 130, 260, seed=12))
    want = ref.grouped_gemm(a, a_s, w, w_s, offsets, torch.float32)
    got = kernels.grouped_gemm(a, a_s, w, w_s, offsets, torch.float32)
    _close(got, want, "fp8_gemm_fp32_out")
    assert not got[170:].any()
    # dgrad through the transposed expert weights
    dy, dy_s = ref.quantize_act(_normal(180, 130, seed=13))
    wt, wt_s = w.transpose(1, 2), w_s.transpose(1, 2)
    want = ref.grouped_gemm(dy, dy_s, wt, wt_s, offsets, torch.float32)
    got = kernels.grouped_gemm(dy, dy_s, wt, wt_s, offsets, torch.float32)
    _close(got, want, "fp8_gemm_fp32_out")
    # wgrad over each expert's token range
    x = _normal(180, 140, seed=14)
    dyt, dyt_s = ref.quantize_act_t_grouped(_normal(180, 130, seed=15), offsets)
    xt, xt_s = ref.quantize_act_t_grouped(x, offsets)
    want = ref.grouped_gemm_wgrad(dyt, dyt_s, xt, xt_s, offsets)
    got = kernels.grouped_gemm_wgrad(dyt, dyt_s, xt, xt_s, offsets)
    _close(got, want, "fp8_gemm_fp32_out")
    assert not got[0].any() and not got[3].any()


@settings(max_examples=5, deadline=None)
@given(m=st.integers(1, 70), n=st.integers(1, 160), k=st.integers(1, 270), seed=st.integers(0, 99))
def test_gemm_and_quantiser_on_random_shapes(kernels, m, n, k, seed):
    x = _data(m, k, seed=seed)
    q, s = kernels.quantize_act(x)
    q_ref, s_ref = ref.quantize_act(x)
    assert _bits_equal(q, q_ref) and _bits_equal(s, s_ref)
    w = _normal(n, k, seed=seed + 1)
    b, b_s = kernels.quantize_weight(w)
    b_ref, b_s_ref = ref.quantize_weight(w)
    assert _bits_equal(b, b_ref) and _bits_equal(b_s, b_s_ref)
    a, a_s = ref.quantize_act(_normal(m, k, seed=seed + 2))
    want = ref.gemm(a, a_s, b_ref, b_s_ref, torch.float32)
    _close(kernels.gemm(a, a_s, b, b_s, torch.float32), want, "fp8_gemm_fp32_out")


@settings(max_examples=5, deadline=None)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 160),
    k=st.integers(1, 600),
    split_k=st.integers(1, 6),
    persistent=st.booleans(),
    seed=st.integers(0, 99),
)
def test_split_and_persistent_gemms_on_random_shapes(kernels, m, n, k, split_k, persistent, seed):
    # any share count (empty shares included) with any tile walk gives the same product
    module = kernels.module
    saved = module.DEFAULT_GEMM_CONFIG["cpu"]
    module.DEFAULT_GEMM_CONFIG["cpu"] = dict(saved, PERSISTENT=persistent)
    try:
        a, a_s, b, b_s = _gemm_case(m, n, k, seed=seed)
        c = on_dev(torch.full((m, n), float("nan")))
        module._launch_gemm(*on_dev(a, a_s, b, b_s), c, False, split_k=split_k)
    finally:
        module.DEFAULT_GEMM_CONFIG["cpu"] = saved
    _close(c, ref.gemm(a, a_s, b, b_s, torch.float32), "fp8_gemm_fp32_out")


def test_fp8_linear_on_the_generated_kernels(kernels):
    torch.manual_seed(16)
    x = on_dev(torch.randn(60, 200)).requires_grad_()
    w = on_dev(torch.randn(130, 200)).requires_grad_()
    y = fp8.fp8_linear(x, w, backend=kernels.module)
    dy = torch.randn_like(y)
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = fp8.fp8_linear(x2, w2, backend="torch")  # the same device, the reference numerics
    y2.backward(dy)
    _close(y, y2, "fp8_gemm_fp32_out")
    _close(x.grad, x2.grad, "fp8_gemm_fp32_out")
    _close(w.grad, w2.grad, "fp8_gemm_fp32_out")


def test_grouped_swiglu_ffn_on_the_generated_kernels(kernels):
    offsets = on_dev(torch.tensor([50, 130], dtype=torch.int64))

    def run(backend):
        gen = torch.Generator().manual_seed(18)
        leaves = [
            torch.randn(130, 128, generator=gen),
            torch.randn(2, 96, 128, generator=gen) / 11,
            torch.randn(2, 96, 128, generator=gen) / 11,
            torch.randn(2, 128, 96, generator=gen) / 10,
        ]
        leaves = [on_dev(t).requires_grad_() for t in leaves]
        y = fp8.fp8_grouped_swiglu_ffn(*leaves, offsets, backend=backend)
        y.backward(torch.ones_like(y))
        return [y, *(t.grad for t in leaves)]

    limit = tol("fp8_requantised_rel")[0]
    for got, want in zip(run(kernels.module), run("torch")):
        got, want = got.detach().cpu(), want.detach().cpu()
        assert ((got - want).norm() / want.norm()).item() < limit


def test_wrappers_reject_bad_inputs_with_clear_errors(kernels):
    a, a_s, b, b_s = _gemm_case(8, 16, 128, seed=17)
    with pytest.raises(TypeError, match="a must be float8_e4m3fn"):
        kernels.gemm(a.float(), a_s, b, b_s)
    with pytest.raises(ValueError, match="b_s must be"):
        kernels.gemm(a, a_s, b, b_s[:, :0])
    with pytest.raises(ValueError, match="disagree on K"):
        kernels.gemm(a, a_s, b[:, :64], b_s)
    with pytest.raises(ValueError, match="generated for activation tiles of 128"):
        kernels.quantize_act(torch.randn(4, 64), tile=64)
    with pytest.raises(TypeError, match="out_dtype"):
        kernels.gemm(a, a_s, b, b_s, torch.int32)
    with pytest.raises(ValueError, match="offsets must have shape"):
        kernels.grouped_gemm(a, a_s, b[None], b_s[None], torch.tensor([4, 8], dtype=torch.int32))


def test_generic_module_is_what_fp8_backend_triton_uses(kernels):
    from dsvc.runtime import fp8_triton

    assert fp8_triton.PROTOCOL == tuple(
        name for name in fp8_triton.PROTOCOL if callable(getattr(kernels, name))
    )
    fp8.use_kernels(kernels.module)
    try:
        assert fp8.resolve_backend("triton") is kernels.module
    finally:
        fp8.use_kernels(None)
    with pytest.raises(TypeError, match="not a dsvc FP8 kernel module"):
        fp8.use_kernels(sys.modules[__name__])
