"""Memory per GPU: storage and activation formulas, the stage layout, a hand-computed dense
model, DeepSeek-V3's devices, and property tests on random specs."""

from __future__ import annotations

import functools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from dsvc import dsl
from dsvc.compiler.costs.activations import Kept
from dsvc.compiler.costs.layout import StageContents, even_layout
from dsvc.compiler.costs.memory import (
    RESERVE_FRACTION,
    activation_bytes,
    linear_weight_bytes,
    weight_copy_bytes,
)
from dsvc.compiler.costs.model_costs import Linear, build_model
from dsvc.compiler.costs.symbols import Quantities
from dsvc.compiler.driver import build_report
from dsvc.runtime.plan import split_layers

# The cost formulas on the documented even split (no graph, no simulation).
build_report = functools.partial(build_report, even_split=True)
from tests.conftest import EXAMPLES, ROOT

SPECS = ROOT / "tests" / "compiler" / "specs"


def test_fp8_weights_carry_block_scales():
    pr = dsl.load(EXAMPLES / "deepseek_v3.dsv").precision
    lin = Linear("expert.w1", 7168, 2048, count=256, expert=True)
    per = 7168 * 2048 + (2048 // 128) * (7168 // 128) * 4  # 1 B/element + fp32 per 128x128
    assert linear_weight_bytes(lin, pr) == 256 * per
    # the router is kept in bf16: 2 B per element and no scales
    assert linear_weight_bytes(Linear("router", 7168, 256, component="router"), pr) == \
        7168 * 256 * 2
    # a ragged block count rounds up (10944 = 85.5 blocks of 128)
    ragged = linear_weight_bytes(Linear("w1", 2048, 10944), pr)
    assert ragged == 2048 * 10944 + 86 * 16 * 4


def test_saved_tensors_by_hand():
    """DeepSeek-V3's blocks per micro-batch of 4096 tokens as the runtime keeps them: the
    generated program's chunks (what runs: its policy is FP8), then the eager modules."""
    spec = dsl.load(EXAMPLES / "deepseek_v3.dsv")
    pr, costs = spec.precision, build_model(spec, Quantities())
    T, S, d = 4096, 4096, 7168
    mla, moe = costs.attentions["mla"], costs.ffns["moe"]
    assert Kept(pr).runs_program(moe.spec)

    norm = lambda w: 2 * w * T + 4 * T  # noqa: E731 - the fused norm's input, the rstd
    core_out = 2 * 128 * 128 * T  # (B, H, S, V) bf16, kept for o_proj's wgrad
    none, _ = activation_bytes(mla, Kept(pr, "none"), T, S)
    # the latent norm keeps kv_a's whole output (rope key too); the core q, k (192 per
    # head) and v as the RoPE kernel wrote them (128), and the lse; no FP8 GEMM input
    assert none == (norm(d) + norm(1536) + norm(576) + 2 * (2 * 128 * 192 + 128 * 128) * T
                    + 4 * 128 * T + core_out)
    sel, _ = activation_bytes(mla, Kept(pr, "selective"), T, S)
    assert sel == 2 * d * T + 4 * 128 * T + core_out  # the block's input, the core's outputs
    full, _ = activation_bytes(mla, Kept(pr, "full"), T, S)
    assert full == 2 * d * T  # the layer's input

    def fp8(rows, width):  # 1 B per element + an fp32 scale per 1 x 128
        return rows * width + rows * -(-width // 128) * 4

    parts, routed = activation_bytes(moe, Kept(pr, "none"), T, S, 4)
    # the norm (its input: its bf16 output is rebuilt from it, not kept), fp32 scores of
    # 256 experts, int64 choices of 8, the balance loss's sums; per slot two indices; the
    # shared expert's gate and up in FP8
    assert parts == (norm(d) + 4 * 256 * T + 8 * 8 * T + 4 * T
                     + 2 * 8 * 8 * T + 2 * fp8(T, 2048))
    # 8 rows per token: gate and up in FP8, the gate weight (fp32: the experts apply it,
    # so none of their outputs is kept), and the FP8 rows that arrived from other ranks
    assert routed == 2 * fp8(8 * T, 2048) + 4 * 8 * T + fp8(8 * T, d)
    # one FP8 copy of each weight per step (4 of 256 experts on each of 64 EP ranks)
    blocks = lambda n, k: n * k + -(-n // 128) * -(-k // 128) * 4  # noqa: E731
    assert weight_copy_bytes(moe, pr, 64) == 4 * 3 * blocks(2048, d) + 3 * blocks(2048, d)
    assert weight_copy_bytes(mla, pr) == (blocks(d, 1536) + blocks(1536, 128 * 192)
                                          + blocks(d, 576) + blocks(512, 128 * 256)
                                          + blocks(128 * 128, d))

    def fp8_eager(k, n):  # input along tokens (+ fp32 scale per 1 x 128), the weight (+ blocks)
        return k * T + k * (T // 128) * 4 + k * n + -(-n // 128) * -(-k // 128) * 4

    norm = lambda w: 4 * w * T + 4 * T  # noqa: E731 - fp32 input copy, the reciprocal RMS
    sel, _ = activation_bytes(mla, Kept(pr, "selective"), T, S, program=False)
    # the input norm keeps its bf16 input; the replayed part its latents and the core's out
    # + lse; FP8 q_a, kv_a and wo keep their inputs and weights
    assert sel == (2 * d * T + fp8_eager(d, 1536) + fp8_eager(d, 576) + 2 * 1536 * T
                   + 2 * 576 * T + 2 * 128 * 128 * T + 4 * 128 * T + fp8_eager(16384, d))
    none, _ = activation_bytes(mla, Kept(pr, "none"), T, S, program=False)
    # + the fp32 norm copies, q_b and kv_b, and the core's q, k (192 per head), the kv_b
    # output v is a view of (256 per head), the output and lse
    assert none == (norm(d) + fp8_eager(d, 1536) + fp8_eager(d, 576) + norm(1536)
                    + fp8_eager(1536, 128 * 192) + norm(512) + fp8_eager(512, 128 * 256)
                    + 2 * (2 * 128 * 192 + 128 * 256 + 128 * 128) * T + 4 * 128 * T
                    + fp8_eager(16384, d))
    _, routed = activation_bytes(moe, Kept(pr, "none"), T, S, 4, program=False)
    # 8 rows per token: gate and up keep them in FP8 along tokens, down keeps gate and up
    assert routed == 2 * (d * 8 * T + d * (8 * T // 128) * 4) + 2 * 2 * 2048 * 8 * T


def test_the_fp8_swiglu_cache_shows_in_the_report():
    """`cache_fp8_activations` keeps SwiGLU's gate and up as FP8 1 x 128 tiles (1 B an
    element, 4 B a tile) instead of bf16: the report's activations fall by exactly that,
    per block and micro-batch in flight. Tiny: 64 tokens, a dense FFN of 256, top-2 of
    routed experts of 128 and a shared one of 128; 1F1B over 2 devices holds layers 0
    (dense) and 1 with 2 micro-batches in flight, layers 2, 3 and the MTP block with 1."""
    fp8 = build_report(dsl.load(EXAMPLES / "tiny.dsv"))
    bf16 = build_report(dsl.load(EXAMPLES / "tiny.dsv", ["precision.cache_fp8_activations=false"]))
    T = 64

    def saving(rows, width):  # gate and up: 2 B an element against 1 B + 4 B a tile
        return 2 * (2 * rows * width) - 2 * (rows * width + rows * -(-width // 128) * 4)

    dense, moe = saving(T, 256), saving(2 * T, 128) + saving(T, 128)
    drop = [bf16.value(f"memory.devices.{i}.activations")
            - fp8.value(f"memory.devices.{i}.activations") for i in range(2)]
    assert drop == [2 * (dense + moe), 3 * moe]


def test_layouts():
    assert split_layers(61, 16)[0] == (0, 1, 2, 3) and split_layers(61, 16)[-1] == (58, 59, 60)
    v3 = dsl.load(EXAMPLES / "deepseek_v3.dsv")
    lay = even_layout(v3, 120)
    assert len(lay) == 16
    for i, (a, b) in enumerate(lay):
        assert (a.index, b.index) == (i, 31 - i)  # DualPipe: stage i of A, PP-1-i of B
        assert a.in_flight + b.in_flight == 16 + 1  # PP + 1 on every device
        assert a.micro_batches == b.micro_batches == 60  # each direction takes half
    assert lay[0][0].embedding and lay[0][1].head and lay[0][1].mtp == 1
    copy_a = [s for dev in lay for s in dev if s.index < 16]
    assert sorted(i for s in copy_a for i in s.layers) == list(range(61))
    tiny = dsl.load(EXAMPLES / "tiny.dsv")  # 1F1B: device i holds PP - i micro-batches
    assert [dev[0].in_flight for dev in even_layout(tiny, 4)] == [2, 1]
    text = (EXAMPLES / "deepseek_v3.dsv").read_text().replace("dualpipe", "dualpipev")
    vee = even_layout(dsl.loads(text, str(EXAMPLES / "v.dsv")), 120)
    assert len(vee) == 16 and [s.index for s in vee[3]] == [3, 28]
    assert {a.in_flight + b.in_flight for a, b in vee} == {33}  # 2R + 1


def test_dense_gqa_memory_by_hand():
    r = build_report(dsl.load(SPECS / "llama3_8b_gqa.dsv"))  # bf16, ZeRO-1, PP 2, DP 32
    d, V, T = 4096, 128256, 8192
    layer = (4096 * 4096 * 2 + 2 * 4096 * 1024) + 3 * 4096 * 14336 + 2 * d
    p0 = V * d + 16 * layer  # stage 0: embedding + layers 0..15
    shard = -(-p0 // 32)  # ZeRO-1 over 32 data-parallel ranks, padded
    assert r.value("memory.devices.0.weights") == 4 * p0  # fp32 parameters
    assert r.value("memory.devices.0.master_weights") == 0  # the parameters' own shard
    assert r.value("memory.devices.0.grads") == 4 * p0
    # fp32 moments (the spec's optimizer_states); no per-element masks
    assert r.value("memory.devices.0.optimizer_states") == 2 * 4 * shard
    # bf16 linears keep their input and a bf16 copy of their weight per micro-batch
    lin = lambda k, n: 2 * k * T + 2 * k * n  # noqa: E731
    norm = 2 * d * T + 4 * T  # norms compute in bf16 here: the input itself, the RMS
    gqa = (norm + lin(d, 4096) + 2 * lin(d, 1024) + 2 * (3 * 4096 + 4096) * T + 4 * 32 * T
           + lin(4096, d))  # q, k and v repeated to 32 heads, output, lse
    ffn = norm + 2 * lin(d, 14336) + 3 * 2 * 14336 * T + lin(14336, d)
    acts = 2 * 16 * (gqa + ffn) + 2 * 8 * T  # 2 micro-batches in flight, + the token ids
    assert r.value("memory.devices.0.activations") == acts
    rope = 16 * 2 * 4 * spec_max_seq(SPECS / "llama3_8b_gqa.dsv") * 64
    assert r.value("memory.devices.0.buffers") == rope  # cos and sin per attention
    # 8192 tokens per micro-batch, two in flight: it needs recomputation to fit in 80 GiB
    assert r.value("memory.fits") is False
    full = build_report(dsl.load(SPECS / "llama3_8b_gqa.dsv", ["train.recompute=full"]))
    assert full.value("memory.fits") is True
    assert math.isclose(r.value("memory.usable_bytes"), 80 * 2**30 * (1 - RESERVE_FRACTION))  # 80 GiB H800


def spec_max_seq(path) -> int:
    return dsl.load(path).model.max_seq


def test_a_given_layout_replaces_the_even_split():
    spec = dsl.load(SPECS / "llama3_8b_gqa.dsv")

    def lopsided(spec, M):  # 20 layers + embedding on device 0, 12 + head on device 1
        return [(StageContents(0, 0, tuple(range(20)), embedding=True, in_flight=2,
                               micro_batches=M),),
                (StageContents(1, 1, tuple(range(20, 32)), head=True, in_flight=1,
                               micro_batches=M),)]

    even, given = build_report(spec), build_report(spec, layout=lopsided)
    layer = (4096 * 4096 * 2 + 2 * 4096 * 1024) + 3 * 4096 * 14336 + 2 * 4096
    assert given.value("memory.devices.0.weights") - even.value("memory.devices.0.weights") == \
        4 * 4 * layer  # four more layers of fp32 parameters
    assert given.value("memory.devices.0.layers") == 20
    assert not any("split evenly" in n for n in given.notes)


def test_v3_devices():
    r = build_report(dsl.load(EXAMPLES / "deepseek_v3.dsv"))
    rows = [r.value(f"memory.devices.{i}.total") for i in range(16)]
    assert r.value("memory.max_gpu_bytes") == max(rows)
    # the even split gives devices 3-12 four MoE layers of each copy and device 0 (and 15)
    # the first and the last stage (DualPipe): the embedding, three dense layers and one
    # MoE layer, the head and MTP. Their fp32 weights and gradients (the embedding and
    # the head 129280 x 7168 each; no master copy: the parameters are their own) outweigh
    # the activations device 3 keeps beyond device 0's (since the experts apply the gates
    # themselves, no MoE layer keeps its experts' outputs), so the busiest is device 0
    # (the first of the equal ones is named); DualPipe's copies mirror them
    acts = [r.value(f"memory.devices.{i}.activations") for i in range(16)]
    assert r.value("memory.max_device") == 0 and max(rows) == rows[0] == rows[15] > rows[3]
    assert rows[3] == rows[12]
    assert acts[3] > acts[0] and r.value("memory.devices.0.weights") > r.value(
        "memory.devices.3.weights")
    assert rows == rows[::-1]
    # DualPipe holds two stages' parameters: device 5 has 4 layers of each copy, all MoE
    layer = 187_114_496 + 11_320_171_520 - 256 * 3 * 7168 * 2048 + 4 * 3 * 7168 * 2048
    assert r.value("memory.devices.5.params") == 8 * layer
    assert r.value("memory.fits") == (max(rows) <= r.value("memory.usable_bytes"))


# ----------------------------------------------------------------------------- properties


def moe_spec(expert: int, routed: int, hidden: int, layers: int, pipeline: int, top_k: int):
    return f"""
cluster c {{
  nodes = 2
  gpus_per_node = 8
  gpu = g {{ bf16 = 989 TFLOPS, fp8 = 1979 TFLOPS, memory = 80 GB, hbm = 3 TB/s }}
  nvlink {{ bandwidth = 400 GB/s, effective = 160 GB/s }}
  network infiniband {{ nic = 400 Gb/s, effective = 40 GB/s }}
}}
model m {{
  vocab = 1024
  hidden = {hidden}
  attention mla {{ heads = 4, q_lora_rank = 64, kv_lora_rank = 64, qk_nope_dim = 32,
                   qk_rope_dim = 16, v_dim = 32 }}
  ffn moe {{ routed = {routed}, shared = 1, top_k = {top_k}, intermediate = 128 }}
  layers {{ 0..{layers - 1} = block(mla, moe) }}
}}
parallel {{ pipeline = {pipeline}, expert = {expert}, zero = 1 }}
train {{ seq_len = 128, global_batch = 64 }}
"""


@settings(max_examples=15, deadline=None)
@given(ep=st.sampled_from([1, 2, 4]), routed=st.sampled_from([8, 16, 32]),
       hidden=st.sampled_from([128, 256]), layers=st.integers(2, 6),
       pipeline=st.sampled_from([1, 2]), top_k=st.integers(1, 4))
def test_doubling_ep_halves_expert_parameters_per_gpu(ep, routed, hidden, layers, pipeline,
                                                      top_k):
    a = build_report(dsl.loads(moe_spec(ep, routed, hidden, layers, pipeline, top_k), "a.dsv"))
    b = build_report(dsl.loads(moe_spec(2 * ep, routed, hidden, layers, pipeline, top_k), "b.dsv"))
    for i in range(pipeline):
        n = a.value(f"memory.devices.{i}.layers")  # MoE layers on the device
        expert = n * routed * 3 * hidden * 128  # every routed expert of those layers
        pa, pb = a.value(f"memory.devices.{i}.params"), b.value(f"memory.devices.{i}.params")
        assert pa - pb == expert // ep - expert // (2 * ep)


def model_spec(att: str, hidden: int, n_dense: int, n_moe: int, routed: int, top_k: int):
    attention = ("attention mla { heads = 4, q_lora_rank = 0, kv_lora_rank = 32, "
                 "qk_nope_dim = 16, qk_rope_dim = 8, v_dim = 16 }" if att == "mla" else
                 "attention gqa { heads = 4, kv_heads = 2 }")
    layout = []
    if n_dense:
        layout.append(f"0..{n_dense - 1} = block({att}, dense)")
    if n_moe:
        layout.append(f"{n_dense}..{n_dense + n_moe - 1} = block({att}, moe)")
    return (f"model m {{\n vocab = 512\n hidden = {hidden}\n {attention}\n"
            f" ffn dense {{ intermediate = {3 * hidden} }}\n"
            f" ffn moe {{ routed = {routed}, shared = 1, top_k = {top_k}, intermediate = 64 }}\n"
            f" layers {{ {chr(10).join(layout)} }}\n mtp {{ depth = 1 }}\n}}\n"
            f"train {{ seq_len = 256, global_batch = 8 }}\n")


PER_LAYER = ("params", "params_active", "train_flops_per_token")


@settings(max_examples=20, deadline=None)
@given(att=st.sampled_from(["mla", "gqa"]), hidden=st.sampled_from([64, 128]),
       n_dense=st.integers(1, 3), n_moe=st.integers(1, 4), routed=st.sampled_from([4, 8]),
       top_k=st.integers(1, 3), grow=st.sampled_from(["dense", "moe"]))
def test_adding_a_layer_adds_exactly_one_layer(att, hidden, n_dense, n_moe, routed, top_k, grow):
    a = build_report(dsl.loads(model_spec(att, hidden, n_dense, n_moe, routed, top_k), "a.dsv"))
    more = (n_dense + 1, n_moe) if grow == "dense" else (n_dense, n_moe + 1)
    b = build_report(dsl.loads(model_spec(att, hidden, *more, routed, top_k), "b.dsv"))
    grown, other = f"model.layers.{att}+{grow}", \
        f"model.layers.{att}+{'moe' if grow == 'dense' else 'dense'}"
    assert b.value(f"{grown}.count") == a.value(f"{grown}.count") + 1
    for field in PER_LAYER:
        one = a.value(f"{grown}.{field}") / a.value(f"{grown}.count")
        assert math.isclose(b.value(f"{grown}.{field}") - a.value(f"{grown}.{field}"), one,
                            rel_tol=1e-12)
        assert b.value(f"{other}.{field}") == a.value(f"{other}.{field}")
    layer = a.value(f"{grown}.params") // a.value(f"{grown}.count")
    assert b.value("model.params_total") - a.value("model.params_total") == layer
    kv = a.value("model.kv_cache_bytes_per_token")
    assert b.value("model.kv_cache_bytes_per_token") - kv == kv // (n_dense + n_moe)


def test_transients_charge_the_exchange_of_sharded_groups_only():
    # runtime/optim.py: a ZeRO-1 group sharded over n > 1 ranks allocates its reduce-
    # scattered shard and the all-gather's input (fp32 each) during the step; a group of
    # one rank steps its buffer in place. DeepSeek-V3's experts at EP 64: over 2,048 GPUs
    # (DP 128) each expert is held by EDP = 2 ranks, over 1,024 (DP 64) by one
    from dsvc.runtime.plan import OPTIMIZER_UPDATE_PIECE

    update = 3 * 4 * OPTIMIZER_UPDATE_PIECE  # fp32 temporaries of one piece of the update
    for nodes, edp in ((256, 2), (128, 1)):
        r = build_report(dsl.load(EXAMPLES / "deepseek_v3.dsv", (f"cluster.nodes={nodes}",)))
        dev = 5  # MoE layers only: no loss piece
        shards = r.value(f"memory.devices.{dev}.optimizer_states") / (2 * 2)  # bf16 m, v
        exchange = r.value(f"memory.devices.{dev}.transients") - update
        if edp > 1:  # the experts' half shard (nearly all of the device's) both ways
            assert 0.95 * 8 * shards < exchange <= 8 * shards
        else:  # only the dense group's 1/64 shard (2% of the device's shards)
            assert 0 < exchange < 0.05 * 8 * shards
