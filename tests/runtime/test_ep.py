"""Expert-parallel dispatch/combine on 4 gloo ranks (EP 4, two "nodes" of 2).

Every rank routes its own tokens with a skewed, uneven routing (some experts get
nothing); the test rebuilds the global picture from all ranks and checks the
exchanges against plain one-process formulas.
"""

from __future__ import annotations

import pytest
import torch

from dsvc.runtime.launch import spawn
from dsvc.runtime.tiny import tiny_plan
from tests.runtime._workers import dispatch_combine
from tests.tolerances import tol

TOKENS = 24


@pytest.fixture(scope="module")
def ep_results():
    raw = tiny_plan(pp=1, dp=4, ep=4, two_hop=True, gpus_per_node=2)
    return spawn(dispatch_combine, 4, (raw, TOKENS, 7), timeout_s=200)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["one_hop", "two_hop"])
def test_identity_experts_return_the_input_exactly(ep_results, path):
    for res in ep_results:
        assert res[path]["is_two_hop"] == (path == "two_hop")
        assert torch.equal(res[path]["y_identity"], res["x"])


@pytest.mark.slow
@pytest.mark.parametrize("path", ["one_hop", "two_hop"])
def test_no_token_dropped(ep_results, path):
    routed = ep_results[0]["idx"].new_zeros(8)
    for res in ep_results:
        routed += torch.bincount(res["idx"].reshape(-1), minlength=8)
    received = torch.zeros(8, dtype=torch.long)
    for res in ep_results:
        received[res["local"]] += res[path]["received"]
    assert torch.equal(received, routed)
    assert (routed == 0).any() or routed.max() > 2 * routed.min(), "routing should be uneven"


@pytest.mark.slow
@pytest.mark.parametrize("path", ["one_hop", "two_hop"])
def test_outputs_and_gradients_match_one_process(ep_results, path):
    rtol, atol = tol("fp32_equivalence")
    for res in ep_results:
        x = res["x"].clone().requires_grad_(True)
        w = res["w"].clone().requires_grad_(True)
        scale_TK = 1.0 + res["idx"].to(torch.float32)  # the worker's expert e multiplies by 1 + e
        y = (w * scale_TK).unsqueeze(-1).mul(x.unsqueeze(1)).sum(1)
        (y * torch.arange(y.numel(), dtype=torch.float32).view_as(y).sin()).sum().backward()
        got = res[path]
        torch.testing.assert_close(got["y"], y.detach(), rtol=rtol, atol=atol)
        torch.testing.assert_close(got["dx"], x.grad, rtol=rtol, atol=atol)
        torch.testing.assert_close(got["dw"], w.grad, rtol=rtol, atol=atol)


@pytest.mark.slow
def test_fp8_dispatch_is_the_quantised_input(ep_results):
    from dsvc.runtime.fp8 import dequantize_act, quantize_act

    for res in ep_results:
        q, s = quantize_act(res["x"], 128)
        want = dequantize_act(q, s, 128)  # what arrives; the bf16 combine rounds once more
        rtol, atol = tol("fp8_gemm_bf16_out")
        torch.testing.assert_close(res["fp8_identity"], want, rtol=rtol, atol=atol)
