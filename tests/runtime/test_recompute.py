"""Recomputation (`train.recompute`): the same training, bit for bit, keeping less.

One process, the unpartitioned tiny model (tiny_plan: MLA, a dense and three MoE layers,
MTP) in fp32 and in the FP8 emulation: `selective` and `full` must give the losses and
gradients of `none` exactly (the replayed ops are deterministic on a CPU), keep fewer
bytes for the backward (counted with saved-tensor hooks), and count expert loads and
aux losses once. The partitioned runs (1F1B with full, ZB1P's split backward with
selective) are in test_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch

from dsvc.runtime.plan import parse_plan
from dsvc.runtime.tiny import tiny_plan
from dsvc.runtime.trainer import Trainer
from tests.saved_bytes import saved_bytes

MODES = ("none", "selective", "full")


def _plan(mode: str, precision: str):
    raw = tiny_plan(pp=1, dp=1, ep=1, precision=precision)
    return parse_plan({**raw, "train": {**raw["train"], "recompute": mode}})


def _run(mode: str, precision: str, steps: int = 2):
    trainer = Trainer.reference(_plan(mode, precision), num_microbatches=2)
    trainer.keep_grads = True
    out = []
    for _ in range(steps):
        metrics = trainer.step()
        out.append((metrics, {n: p.grad.clone() for n, p in trainer.named_parameters()}))
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_recomputation_trains_bit_for_bit_the_same(precision):
    runs = {mode: _run(mode, precision) for mode in MODES}
    for mode in ("selective", "full"):
        for (want, want_g), (got, got_g) in zip(runs["none"], runs[mode]):
            for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
                assert got[key] == want[key], (mode, key)
            assert got["expert_load"] == want["expert_load"], mode  # counted once, not twice
            assert set(got_g) == set(want_g)
            for name in want_g:
                assert torch.equal(got_g[name], want_g[name]), (mode, name)


def _saved_bytes(mode: str) -> int:
    from dsvc.runtime.model import build_full_model

    plan = _plan(mode, "fp8")
    model = build_full_model(plan)
    tokens = torch.randint(0, plan.model.vocab, (2, plan.train.seq_len))
    return saved_bytes(lambda: model(tokens, tokens))


def test_recomputation_keeps_less_for_the_backward():
    none, selective, full = (_saved_bytes(m) for m in MODES)
    assert full < selective < none
    assert full < 0.5 * none


def test_the_compiler_writes_the_specs_choice_into_the_plan():
    from dsvc import dsl
    from dsvc.compiler.driver import build_plan
    from tests.conftest import EXAMPLES

    assert build_plan(dsl.load(EXAMPLES / "tiny.dsv"))["train"]["recompute"] == "none"
    spec = dsl.load(EXAMPLES / "tiny.dsv", overrides=["train.recompute=selective"])
    assert parse_plan(build_plan(spec)).train.recompute == "selective"
