"""Property tests of the graph passes on random small specs (built as .dsv text).

Every op on exactly one stage; summed stage FLOPs equal the graph's; every
routed expert on at least one EP rank; lowering preserves the parameter count
and the FLOPs `dsvc report` computes; stage layouts follow the schedule's rule.
`spec_text` also serves the other compiler tests as a small-spec builder.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsvc import dsl
from dsvc.compiler.driver import run_until
from dsvc.compiler.printer import stage_rows

_SETTINGS = settings(max_examples=30, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def spec_text(*, layers=4, dense_layers=1, attention="mla", hidden=64, heads=4, kv_heads=2,
              routed=8, top_k=2, shared=1, groups=1, top_groups=1, mtp=1, nodes=2, gpn=2,
              pipeline=2, expert=2, schedule="1f1b", micro_batches=8, default="bf16",
              linear="fp8_e4m3", extra_parallel="", keep="bf16 = [embedding, head, router, "
              "attention_core], fp32 = [norm]") -> str:
    """A small, valid spec; dense layers first, then MoE layers (when `routed`)."""
    if attention == "mla":
        att = (f"attention att {{ kind = mla, heads = {heads}, q_lora_rank = 32, "
               "kv_lora_rank = 32, qk_nope_dim = 16, qk_rope_dim = 8, v_dim = 16 }")
    else:
        att = f"attention att {{ kind = gqa, heads = {heads}, kv_heads = {kv_heads}, head_dim = 16 }}"
    moe = (f"ffn moe {{ routed = {routed}, shared = {shared}, top_k = {top_k}, intermediate = 32, "
           f"score = sigmoid, groups = {groups}, top_groups = {top_groups} }}") if routed else ""
    rows = []
    if dense_layers:
        rows.append(f"{'0' if dense_layers == 1 else f'0..{dense_layers - 1}'} = block(att, dense)")
    if layers > dense_layers:
        ffn = "moe" if routed else "dense"
        lo, hi = dense_layers, layers - 1
        rows.append(f"{lo if lo == hi else f'{lo}..{hi}'} = block(att, {ffn})")
    data = nodes * gpn // pipeline
    lin = linear
    if linear == "fp8_e4m3":  # small dims: pad ragged K to the 128 tile
        lin = "fp8_e4m3 { act = tile(1, 128), weight = block(128, 128), pad = true }"
    return f"""
cluster c {{
  nodes = {nodes}
  gpus_per_node = {gpn}
  gpu = g {{ bf16 = 100 TFLOPS, fp8 = 200 TFLOPS, memory = 80 GB, hbm = 2 TB/s }}
  nvlink {{ domain = {gpn}, bandwidth = 100 GB/s, effective = 50 GB/s }}
  network infiniband {{ nic = 100 Gb/s, effective = 10 GB/s }}
}}
model m {{
  vocab = 256
  hidden = {hidden}
  max_seq = 64
  {att}
  ffn dense {{ intermediate = 128 }}
  {moe}
  layers {{
    {(chr(10) + "    ").join(rows)}
  }}
  mtp {{ depth = {mtp}, loss_weight = 0.3 }}
}}
precision p {{
  default = {default}
  linear = {lin}
  keep {{ {keep} }}
  dispatch = {"fp8_e4m3" if linear.startswith("fp8") else default}
  combine = bf16
}}
parallel {{ pipeline = {pipeline}, expert = {expert}, schedule = {schedule} {extra_parallel} }}
train {{ seq_len = 64, global_batch = {micro_batches * data}, micro_batch = 1, optimizer = adamw(lr = 1e-3) }}
"""


def load(text: str):
    return dsl.loads(text, "props.dsv")


@st.composite
def small_specs(draw):
    nodes = draw(st.sampled_from([1, 2, 4]))
    gpn = draw(st.sampled_from([1, 2, 4]))
    world = nodes * gpn
    schedule = draw(st.sampled_from(["1f1b", "zb1p", "dualpipe", "dualpipev"]))
    ranks = [p for p in (1, 2, 4) if world % p == 0 and not (schedule == "dualpipe" and p % 2)]
    if not ranks:  # one GPU: DualPipe needs an even number of ranks
        schedule, ranks = "1f1b", [1]
    pipeline = draw(st.sampled_from(ranks))
    stages = 2 * pipeline if schedule in ("dualpipe", "dualpipev") else pipeline
    layers = draw(st.integers(max(stages, 2), 8))
    dense = draw(st.integers(0, min(2, layers)))
    data = world // pipeline
    routed = draw(st.sampled_from([0, 8, 16])) if dense < layers else 0
    experts = [e for e in (1, 2, 4) if data % e == 0 and (routed == 0 or routed % e == 0)]
    expert = draw(st.sampled_from(experts)) if routed else 1
    groups = 1
    if routed and expert > gpn and routed % (expert // gpn) == 0:
        groups = expert // gpn  # one routing group per node the EP group spans
    return spec_text(
        layers=layers, dense_layers=dense, attention=draw(st.sampled_from(["mla", "gqa"])),
        routed=routed, top_k=draw(st.sampled_from([1, 2])), shared=draw(st.sampled_from([0, 1])),
        groups=groups, top_groups=max(1, groups // 2), mtp=draw(st.integers(0, 2)), nodes=nodes,
        gpn=gpn, pipeline=pipeline, expert=expert, schedule=schedule,
        micro_batches=4 * stages, linear=draw(st.sampled_from(["fp8_e4m3", "bf16"])))


@_SETTINGS
@given(small_specs())
def test_partition_and_placement_properties(text):
    spec = load(text)
    g = run_until(spec, "insert_comm")
    pipe = g.partition
    ops = g.ops()
    assert all(op.stage is not None and 0 <= op.stage < pipe.parts for op in ops)
    assert len({op.name for op in ops}) == len(ops) == len(g)
    per_copy = [r for r in stage_rows(g) if r["copy"] == "A"]
    total = sum(g.num(op.flops) for op in ops)
    assert sum(r["flops"] for r in per_copy) == pytest.approx(total, rel=1e-12)
    for copy in {s.copy for s in pipe.stages}:
        chain = sorted((s for s in pipe.stages if s.copy == copy), key=lambda s: s.index)
        assert [i for s in chain for i in s.layers] == list(range(spec.model.num_layers))
    devices = {s.index: s.device for s in pipe.stages}
    if pipe.schedule == "dualpipev":
        assert all(devices[i] == min(i, pipe.parts - 1 - i) for i in devices)
    if pipe.schedule == "dualpipe":
        assert all(devices[pipe.parts + p] == pipe.parts - 1 - p for p in range(pipe.parts))
    for place in g.placements().values():
        held = {e for ids in place.per_rank for e in ids}
        assert held == set(range(place.routed))


@_SETTINGS
@given(small_specs())
def test_lowering_preserves_report_params_and_flops(text):
    from dsvc.compiler.driver import build_report

    spec = load(text)
    g = run_until(spec, "lower")
    r = build_report(spec)
    ops = g.ops()
    assert sum(op.param_count for op in ops if op.block != "mtp") == r.value("model.params_total")
    assert sum(op.param_count for op in ops if op.block == "mtp") == r.value("model.params_mtp")
    flops = sum(g.num(op.flops) for op in ops if op.block != "mtp") / g.tokens
    assert flops == pytest.approx(r.value("model.train_flops_per_token"), rel=1e-9)
