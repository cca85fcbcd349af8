"""`plan.json`: the compiled plan the runtime executes, loaded and validated.

The plan is the runtime's only input besides weights (see docs/plan.md for
every key). This module turns the JSON into frozen dataclasses and checks it,
collecting every problem into one `PlanError` whose lines name the offending
key (`model.ffn.moe.top_k: ...`). Standard library only: a build directory
must load its plan without dsvc installed.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from ._plan_read import PlanError, Reader

PLAN_VERSION = 1

LINEAR_ROLES = (
    "q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj",
    "shared_experts", "experts", "eh_proj",
)  # fmt: skip
KEPT_COMPONENTS = ("embedding", "head", "router", "attention_core", "norm")
DTYPES = ("fp32", "bf16")
SCHEDULE_KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")

__all__ = ["PLAN_VERSION", "Plan", "PlanError", "load_plan", "parse_plan"]


@dataclasses.dataclass(frozen=True)
class Rope:
    kind: str  # "plain" | "yarn"
    theta: float
    factor: float = 1.0
    original_max_seq: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float | None = None  # None: a plan that omits it (see below)

    @property
    def effective_mscale_all_dim(self) -> float:
        """The softmax-scale mscale (DeepSeek-V2/V3's `mscale_all_dim`); unset, `mscale`,
        the single factor of DeepSeek-V3's reference (plan v1's rule)."""
        return self.mscale if self.mscale_all_dim is None else self.mscale_all_dim


@dataclasses.dataclass(frozen=True)
class Attention:
    kind: str  # "mla" | "gqa"
    heads: int
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_dim: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    qkv_bias: bool = False  # gqa: q_proj, k_proj, v_proj carry biases (Qwen2)


@dataclasses.dataclass(frozen=True)
class Ffn:
    kind: str  # "dense" | "moe"
    intermediate: int
    routed: int = 0
    shared: int = 0
    top_k: int = 0
    shared_intermediate: int = 0
    score: str = "sigmoid"
    groups: int = 1
    top_groups: int = 1
    route_scale: float = 1.0
    bias_update_rate: float = 0.0
    seq_aux_loss: float = 0.0
    renormalize: bool | None = None  # None: a plan that omits it (see below)

    @property
    def effective_renormalize(self) -> bool:
        """Whether gate weights are divided by their sum over the chosen top_k; unset,
        plan v1's rule: sigmoid scores yes, softmax scores no."""
        return self.score == "sigmoid" if self.renormalize is None else self.renormalize


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    attention: str
    ffn: str


@dataclasses.dataclass(frozen=True)
class Mtp:
    depth: int = 0
    loss_weight: float = 0.0
    attention: str = ""
    ffn: str = ""


@dataclasses.dataclass(frozen=True)
class Model:
    vocab: int
    hidden: int
    norm_eps: float
    max_seq_len: int
    rope: Rope
    attention: dict[str, Attention]
    ffn: dict[str, Ffn]
    layers: tuple[LayerSpec, ...]
    mtp: Mtp
    tie_embeddings: bool = False
    init_std: float = 0.02

    def mtp_block(self) -> LayerSpec:
        """The block inside each MTP module: as named, else the last layer's."""
        last = self.layers[-1]
        return LayerSpec(self.mtp.attention or last.attention, self.mtp.ffn or last.ffn)


@dataclasses.dataclass(frozen=True)
class LinearFormat:
    format: str  # "fp8_e4m3" | "bf16" | "fp32"
    act_tile: int = 128
    weight_block: tuple[int, int] = (128, 128)
    ue8m0: bool = False
    pad: bool = False  # fp8: zero-pad a ragged K up to a multiple of act_tile


@dataclasses.dataclass(frozen=True)
class Precision:
    default: str
    linear: LinearFormat
    linear_overrides: dict[str, LinearFormat]
    kept: dict[str, str]
    master_weights: str
    grads: str
    optimizer_states: str
    dispatch: str  # "fp8_e4m3" | "bf16" | "fp32"
    combine: str
    fp8_backend: str = "torch"

    def linear_for(self, role: str) -> LinearFormat:
        """The format of the linear named `role` (one of LINEAR_ROLES)."""
        return self.linear_overrides.get(role, self.linear)


@dataclasses.dataclass(frozen=True)
class Mesh:
    pipeline: int
    data: int
    expert: int
    world_size: int
    nodes: int = 0
    gpus_per_node: int = 0


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    rank: int
    copy: str
    layers: tuple[int, ...]
    embedding: bool
    head: bool
    mtp: bool


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    per_rank: tuple[tuple[int, ...], ...]
    group_of_expert: tuple[int, ...]
    two_hop: bool = False


@dataclasses.dataclass(frozen=True)
class Schedule:
    kind: str
    num_microbatches: int
    overlap: bool
    actions: dict[int, tuple[str, ...]]  # empty: use torch's own schedule class


@dataclasses.dataclass(frozen=True)
class Optimizer:
    kind: str
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float


@dataclasses.dataclass(frozen=True)
class LrSchedule:
    kind: str  # "warmup_cosine" | "constant"
    warmup_steps: int = 0
    final_lr: float = 0.0
    total_steps: int = 0


@dataclasses.dataclass(frozen=True)
class Data:
    kind: str  # "synthetic" | "tokens"
    path: str = ""
    dtype: str = "uint16"


@dataclasses.dataclass(frozen=True)
class Train:
    seq_len: int
    global_batch: int
    micro_batch: int
    optimizer: Optimizer
    lr_schedule: LrSchedule
    data: Data
    seed: int
    steps: int = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated plan. Build with `load_plan(path)` or `parse_plan(dict)`."""

    version: int
    model: Model
    precision: Precision
    mesh: Mesh
    stages: tuple[Stage, ...]
    experts: dict[str, ExpertPlacement]
    schedule: Schedule
    train: Train
    raw: dict = dataclasses.field(compare=False, repr=False, default_factory=dict)

    def stages_of_rank(self, pp_rank: int) -> list[Stage]:
        """The stages a pipeline coordinate holds, in increasing stage index."""
        return [s for s in self.stages if s.rank == pp_rank]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def layer_spec(self, index: int) -> tuple[Attention, Ffn]:
        spec = self.model.layers[index]
        return self.model.attention[spec.attention], self.model.ffn[spec.ffn]


def load_plan(path: str | pathlib.Path) -> Plan:
    """Read and validate `plan.json`; raises `PlanError` listing every problem."""
    from .inputs import InputError, load_json

    try:
        raw = load_json(path)
    except InputError as err:
        raise PlanError([f"{path}: cannot read the plan: {err.reason}"]) from None
    return parse_plan(raw, source=str(path))


def parse_plan(raw: Any, source: str = "plan") -> Plan:
    """Validate a plan given as a dict (the parsed JSON)."""
    from ._plan_check import check_plan
    from ._plan_parse import read_plan

    reader = Reader(source)
    plan = read_plan(reader, raw)
    if plan is not None:
        check_plan(reader, plan)
    reader.raise_if_errors()
    assert plan is not None
    return dataclasses.replace(plan, raw=raw)
