"""Small real specs for the schedule and simulate pass tests: `make_spec(kind, pp, ...)`
writes a DeepSeek-V3-shaped toy model (MLA, one dense and N-1 MoE layers, MTP) on an
H800-like cluster, so the passes run end to end in a fraction of a second."""

from __future__ import annotations

import pytest

from dsvc import dsl

TEMPLATE = """
cluster toy {{
  nodes = {nodes}
  gpus_per_node = {gpn}
  gpu = h800 {{ bf16 = 989 TFLOPS, fp8 = 1979 TFLOPS, memory = 80 GB, hbm = 3.35 TB/s }}
  nvlink {{ domain = {gpn}, bandwidth = 400 GB/s, effective = 160 GB/s }}
  network infiniband {{ nic = 400 Gb/s, effective = 40 GB/s }}
}}
model toy {{
  vocab = 512
  hidden = 128
  max_seq = 256
  attention mla {{ heads = 4, q_lora_rank = 128, kv_lora_rank = 128, qk_nope_dim = 32, qk_rope_dim = 16, v_dim = 32 }}
  ffn dense {{ intermediate = 256 }}
  ffn moe {{ routed = 8, shared = 1, top_k = 2, intermediate = 128, score = sigmoid }}
  layers {{
    0 = block(mla, dense)
    1..{last} = block(mla, moe)
  }}
  mtp {{ depth = {mtp}, loss_weight = 0.3 }}
}}
precision fp8 {{
  default = bf16
  linear = fp8_e4m3 {{ act = tile(1, 128), weight = block(128, 128), accumulate = fp32, promote_every = 128 }}
  dispatch = fp8_e4m3
}}
parallel {{
  pipeline = {pp}
  expert = {ep}
  zero = 1
  schedule = {kind}
  overlap = {overlap}
}}
train {{
  seq_len = {seq}
  global_batch = {gb}
  micro_batch = 1
}}
"""


def min_microbatches(kind: str, pp: int) -> int:
    """The fewest micro-batches the spec rules accept for `kind` over `pp` ranks."""
    return {"1f1b": 1, "zb1p": 1, "dualpipe": 4 * pp, "dualpipev": 2 * pp}[kind]


def make_spec(kind: str, pp: int, *, microbatches: int | None = None, data: int = 2,
              ep: int = 2, gpus_per_node: int = 2, overlap: str = "dual_microbatch",
              layers: int = 8, mtp: int = 1, seq: int = 64):
    """A checked Spec of the toy model; world = pp x data GPUs."""
    mb = microbatches if microbatches is not None else max(4, min_microbatches(kind, pp))
    world = pp * data
    assert world % gpus_per_node == 0
    text = TEMPLATE.format(nodes=world // gpus_per_node, gpn=gpus_per_node, last=layers - 1,
                           mtp=mtp, pp=pp, ep=ep, kind=kind, overlap=overlap, gb=mb * data,
                           seq=seq)
    return dsl.loads(text, filename="toy.dsv")


@pytest.mark.parametrize("kind,pp", [("1f1b", 4), ("zb1p", 2), ("dualpipe", 2), ("dualpipev", 2)])
def test_toy_specs_load_with_the_requested_plan(kind, pp):
    spec = make_spec(kind, pp)
    assert spec.parallel.schedule == kind and spec.parallel.pipeline == pp
    assert spec.micro_batches == max(4, min_microbatches(kind, pp))
    assert spec.cluster.world_size == pp * spec.parallel.data
