"""The generated stage program against the runtime's eager modules (the reference).

Each block kind is run twice from the same weights and inputs, eagerly and by the
program a build would carry (compiler/codegen/stage_program.py from the graph after `fuse`),
and the outputs, the input gradient and every parameter gradient are compared
(tests/tolerances.py). Covered: the tiny example's blocks, the 1.1B bench spec's first
two layers (MLA + dense, MLA + MoE), and small specs for the other template branches
(MLA without q_lora, GQA with q/k/v biases, softmax routing without groups or shared
experts, 1 x 64 tiles). The eager modules keep SwiGLU's inputs in bf16, so the programs
compared with them are generated with `cache_fp8_activations = false` (`BF16_CACHE`); the
FP8 cache of the default is compared with that program. Then the chunks' zero-bubble
split, the precision check and the fallback to eager.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib

import pytest

from dsvc import dsl
from dsvc.compiler.codegen.stage_program import render_program
from dsvc.compiler.driver import build_plan, run_until
from dsvc.runtime import program as P
from dsvc.runtime.init import init_parameters
from dsvc.runtime.loop import fp32_precision
from dsvc.runtime.model import build_full_model
from dsvc.runtime.plan import parse_plan
from tests.conftest import EXAMPLES, ROOT
from tests.runtime._workers import program_block, run_block
from tests.saved_bytes import saved_bytes
from tests.tolerances import tol

SPECS = ROOT / "tests" / "train_specs"
# SwiGLU's inputs kept in bf16 for the backward, as the eager modules keep them
BF16_CACHE = ("precision.cache_fp8_activations=false",)

TAIL = """
cluster one {
  nodes = 1
  gpus_per_node = 1
  gpu = cpu { bf16 = 1 TFLOPS, fp8 = 1 TFLOPS, memory = 4 GB, hbm = 20 GB/s }
  nvlink { domain = 1, bandwidth = 10 GB/s, effective = 5 GB/s }
}
parallel { pipeline = 1, expert = 1, zero = 1, schedule = 1f1b }
train {
  seq_len = 16
  global_batch = 2
  micro_batch = 2
  optimizer = adamw(lr = 3e-3)
  data = synthetic
}
"""

PRECISION = """
precision p {{
  default = bf16
  linear = fp8_e4m3 {{ act = tile(1, {tile}), weight = block({tile}, {tile}), promote_every = {tile},
                      pad = {pad} }}
  keep {{ bf16 = [embedding, head, router, attention_core], fp32 = [norm] }}
  dispatch = fp8_e4m3
  combine = bf16
  cache_fp8_activations = {cache}
}}
"""

# MLA without q_lora, softmax routing without groups or shared experts, ragged widths
MLA_PLAIN = """
model mla_plain {
  vocab = 128
  hidden = 192
  max_seq = 64
  rope = rope(theta = 10000)
  attention mla { heads = 3, q_lora_rank = 0, kv_lora_rank = 96, qk_nope_dim = 24,
                  qk_rope_dim = 8, v_dim = 40 }
  ffn moe { routed = 6, shared = 0, top_k = 2, intermediate = 80, score = softmax }
  layers { 0 = block(mla, moe) }
}
"""

# grouped-query attention with q/k/v biases, dense FFN and a MoE with a shared expert
GQA = """
model gqa_small {
  vocab = 128
  hidden = 128
  max_seq = 64
  rope = rope(theta = 10000)
  attention gqa { heads = 4, kv_heads = 2, head_dim = 32, qkv_bias = true }
  ffn dense { intermediate = 192 }
  ffn moe { routed = 4, shared = 1, top_k = 2, intermediate = 64, score = sigmoid,
            groups = 2, top_groups = 1, route_scale = 2.0 }
  layers { 0 = block(gqa, dense)
           1 = block(gqa, moe) }
}
"""


def _setup(spec, tmp_path, name="program"):
    graph = run_until(spec, "fuse")
    path = tmp_path / f"{name}.py"
    path.write_text(render_program(graph, spec_file="x.dsv", span=None, passes=graph.passes))
    plan = parse_plan(build_plan(spec))
    model = build_full_model(plan)
    init_parameters(model, 0, plan.model.init_std)
    return P.load_program(path), plan, model


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _is_moe(model, block_name) -> bool:
    return hasattr(model.get_submodule(block_name).mlp, "experts")


def _compare(prog, plan, model, block_name, backend, tol_name, seq=16, batch=2, seed=0):
    """The program's block against the eager one within `tol_name`, or, for a MoE block
    (whose gates the program applies inside SwiGLU), within the looser of it and
    `program_moe_vs_eager`."""
    if _is_moe(model, block_name):
        tol_name = max(tol_name, "program_moe_vs_eager", key=lambda n: tol(n)[0])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, plan.model.hidden, generator=gen).to(torch.bfloat16)
    dy = torch.randn(batch, seq, plan.model.hidden, generator=gen)
    P.detach_program([model])
    eager = run_block(model, block_name, x, dy)
    attached, _ = P.attach_program([model], prog, plan, backend)
    assert attached > 0
    assert model.get_submodule(block_name).program is not None
    try:
        gen_ = run_block(model, block_name, x, dy)
    finally:
        P.detach_program([model])
    assert set(gen_) == set(eager), "the program must give a gradient to every parameter"
    worst = {name: _rel(gen_[name], eager[name]) for name in eager}
    assert max(worst.values()) <= tol(tol_name)[0], worst
    return worst


# ----------------------------------------------------------------------------- vs eager


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with contextlib.chdir(ROOT):
        spec = dsl.load("examples/tiny.dsv", BF16_CACHE)
    return _setup(spec, tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("block", ["layers.0", "layers.1", "mtp.0.block"])
def test_tiny_blocks_equal_the_eager_modules(tiny, block):
    prog, plan, model = tiny
    worst = _compare(prog, plan, model, block, "torch", "program_vs_eager")
    if not _is_moe(model, block):
        assert worst["y"] == 0.0 and worst["dx"] == 0.0  # bit for bit, not only close


def _fp32_plan(plan):
    """`plan` with every linear in fp32 (the `--fp32` reference precision)."""
    from dsvc.runtime.plan import dump_plan

    raw = dump_plan(plan)
    raw["precision"] = fp32_precision()
    return parse_plan(raw)


def _errors_against_fp32(prog, plan, model, ref_model, block, seed):
    """{name: (eager FP8 error, program error)}, each relative to `ref_model` (the same
    weights under `_fp32_plan`)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, plan.model.hidden, generator=gen).to(torch.bfloat16)
    dy = torch.randn(2, 16, plan.model.hidden, generator=gen)
    ref = run_block(ref_model, block, x.float(), dy)
    P.detach_program([model])
    eager = run_block(model, block, x, dy)
    P.attach_program([model], prog, plan, "torch")
    try:
        gen_ = run_block(model, block, x, dy)
    finally:
        P.detach_program([model])
    return {k: (_rel(eager[k], ref[k]), _rel(gen_[k], ref[k])) for k in ref}


@pytest.mark.parametrize("case", ["tiny", "gqa"])
def test_moe_blocks_are_as_accurate_as_the_eager_modules(tiny, tmp_path, case):
    """The program's MoE blocks apply the gates inside SwiGLU and take their gradient
    from the FP8 dgrad, so they differ from the eager modules by FP8 rounding; against
    the same block in fp32 they are as accurate as the eager FP8 block: every output's
    and gradient's error within `program_moe_vs_fp32_ratio` of the eager one's."""
    if case == "tiny":
        (prog, plan, model), blocks = tiny, ["layers.1", "layers.2", "mtp.0.block"]
    else:
        spec = dsl.loads(GQA + PRECISION.format(tile=64, pad="false", cache="false") + TAIL,
                         filename="t.dsv")
        (prog, plan, model), blocks = _setup(spec, tmp_path), ["layers.1"]
    ratio = tol("program_moe_vs_fp32_ratio")[0]
    ref_model = build_full_model(_fp32_plan(plan))
    ref_model.load_state_dict(model.state_dict())
    for block in blocks:
        assert _is_moe(model, block)
        for seed in (0, 1):
            errs = _errors_against_fp32(prog, plan, model, ref_model, block, seed)
            assert all(e > 0 for e, _ in errs.values() if e is not None)
            worse = {k: g / e for k, (e, g) in errs.items() if g > ratio * e}
            assert not worse, (block, seed, worse)


def test_bench_spec_first_layers_equal_the_eager_modules(tmp_path):
    prog, plan, model = _setup(dsl.load(SPECS / "bench_1b.dsv", BF16_CACHE), tmp_path)
    for block in ("layers.0", "layers.1"):  # MLA + dense, MLA + MoE at the bench's width
        _compare(prog, plan, model, block, "torch", "program_vs_eager", seq=8, batch=1)


@pytest.mark.parametrize("text,blocks,tile,pad", [(MLA_PLAIN, ["layers.0"], 128, "true"),
                                                  (GQA, ["layers.0", "layers.1"], 64, "false")],
                         ids=["mla-no-q-lora-softmax-padded", "gqa-bias-tile64"])
def test_other_block_kinds_equal_the_eager_modules(tmp_path, text, blocks, tile, pad):
    """Ragged widths (pad = true: the eager Linear pads K with zeros, the fused kernels take
    it as it is, and the two agree) and another tile."""
    spec = dsl.loads(text + PRECISION.format(tile=tile, pad=pad, cache="false") + TAIL,
                     filename="t.dsv")
    prog, plan, model = _setup(spec, tmp_path)
    for block in blocks:
        _compare(prog, plan, model, block, "torch", "program_vs_eager")


def test_tiny_blocks_on_the_generated_triton_kernels(tiny, tmp_path):
    from dsvc.compiler.codegen.kernels import generic_config, render_kernels
    from dsvc.runtime import fp8

    path = tmp_path / "fp8_kernels.py"
    path.write_text(render_kernels(generic_config()))
    kernels = fp8.load_kernel_module(path)
    prog, plan, model = tiny
    for block in ("layers.0", "layers.1"):
        _compare(prog, plan, model, block, kernels, "program_triton_vs_eager", seq=16, batch=1)


@pytest.fixture(scope="module")
def tiny_fp8_cache(tmp_path_factory):
    """The tiny example's program as its spec asks: SwiGLU's inputs kept in FP8."""
    with contextlib.chdir(ROOT):
        spec = dsl.load("examples/tiny.dsv")
    assert spec.precision.cache_fp8_activations
    return _setup(spec, tmp_path_factory.mktemp("tiny_fp8_cache"))


@pytest.mark.parametrize("block", ["layers.0", "layers.1"])
def test_swiglu_inputs_kept_in_fp8(tiny, tiny_fp8_cache, block):
    """cache_fp8_activations (DeepSeek-V3's FP8 cache of SwiGLU's inputs): the forward is the
    bf16-cache program's bit for bit, the backward reads g and u as FP8 1 x 128 tiles, so
    the gradients move by FP8 rounding only, and the bytes kept for the backward fall by
    exactly g's and u's: 2 bytes an element in bf16 against 1 plus a 4-byte scale a tile."""
    prog16, plan, model = tiny
    prog8, plan8, model8 = tiny_fp8_cache
    model8.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, plan.model.hidden, generator=gen).to(torch.bfloat16)
    dy = torch.randn(2, 16, plan.model.hidden, generator=gen)
    runs, kept = {}, {}
    for name, (prog, pl, mod) in {"bf16": tiny, "fp8": tiny_fp8_cache}.items():
        P.attach_program([mod], prog, pl, "torch")
        try:
            runs[name] = run_block(mod, block, x, dy)
            kept[name] = _saved_bytes(mod, block, x)
        finally:
            P.detach_program([mod])
    assert torch.equal(runs["fp8"]["y"], runs["bf16"]["y"])
    worst = {k: _rel(runs["fp8"][k], runs["bf16"][k]) for k in runs["bf16"] if k != "y"}
    assert 0 < max(worst.values()) <= tol("program_fp8_swiglu_cache")[0], worst
    m, t = plan.model, x.shape[0] * x.shape[1]
    if block == "layers.0":
        widths = [(t, m.ffn["dense"].intermediate)]
    else:
        moe = m.ffn["moe"]
        shared = moe.shared * (moe.shared_intermediate or moe.intermediate)
        widths = [(t * moe.top_k, moe.intermediate), (t, shared)]
    elems = sum(2 * rows * w for rows, w in widths)  # g and u
    tiles = sum(2 * rows * -(-w // 128) for rows, w in widths)
    assert kept["bf16"] - kept["fp8"] == 2 * elems - (elems + 4 * tiles)


# ----------------------------------------------------------------------------- the chunks


def test_weight_gradients_wait_for_their_w_action(tiny):
    """Inside defer_weight_grads the chunks leave the weight halves queued (the zero-bubble
    I action); run_weight_grads (the W action) then gives the gradients of a plain backward."""
    prog, plan, model = tiny
    P.attach_program([model], prog, plan, "torch")
    try:
        blk = model.get_submodule("layers.1")
        x = torch.randn(1, 16, plan.model.hidden).to(torch.bfloat16)
        full = run_block(model, "layers.1", x, torch.ones(1, 16, plan.model.hidden))
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = blk(xi)
        with P.defer_weight_grads(("stage", 0)):
            (y.float().sum()).backward()
        assert torch.equal(xi.grad, full["dx"])  # the input gradient is there at once
        assert blk.self_attn.o_proj.weight.grad is None  # the weight gradients are not
        assert P.pending_weight_grads() == [("stage", 0)]
        assert P.run_weight_grads(("stage", 0)) and not P.pending_weight_grads()
        for name, p in blk.named_parameters():
            if name in full:
                assert torch.equal(p.grad, full[name]), name
    finally:
        P.detach_program([model])


def test_weight_gradients_wait_when_autograd_runs_the_backward_on_another_thread(tiny):
    """On a GPU autograd runs a CUDA node's backward on the device's worker thread, not on
    the thread that entered defer_weight_grads: the deferral must hold there too."""
    import threading

    prog, plan, model = tiny
    P.attach_program([model], prog, plan, "torch")
    try:
        blk = model.get_submodule("layers.1")
        model.zero_grad(set_to_none=True)
        y = blk(torch.randn(1, 16, plan.model.hidden).to(torch.bfloat16).requires_grad_(True))
        with P.defer_weight_grads(("stage", 1)):
            worker = threading.Thread(target=lambda: y.float().sum().backward())
            worker.start()
            worker.join()
        assert blk.self_attn.o_proj.weight.grad is None
        assert P.pending_weight_grads() == [("stage", 1)]
        assert P.run_weight_grads(("stage", 1))
        assert blk.self_attn.o_proj.weight.grad is not None
    finally:
        P.detach_program([model])


def test_a_plan_of_another_precision_keeps_the_eager_modules(tiny):
    prog, plan, model = tiny
    plan32 = _fp32_plan(plan)
    assert "precision differs" in P.program_mismatch(prog, plan32)
    assert P.attach_program([model], prog, plan32, "torch") == (0, 5)
    assert all(getattr(m, "program", None) is None for m in model.modules())


def test_weights_are_quantised_once_per_value(tiny):
    """Micro-batches share one FP8 copy of each weight; an in-place update (the optimizer's)
    is seen at once; release_weights drops the copies."""
    prog, plan, model = tiny
    calls = []
    block = "layers.0"  # MLA + dense: the eager block's bits, so a stale weight would show

    def attach_counting():
        """Attach the program, its weight quantiser recording each weight it quantises."""
        P.attach_program([model], prog, plan, "torch")
        ops = model.get_submodule(block).program[1].ops
        quantize = ops.quantize_weight
        ops.quantize_weight = lambda w, *a, **k: calls.append(w) or quantize(w, *a, **k)

    blk = model.get_submodule(block)
    w = blk.self_attn.o_proj.weight
    before = w.detach().clone()  # the module fixture's weights, restored exactly after
    attach_counting()
    try:
        x = torch.randn(2, 16, plan.model.hidden).to(torch.bfloat16)
        dy = torch.randn(2, 16, plan.model.hidden)
        for _ in range(2):  # two micro-batches of a step
            run_block(model, block, x, dy)
        fp8_weights = {id(t) for t in calls}
        assert len(calls) == len(fp8_weights) > 3  # each weight quantised once, not twice
        with torch.no_grad():
            w.mul_(1.5)  # an optimizer step's in-place update
        updated = run_block(model, block, x, dy)
        assert calls[-1] is w and len(calls) == len(fp8_weights) + 1
        P.detach_program([model])
        eager = run_block(model, block, x, dy)
        assert _rel(updated["y"], eager["y"]) <= tol("program_vs_eager")[0]
        P.release_weights([model])  # detached: nothing to release, and no error
        attach_counting()
        calls.clear()
        run_block(model, block, x, dy)
        run_block(model, block, x, dy)
        assert len(calls) == len(fp8_weights)
        P.release_weights([model])  # a step's backward done: the next forward quantises anew
        run_block(model, block, x, dy)
        assert len(calls) == 2 * len(fp8_weights)
    finally:
        P.detach_program([model])  # (each attach builds its own ops namespace)
        with torch.no_grad():
            w.copy_(before)


def _saved_bytes(model, block_name, x) -> int:
    """Bytes a block's forward leaves for its backward (parameters and the input excluded)."""
    blk = model.get_submodule(block_name)
    xi = x.clone().requires_grad_(True)
    return saved_bytes(lambda: blk(xi), (*blk.parameters(), xi))


@pytest.mark.parametrize("block", ["layers.0", "layers.1"])
def test_selective_recomputation_runs_the_program(tmp_path, block):
    """Under recompute = selective the program replays its MLA chunk up to the attention
    core (keeping the block's input and the core's outputs), as the eager MLA replays its
    up-projections: the same values as the eager modules under selective, fewer bytes kept
    than the program without recomputation."""
    with contextlib.chdir(ROOT):
        spec = dsl.load("examples/tiny.dsv", ("train.recompute=selective", *BF16_CACHE))
    prog, plan, model = _setup(spec, tmp_path)
    assert plan.train.recompute == "selective" and P.program_mismatch(prog, plan) is None
    _compare(prog, plan, model, block, "torch", "program_vs_eager")
    x = torch.randn(2, 16, plan.model.hidden).to(torch.bfloat16)
    P.attach_program([model], prog, plan, "torch")
    try:
        selective = _saved_bytes(model, block, x)
        for blk in model.modules():
            if hasattr(blk, "program"):
                blk.recompute = "none"
        kept = _saved_bytes(model, block, x)
    finally:
        P.detach_program([model])
    assert selective < kept


# EP 4 over two "nodes" of two processes (gloo): the expert chunk's exchanges, one hop
# (every slot straight to its expert's rank) and two (node, then GPU), against the eager
# modules' own exchanges
EP_CASES = {
    "one_hop": ("parallel.two_hop=false", *BF16_CACHE),
    "two_hop": ("parallel.two_hop=true", *BF16_CACHE),  # a token's top group: one node, two ranks
    "two_hop_both_nodes": ("parallel.two_hop=true", "model.ffn.moe.top_groups=2", *BF16_CACHE),
    # SwiGLU's inputs in FP8 at the experts' owners, reached by both hops (the spec's default)
    "two_hop_fp8_cache": ("parallel.two_hop=true", "model.ffn.moe.top_groups=2"),
}


@pytest.fixture(scope="module", params=sorted(EP_CASES))
def ep_blocks(request, tmp_path_factory):
    from dsvc.runtime.launch import spawn

    overrides = ("parallel.pipeline=1", "parallel.expert=4", "cluster.nodes=2",
                 "cluster.gpus_per_node=2", *EP_CASES[request.param])
    with contextlib.chdir(ROOT):
        spec = dsl.load("examples/tiny.dsv", overrides)
    graph = run_until(spec, "fuse")
    path = tmp_path_factory.mktemp("ep") / "program.py"
    path.write_text(render_program(graph, spec_file="x.dsv", span=None, passes=graph.passes))
    results = spawn(program_block, 4, (build_plan(spec), str(path), "layers.1", 0),
                    timeout_s=300)
    return request.param, results


@pytest.mark.slow
def test_expert_parallel_blocks_equal_the_eager_modules(ep_blocks):
    case, results = ep_blocks
    for res in results:
        assert res["runs_program"] and res["moves"] and res["two_hop"] == case.startswith("two")
        eager, gen = res["eager"], res["program"]
        assert set(gen) == set(eager), "the program must give a gradient to every parameter"
        worst = {name: _rel(gen[name], eager[name]) for name in eager}
        # the program applies the gates inside SwiGLU at the experts' owners (the eager
        # layer at the combine): FP8 rounding apart, as in one process; a slot sent to the
        # wrong rank or row would be off by O(1)
        assert max(worst.values()) <= tol("program_moe_vs_eager")[0], worst


def test_a_program_of_another_interface_is_refused(tmp_path):
    path = tmp_path / "old.py"
    path.write_text("PROGRAM_API = 0\nBLOCKS = {}\n")
    with pytest.raises(P.ProgramError, match="recompile the spec"):
        P.load_program(path)
    with pytest.raises(P.ProgramError, match="no generated program"):
        P.load_program(tmp_path / "missing.py")


def test_program_api_versions_agree():
    from dsvc.compiler.codegen import stage_program as emitter

    assert emitter.PROGRAM_API == P.PROGRAM_API


@pytest.mark.parametrize("name", ["tiny", "deepseek_v3", "llama3_8b", "deepseek_v2_lite"])
def test_example_programs_cover_their_fp8_blocks(name):
    """Every FP8 example's block kinds are generated (V2-Lite pads ragged K, which the fused
    kernels take as it is); a bf16 spec's are listed as eager with the reason."""
    graph = run_until(dsl.load(EXAMPLES / f"{name}.dsv"), "fuse")
    src = render_program(graph, spec_file=f"{name}.dsv", span=None, passes=graph.passes)
    namespace: dict = {}
    exec(compile(src, f"{name}_program.py", "exec"), namespace)  # noqa: S102 - our own output
    kinds = {(lay.attention, lay.ffn) for lay in graph.spec.model.layers}
    assert set(namespace["BLOCKS"]) == kinds
    bf16 = run_until(dsl.load(EXAMPLES / "llama2_7b.dsv"), "fuse")
    text = render_program(bf16, spec_file="l.dsv", span=None, passes=bf16.passes)
    assert "BLOCKS = {}" in text and "computes in bf16, not FP8" in text
