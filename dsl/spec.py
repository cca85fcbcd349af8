"""The Spec: what a .dsv file means, as frozen dataclasses in base units.

Produced by `dsl.elaborate` (which has already checked every rule); consumed by
the report, the compiler passes and codegen. All quantities are in base units:
bytes, bytes/s, FLOP/s, seconds, USD. `Spec.spans` maps a dotted path
(`"model.ffn.moe.top_k"`) to where it was written, so later stages can cite
the source. Change a record with `dataclasses.replace`; `as_dict` gives the
plain form (without spans).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Union

from dsvc.dsl.diagnostics import Span, nearest_span


def record(cls):
    """A frozen, keyword-only dataclass. Elaboration hands it ints where a field is a float
    and lists where it is a tuple; both are normalised here, so that equal specs compare,
    hash and print equal however a value was written."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    floats = tuple(f.name for f in dataclasses.fields(cls) if f.type == "float")
    tuples = tuple(f.name for f in dataclasses.fields(cls) if "tuple[" in f.type)
    if floats or tuples:
        def __post_init__(self):  # noqa: N807 - the dataclass hook
            for name in floats:
                v = getattr(self, name)
                if isinstance(v, int) and not isinstance(v, bool):
                    object.__setattr__(self, name, float(v))
            for name in tuples:
                v = getattr(self, name)
                if isinstance(v, list):
                    object.__setattr__(self, name, tuple(v))

        cls.__post_init__ = __post_init__
    return cls


def as_dict(obj):
    """A record as plain dicts, lists and values (fields marked `dump: False` left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("dump", True)}
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(as_dict(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- model


@record
class RMSNorm:
    eps: float = 1e-6


@record
class Rope:
    kind: Literal["plain", "yarn"] = "plain"
    theta: float = 10000.0
    # YaRN only
    factor: float = 1.0
    original_max_seq: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@record
class MLA:
    kind: Literal["mla"] = "mla"
    name: str
    heads: int
    q_lora_rank: int  # 0: a plain q projection (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim


@record
class GQA:
    """Multi-head (kv_heads == heads), grouped-query or multi-query attention."""

    kind: Literal["gqa"] = "gqa"
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False


Attention = Union[MLA, GQA]  # noqa: UP007 - a runtime alias (for isinstance-free typing)


@record
class DenseFFN:
    kind: Literal["dense"] = "dense"
    name: str
    intermediate: int
    act: Literal["swiglu"] = "swiglu"


@record
class MoE:
    kind: Literal["moe"] = "moe"
    name: str
    routed: int
    shared: int
    top_k: int
    intermediate: int  # of one routed expert
    shared_intermediate: int  # of one shared expert (defaults to `intermediate`)
    score: Literal["softmax", "sigmoid"] = "softmax"
    groups: int = 1
    top_groups: int = 1
    route_scale: float = 1.0
    renormalize: bool = True  # gate weights renormalised over the chosen top_k
    balance: Literal["none", "bias"] = "none"
    bias_update_rate: float = 0.0
    seq_aux_loss: float = 0.0
    act: Literal["swiglu"] = "swiglu"


FFN = Union[DenseFFN, MoE]  # noqa: UP007 - as Attention


@record
class LayerSpec:
    attention: str
    ffn: str


@record
class MTP:
    depth: int = 0
    loss_weight: float = 0.0


@record
class Model:
    name: str
    vocab: int
    hidden: int
    max_seq: int = 4096
    tie_embeddings: bool = False
    norm: RMSNorm = RMSNorm()
    rope: Rope = Rope()
    attentions: dict[str, Attention]
    ffns: dict[str, FFN]
    layers: tuple[LayerSpec, ...]
    mtp: MTP = MTP()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention_of(self, layer: int) -> Attention:
        return self.attentions[self.layers[layer].attention]

    def ffn_of(self, layer: int) -> FFN:
        return self.ffns[self.layers[layer].ffn]


# ----------------------------------------------------------------------------- precision

Dtype = Literal["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"]

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1}

# Components a precision policy can keep in higher precision.
COMPONENTS = ("embedding", "head", "router", "attention_core", "norm", "mtp_projection")


@record
class LinearPrecision:
    format: Dtype = "bf16"
    act_tile: tuple[int, int] = (1, 128)  # (tokens, channels) per activation scale
    weight_block: tuple[int, int] = (128, 128)
    accumulate: Dtype = "fp32"
    promote_every: int = 128
    scales: Literal["fp32", "ue8m0"] = "fp32"
    pad: bool = False  # pad ragged K to a tile multiple instead of rejecting it

    @property
    def is_fp8(self) -> bool:
        return self.format.startswith("fp8")


@record
class Precision:
    name: str = "default"
    default: Dtype = "bf16"
    master_weights: Dtype = "fp32"
    grads: Dtype = "fp32"
    optimizer_states: Dtype = "fp32"
    linear: LinearPrecision = LinearPrecision()
    keep: dict[str, Dtype] = dataclasses.field(default_factory=dict)  # component -> dtype
    dispatch: Dtype = "bf16"
    combine: Dtype = "bf16"
    # The generated program keeps SwiGLU's inputs for the backward in FP8 (+ scales).
    cache_fp8_activations: bool = True

    def dtype_of(self, component: str) -> str:
        """The compute/storage dtype of a non-linear component."""
        return self.keep.get(component, self.default)

    def compute_dtype(self, component: str) -> str:
        """The format a GEMM of `component` computes in: the linear format for the model's
        linears (`linear`, `mtp_projection`), else its kept dtype, `default` when not kept:
        the runtime runs the router, the output head and the attention core outside FP8
        whatever the policy (its plan keeps them, runtime/plan.py KEPT_COMPONENTS)."""
        if component in ("linear", "mtp_projection") and component not in self.keep:
            return self.linear.format
        return self.dtype_of(component)


# ----------------------------------------------------------------------------- cluster


@record
class GPU:
    name: str
    bf16_flops: float  # FLOP/s, dense peak
    fp8_flops: float
    memory: float  # bytes
    hbm: float  # bytes/s
    # Fractions of peak the compute model assumes (settable; defaults measured
    # on an H200: see docs/report.md).
    gemm_efficiency_bf16: float = 0.67
    gemm_efficiency_fp8: float = 0.51
    memory_efficiency: float = 0.89


@record
class NVLink:
    domain: int  # GPUs in one NVLink domain (8 per node, or 72 for an NVL72 rack)
    bandwidth: float  # bytes/s per GPU, nominal
    effective: float  # bytes/s per GPU, achieved
    latency: float = 3.33e-6


@record
class FatTree:
    layers: int = 2
    radix: int = 64
    planes: int = 1
    switch_price: float = 0.0  # USD
    link_price: float = 0.0  # USD per switch-to-switch link


@record
class Network:
    kind: Literal["infiniband", "roce", "ethernet", "none"] = "infiniband"
    nic: float  # bytes/s per GPU, line rate
    effective: float  # bytes/s per GPU, achieved
    latency: float = 2.8e-6  # same leaf
    latency_cross: float = 3.7e-6  # across leaves
    topology: FatTree | None = None


@record
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int
    gpu: GPU
    nvlink: NVLink
    network: Network | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


# ----------------------------------------------------------------------------- decode


@record
class Decode:
    tokens_per_device: int = 32
    experts_per_device: int = 1
    link: Literal["nic", "effective", "nvlink"] = "nic"
    hidden: int | None = None  # override the model's hidden size (the paper rounds to 7000)
    dispatch_bytes: float = 1.0  # per element
    combine_bytes: float = 2.0


# ----------------------------------------------------------------------------- parallel / train

ScheduleKind = Literal["1f1b", "zb1p", "dualpipe", "dualpipev"]


@record
class Parallel:
    pipeline: int = 1  # pipeline ranks
    data: int  # data-parallel degree (derived: world / pipeline)
    expert: int = 1  # expert-parallel degree, inside the data dimension
    zero: int = 1  # ZeRO stage of the data-parallel optimizer
    schedule: ScheduleKind = "1f1b"
    overlap: Literal["none", "dual_microbatch"] = "none"
    layers_per_stage: tuple[int, ...] | None = None  # explicit layout (overrides the balancer)
    expert_load: str | None = None  # path of a load histogram (EPLB-style placement)
    redundant_experts: int = 0
    two_hop: bool = True  # node-limited two-hop all-to-all (IB then NVLink)

    @property
    def num_stages(self) -> int:
        """Pipeline stages (PP of the published formulas) for this schedule."""
        if self.schedule in ("dualpipe", "dualpipev"):
            return 2 * self.pipeline
        return self.pipeline

    @property
    def stages_per_copy(self) -> int:
        """Stages one copy of the model is cut into: `pipeline` for 1F1B, ZB1P and DualPipe
        (whose two copies have `pipeline` stages each), 2 x `pipeline` for DualPipeV."""
        return 2 * self.pipeline if self.schedule == "dualpipev" else self.pipeline

    @property
    def expert_data(self) -> int:
        return self.data // self.expert


@record
class AdamW:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@record
class LRSchedule:
    kind: Literal["constant", "warmup_cosine"] = "constant"
    warmup_steps: int = 0
    final_lr: float = 0.0
    total_steps: int | None = None


@record
class Data:
    kind: Literal["synthetic", "tokens"] = "synthetic"
    path: str | None = None
    dtype: Literal["uint16", "uint32"] = "uint32"


@record
class Checkpoint:
    every: int = 0  # steps; 0 = never
    dir: str = "checkpoints"


@record
class Train:
    seq_len: int
    global_batch: int
    micro_batch: int = 1
    steps: int = 100
    optimizer: AdamW = AdamW()
    lr_schedule: LRSchedule = LRSchedule()
    data: Data = Data()
    checkpoint: Checkpoint = Checkpoint()
    seed: int = 0
    # Activations recomputed in backward instead of kept: `selective` (DeepSeek-V3's: every
    # RMSNorm, the MLA up-projections before the attention core, SwiGLU's output) or `full`
    # (each decoder layer keeps its input only).
    recompute: Literal["none", "selective", "full"] = "none"


# ----------------------------------------------------------------------------- the whole spec


@record
class Spec:
    """A checked .dsv specification. Blocks a file does not have are None."""

    file: str
    model: Model
    precision: Precision = Precision()
    cluster: Cluster | None = None
    parallel: Parallel | None = None
    train: Train | None = None
    decode: Decode | None = None
    spans: dict[str, Span] = dataclasses.field(default_factory=dict, repr=False,
                                               metadata={"dump": False})
    files: tuple[str, ...] = ()  # the file and every include, in load order
    content_hash: str = ""  # sha256 of the sources, for build caching and provenance

    def span(self, path: str) -> Span | None:
        """The source span of a dotted path, or of its nearest written parent."""
        return nearest_span(self.spans, path)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step per pipeline: global_batch / (data x micro_batch)."""
        assert self.train is not None and self.parallel is not None
        return self.train.global_batch // (self.parallel.data * self.train.micro_batch)
