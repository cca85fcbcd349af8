"""`plan.json`: the contract between the compiler and the runtime, declared once.

The plan is the runtime's only input besides weights. These records are its one
schema: the compiler constructs them and writes `dump_plan(plan)`; the runtime
reads `load_plan(path)` / `parse_plan(dict)`, which type-check every key (errors
name the key path, unknown keys get a did-you-mean), then check the invariants of
`plan_check.py`; docs/plan.md's field tables are generated from the same
declarations (`plan_tables()`, kept current by a test). Every problem is
collected into one `PlanError`. Standard library only: a build directory must
load its plan without dsvc installed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from . import plan_check
from .inputs import JSON_BYTES, InputError, parse_json, read_bytes
from .schema import SchemaError, entry, field_table, read_partial, to_json

PLAN_VERSION = 1

LINEAR_ROLES = (
    "q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj",
    "shared_experts", "experts", "eh_proj",
)  # fmt: skip
KEPT_COMPONENTS = ("embedding", "head", "router", "attention_core", "norm")
DTYPES = ("fp32", "bf16")
FORMATS = ("fp8_e4m3", "bf16", "fp32")
SCHEDULE_KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")
RECOMPUTE = ("none", "selective", "full")
# What runs a run's decoder blocks (`dsvc train --program`, and what `dsvc report
# --program` costs): the build's generated stage program, or the eager modules
PROGRAM_CHOICES = ("generated", "eager")

__all__ = ["PLAN_VERSION", "Plan", "PlanError", "dump_plan", "load_plan", "parse_plan",
           "plan_tables"]

class PlanError(SchemaError):
    """A plan that cannot be executed; `problems` lists every reason, one a line."""

    what = "plan"


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class Rope:
    kind: str = entry("`plain` RoPE or `yarn` (applies only when `model.max_seq_len` exceeds "
                      "`original_max_seq`, as in DeepSeek-V3's reference)",
                      choices=("plain", "yarn"))
    theta: float = entry("rotary base", minimum=1.0)
    factor: float = entry("YaRN context extension factor", 1.0, minimum=1.0)
    original_max_seq: int = entry("YaRN: the context length before extension", 0, minimum=0)
    beta_fast: float = entry("YaRN correction range, fast end", 32.0)
    beta_slow: float = entry("YaRN correction range, slow end", 1.0)
    mscale: float = entry("YaRN magnitude: cos/sin carry m(mscale) / m(mscale_all_dim), with "
                          "m(x) = 0.1 x ln(factor) + 1", 1.0)
    mscale_all_dim: float | None = entry("YaRN magnitude of the softmax scale, which carries "
                                         "m(mscale_all_dim)^2; absent: equal to `mscale` (the "
                                         "single factor of DeepSeek-V3's reference)", None,
                                         minimum=0.0)

    @property
    def effective_mscale_all_dim(self) -> float:
        """The softmax-scale mscale (DeepSeek-V2/V3's `mscale_all_dim`); unset, `mscale`."""
        return self.mscale if self.mscale_all_dim is None else self.mscale_all_dim


_MLA, _GQA = ("mla",), ("gqa",)


@dataclasses.dataclass(frozen=True)
class Attention:
    kind: str = entry("`mla` (multi-head latent attention) or `gqa` (multi-head, grouped-query "
                      "or multi-query attention)", choices=("mla", "gqa"))
    heads: int = entry("attention heads", minimum=1)
    q_lora_rank: int = entry("query compression rank; 0: a plain `q_proj`", 0, minimum=0,
                             kinds=_MLA)
    kv_lora_rank: int = entry("key/value latent rank (what the KV cache holds)", 0, minimum=1,
                              kinds=_MLA, required=True)
    qk_nope_dim: int = entry("per-head query/key width without RoPE", 0, minimum=1, kinds=_MLA, required=True)
    qk_rope_dim: int = entry("per-head decoupled RoPE width (the RoPE key is shared by all "
                             "heads)", 0, minimum=2, kinds=_MLA, required=True)
    v_dim: int = entry("per-head value width", 0, minimum=1, kinds=_MLA, required=True)
    kv_heads: int | None = entry("key/value heads; absent: `heads` (multi-head attention)",
                                 None, minimum=1, kinds=_GQA)
    head_dim: int = entry("per-head width", 0, minimum=2, kinds=_GQA, required=True)
    qkv_bias: bool = entry("`q_proj`, `k_proj` and `v_proj` carry a bias each (Qwen2)", False,
                           kinds=_GQA)

    def __post_init__(self):
        if self.kind == "gqa" and self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)


@dataclasses.dataclass(frozen=True)
class Ffn:
    kind: str = entry("`dense` SwiGLU or `moe` (shared + routed SwiGLU experts)",
                      choices=("dense", "moe"))
    intermediate: int = entry("SwiGLU width (of one routed expert for `moe`)", minimum=1)
    routed: int = entry("routed experts", 0, minimum=1, kinds=("moe",), required=True)
    shared: int = entry("shared experts (always active)", 0, minimum=0, kinds=("moe",))
    top_k: int = entry("routed experts per token", 0, minimum=1, kinds=("moe",), required=True)
    shared_intermediate: int | None = entry("width of one shared expert; absent: "
                                            "`intermediate`", None, minimum=1, kinds=("moe",))
    score: str = entry("router score function", "sigmoid", choices=("softmax", "sigmoid"),
                       kinds=("moe",))
    groups: int = entry("expert groups (contiguous id ranges)", 1, minimum=1, kinds=("moe",))
    top_groups: int | None = entry("groups a token may reach, ranked by the sum of each "
                                   "group's two best biased scores; absent: `groups`", None,
                                   minimum=1, kinds=("moe",))
    route_scale: float = entry("gate weights are multiplied by it", 1.0, kinds=("moe",))
    bias_update_rate: float = entry("auxiliary-loss-free balancing step; 0 disables", 0.0,
                                    minimum=0.0, kinds=("moe",))
    seq_aux_loss: float = entry("weight of the sequence-wise balance loss; 0 disables", 0.0,
                                minimum=0.0, kinds=("moe",))
    renormalize: bool | None = entry("the chosen top_k gate weights are divided by their sum "
                                     "before `route_scale`; absent: true for sigmoid scores, "
                                     "false for softmax", None, kinds=("moe",))

    def __post_init__(self):
        if self.kind != "moe":
            return
        if self.shared_intermediate is None:
            object.__setattr__(self, "shared_intermediate", self.intermediate)
        if self.top_groups is None:
            object.__setattr__(self, "top_groups", self.groups)

    @property
    def effective_renormalize(self) -> bool:
        """Whether gate weights are divided by their sum over the chosen top_k; unset,
        sigmoid scores yes, softmax scores no."""
        return self.score == "sigmoid" if self.renormalize is None else self.renormalize


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    attention: str = entry("name of an entry of `model.attention`")
    ffn: str = entry("name of an entry of `model.ffn`")


@dataclasses.dataclass(frozen=True)
class Mtp:
    depth: int = entry("MTP modules; 0: none", 0, minimum=0)
    loss_weight: float = entry("the MTP losses are averaged over depth and multiplied by it",
                               0.0, minimum=0.0)
    attention: str = entry("attention of the MTP block; empty: the last layer's", "")
    ffn: str = entry("FFN of the MTP block; empty: the last layer's", "")


@dataclasses.dataclass(frozen=True)
class Model:
    vocab: int = entry("vocabulary size", minimum=2)
    hidden: int = entry("model width", minimum=1)
    max_seq_len: int = entry("longest sequence the model runs at; RoPE tables are built for it",
                             minimum=1)
    rope: Rope = entry("rotary embedding")
    attention: dict[str, Attention] = entry("named attention kinds")
    ffn: dict[str, Ffn] = entry("named FFN kinds")
    layers: tuple[LayerSpec, ...] = entry("one entry per layer, in order")
    norm_eps: float = entry("RMSNorm epsilon", 1e-6, minimum=0.0)
    mtp: Mtp = entry("multi-token prediction", factory=Mtp)
    tie_embeddings: bool = entry("the output head shares the embedding matrix", False)
    init_std: float = entry("standard deviation of initial weights (norm weights start at 1)",
                            0.02, minimum=0.0)

    def mtp_block(self) -> LayerSpec:
        """The block inside each MTP module: as named, else the last layer's."""
        last = self.layers[-1]
        return LayerSpec(self.mtp.attention or last.attention, self.mtp.ffn or last.ffn)


# ----------------------------------------------------------------------------- precision


@dataclasses.dataclass(frozen=True)
class LinearFormat:
    SHORTHAND = "format"  # "bf16" reads as {"format": "bf16"}

    format: str = entry("`fp8_e4m3`, `bf16` or `fp32`", choices=FORMATS)
    act_tile: int = entry("FP8: activation scale tile length along K (1 x act_tile per "
                          "token; act_tile x 1 per channel for wgrad)", 128, minimum=1)
    weight_block: tuple[int, int] = entry("FP8: weight scale block [rows, cols]; square and "
                                          "equal to `act_tile`", (128, 128), minimum=1)
    ue8m0: bool = entry("FP8: scales rounded up to powers of two", False)
    pad: bool = entry("FP8: a K that is not a multiple of `act_tile` is zero-padded to one in "
                      "both operands (zeros change no scale and no product)", False)



def _kept_default(component: str, default: str) -> str:
    return "fp32" if component == "norm" else default


@dataclasses.dataclass(frozen=True)
class Precision:
    default: str = entry("activation dtype between ops", choices=DTYPES)
    linear: LinearFormat = entry("default format of every linear")
    master_weights: str = entry("parameters and the optimizer's master copy", "fp32",
                                choices=("fp32",))
    grads: str = entry("gradient accumulation dtype", "fp32", choices=("fp32",))
    optimizer_states: str = entry("AdamW moments", "fp32", choices=DTYPES)
    dispatch: str | None = entry("EP dispatch payload (FP8: 1 x act_tile tiles, fp32 scales "
                                 "beside); absent: `default`", None, choices=FORMATS)
    combine: str | None = entry("EP combine payload and the dispatch's gradient; absent: "
                                "`default`", None, choices=DTYPES)
    linear_overrides: dict[str, LinearFormat] = entry(
        "per-linear formats by role: " + ", ".join(f"`{r}`" for r in LINEAR_ROLES),
        factory=dict, keys=LINEAR_ROLES)
    kept: dict[str, str] = entry("components kept out of FP8, with their dtype; absent: `fp32` "
                                 "for `norm`, `default` for the others",
                                 factory=dict, keys=KEPT_COMPONENTS, choices=DTYPES)
    fp8_backend: str = entry("`dsvc.runtime.fp8` backend (`torch`: emulation on any device)",
                             "torch", choices=("torch", "triton", "cublas"))

    def __post_init__(self):
        kept = {c: self.kept.get(c, _kept_default(c, self.default)) for c in KEPT_COMPONENTS}
        object.__setattr__(self, "kept", kept)
        object.__setattr__(self, "dispatch", self.dispatch or self.default)
        object.__setattr__(self, "combine", self.combine or self.default)

    def linear_for(self, role: str) -> LinearFormat:
        """The format of the linear named `role` (one of LINEAR_ROLES)."""
        return self.linear_overrides.get(role, self.linear)


# ----------------------------------------------------------------------------- placement


@dataclasses.dataclass(frozen=True)
class Mesh:
    pipeline: int = entry("pipeline ranks (devices along the pipeline axis)", minimum=1)
    data: int = entry("data-parallel degree (ZeRO-1 shards over it)", minimum=1)
    world_size: int = entry("pipeline x data", minimum=1)
    expert: int = entry("expert-parallel degree, inside `data` (divides it)", 1, minimum=1)
    nodes: int = entry("nodes (the two-hop dispatch groups EP ranks by node); 0: unknown", 0,
                       minimum=0)
    gpus_per_node: int = entry("GPUs per node; 0: unknown", 0, minimum=0)


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int = entry("stage id, 0, 1, ... in forward order (dualpipe: copy A's, then B's)",
                       minimum=0)
    rank: int = entry("pipeline rank holding it", minimum=0)
    copy: str = entry("model copy: `B` only for dualpipe's second copy", "A", choices=("A", "B"))
    layers: tuple[int, ...] = entry("global layer indices, contiguous", (), minimum=0,
                                    required=True)
    embedding: bool = entry("holds the token embedding (its copy's first stage)", False)
    head: bool = entry("holds the final norm, the output head and the loss (its copy's last "
                       "stage)", False)
    mtp: bool = entry("holds the MTP modules (the head stage)", False)


def split_layers(num_layers: int, num_stages: int) -> list[tuple[int, ...]]:
    """Layers over stages when nothing better is known: contiguous, as even as possible,
    earlier stages taking the remainder (the compiler's even layout, the tiny plans)."""
    base, extra = divmod(num_layers, num_stages)
    out, start = [], 0
    for i in range(num_stages):
        n = base + (1 if i < extra else 0)
        out.append(tuple(range(start, start + n)))
        start += n
    return out


# Sizes the runtime works in, which the compiler's memory model charges the same way
LOSS_CHUNK_LOGITS = 1 << 25  # logits the head stage holds at once (runtime/loss.py)
OPTIMIZER_UPDATE_PIECE = 1 << 24  # elements of a shard AdamW updates at once (optim.py)


def loss_chunk_rows(vocab: int) -> int:
    """Tokens per piece of the head's loss (runtime/loss.py): a piece's logits, about
    LOSS_CHUNK_LOGITS of them, are the largest temporary of the loss, whatever the batch
    (the compiler's memory model charges the same)."""
    return max(1, LOSS_CHUNK_LOGITS // vocab)


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    per_rank: tuple[tuple[int, ...], ...] = entry("the routed expert ids of each EP rank; each "
                                                  "expert once, equal counts", minimum=0)
    group_of_expert: tuple[int, ...] = entry("group of each expert: e // (routed / groups)",
                                             (), minimum=0)
    two_hop: bool = entry("dispatch across nodes to the same local index first, then inside "
                          "the node", False)


@dataclasses.dataclass(frozen=True)
class Schedule:
    kind: str = entry("pipeline schedule", choices=SCHEDULE_KINDS)
    num_microbatches: int = entry("micro-batches per step per data-parallel rank", minimum=1)
    overlap: bool = entry("dual micro-batch overlap: `OVERLAP_F_B` pairs run chunk-interleaved "
                          "with asynchronous all-to-alls", False)
    actions: tuple[tuple[str, ...], ...] = entry(
        "one action list per pipeline rank, in torch.distributed.pipelining's string form "
        "(`0F1`, `1B0`, `0I0`/`0W0`, `(0F3;3B1)OVERLAP_F_B`, optional `0SEND_F1`...); empty: "
        "torch's own schedule class for `kind`", ())
    version: int = entry("the action format version the schedule generator wrote", 1,
                         minimum=1)


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Optimizer:
    lr: float = entry("peak learning rate", minimum=0.0)
    kind: str = entry("optimizer", "adamw", choices=("adamw",))
    betas: tuple[float, float] = entry("AdamW betas, each in [0, 1)", (0.9, 0.95), minimum=0.0)
    eps: float = entry("AdamW epsilon", 1e-8, minimum=0.0)
    weight_decay: float = entry("decoupled weight decay (not applied to 1-D tensors)", 0.0,
                                minimum=0.0)
    grad_clip: float = entry("global gradient norm clip; 0: none", 0.0, minimum=0.0)


@dataclasses.dataclass(frozen=True)
class LrSchedule:
    kind: str = entry("`warmup_cosine` (linear warm-up, then cosine to `final_lr`) or "
                      "`constant`", "constant", choices=("warmup_cosine", "constant"))
    warmup_steps: int = entry("linear warm-up from lr / warmup_steps to lr", 0, minimum=0)
    final_lr: float = entry("learning rate at `total_steps`", 0.0, minimum=0.0)
    total_steps: int = entry("length of the cosine schedule", 0, minimum=0)


@dataclasses.dataclass(frozen=True)
class Data:
    kind: str = entry("`synthetic` or `tokens` (a flat token file)", "synthetic",
                      choices=("synthetic", "tokens"))
    path: str = entry("the token file (relative to the build directory)", "")
    dtype: str = entry("token dtype of the file", "uint16", choices=("uint16", "uint32"))


@dataclasses.dataclass(frozen=True)
class Train:
    seq_len: int = entry("tokens per sequence", minimum=1)
    global_batch: int = entry("sequences per optimizer step", minimum=1)
    micro_batch: int = entry("sequences per micro-batch", minimum=1)
    optimizer: Optimizer = entry("the optimizer")
    lr_schedule: LrSchedule = entry("learning-rate schedule", factory=LrSchedule)
    data: Data = entry("training data", factory=Data)
    seed: int = entry("initial weights (seeded per parameter name) and synthetic data", 0,
                      minimum=0)
    steps: int = entry("default number of steps; 0: the caller decides", 0, minimum=0)
    recompute: str = entry("activations replayed in backward instead of kept: `selective` "
                           "(every RMSNorm keeps its input only; MLA's up-projections and RoPE "
                           "are replayed from the latents, the attention core's outputs kept; "
                           "SwiGLU keeps its two inputs) or `full` (a decoder layer keeps its "
                           "input only)", "none", choices=RECOMPUTE)


@dataclasses.dataclass(frozen=True)
class Source:
    spec: str = entry("the spec file, relative", "")
    content_hash: str = entry("sha256 of the spec and its includes", "")
    passes: tuple[str, ...] = entry("the compiler passes that ran", ())
    dsvc: str = entry("dsvc version", "")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated plan. Build with `load_plan(path)` or `parse_plan(dict)`."""

    version: int = entry(f"plan format version; this runtime reads {PLAN_VERSION}",
                         choices=(PLAN_VERSION,))
    model: Model = entry("the architecture")
    precision: Precision = entry("the numeric format of every part")
    mesh: Mesh = entry("process mesh sizes")
    stages: tuple[Stage, ...] = entry("pipeline stages, each with its layers and placement")
    schedule: Schedule = entry("pipeline schedule and its action lists")
    train: Train = entry("batch, optimizer, learning-rate schedule, data, seed")
    experts: dict[str, ExpertPlacement] = entry("routed-expert placement per MoE ffn name",
                                                factory=dict)
    source: Source = entry("provenance written by the compiler; not executed", factory=Source)
    comment: tuple[str, ...] = entry("what the compiler could not express; not executed", ())

    def stages_of_rank(self, pp_rank: int) -> list[Stage]:
        """The stages a pipeline coordinate holds, in increasing stage index."""
        return [s for s in self.stages if s.rank == pp_rank]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def layer_spec(self, index: int) -> tuple[Attention, Ffn]:
        spec = self.model.layers[index]
        return self.model.attention[spec.attention], self.model.ffn[spec.ffn]


# ----------------------------------------------------------------------------- in and out


def parse_plan(raw: Any, source: str = "plan") -> Plan:
    """Validate a plan given as a dict (the parsed JSON); `PlanError` lists every problem."""
    version = raw.get("version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version != PLAN_VERSION:  # the rest would be noise
        raise PlanError([f"{source}: version: this runtime reads plan version {PLAN_VERSION}, "
                         f"got {version}"])
    plan, problems = read_partial(Plan, raw, source)
    if plan is not None:  # well-typed: its invariants too, so every problem is listed at once
        problems += [f"{source}: {p.where}: {p.message}" for p in plan_check.plan_problems(plan)]
    if problems:
        raise PlanError(problems)
    return plan


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate `plan.json` (through the input policy of `inputs.py`)."""
    name = os.fspath(path)
    try:
        raw = parse_json(read_bytes(name, JSON_BYTES), name)
    except InputError as err:
        raise PlanError([f"cannot read the plan: {err}"]) from None
    return parse_plan(raw, source=name)


def dump_plan(plan: Plan) -> dict:
    """The JSON form of `plan` (what `dsvc compile` writes as plan.json)."""
    return to_json(plan)


def plan_tables() -> dict[str, str]:
    """docs/plan.md's field tables, by section, generated from the records above."""
    tables = {"plan": field_table(Plan)}
    for name, cls in (("model", Model), ("rope", Rope), ("mtp", Mtp), ("precision", Precision),
                      ("linear", LinearFormat), ("mesh", Mesh), ("stages", Stage),
                      ("experts", ExpertPlacement), ("schedule", Schedule), ("train", Train),
                      ("optimizer", Optimizer), ("lr_schedule", LrSchedule), ("data", Data),
                      ("source", Source)):
        tables[name] = field_table(cls)
    for kind in ("mla", "gqa"):
        tables[f"attention.{kind}"] = field_table(Attention, kind)
    for kind in ("dense", "moe"):
        tables[f"ffn.{kind}"] = field_table(Ffn, kind)
    return tables
