"""One rank's training loop: build its stages from the plan, run steps, report metrics.

`Trainer(plan)` on every rank of a job (after `launch.init_distributed`) builds
this rank's stage modules with identical initial weights (seeded by name),
its expert-parallel links, the pipeline executor and the ZeRO-1 optimizer.
`Trainer.reference(plan)` builds the same model unpartitioned in one process
(all experts local, the whole global batch in one forward): the run every
partitioned run must reproduce.

A step: this rank's data slice -> pipeline (forward/backward of every
micro-batch) -> optimizer (reduce-scatter, global clip, AdamW, all-gather) ->
expert loads summed over data parallelism -> router bias update. Metrics
(identical on every rank): loss (main + weighted MTP + sequence aux),
its parts, lr, grad_norm, max_expert_load_ratio and per-layer loads.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from . import expert_load, program
from .data import Sharder, make_data
from .ep import ExpertComm
from .init import init_parameters
from .layers import dtype_of
from .mesh import ProcessMesh, build_mesh
from .model import StageModule, build_full_model
from .moe import RoutedExperts
from .optim import ZeroAdamW, lr_at
from .pipeline import LocalExecutor, PipelineExecutor
from .plan import Plan

_SHARED = "embed_tokens.weight"  # held by the embedding stage, the MTP stage and a tied head


class Trainer:
    def __init__(
        self, plan: Plan, mesh: ProcessMesh | None = None, *, _modules=None, _ref_microbatches: int = 1,
        data_base_dir: str | None = None, load_weights=None,
    ):  # fmt: skip
        """`load_weights(modules)`, if given, fills this rank's stage modules after their
        initialisation and before the optimizer copies them (`dsvc train --init-hf`)."""
        self.plan = plan
        self.mesh = mesh if mesh is not None else build_mesh(plan)
        mesh = self.mesh
        if _modules is None:
            stages = plan.stages_of_rank(mesh.pp_rank)
            comms = self._comms()
            self.modules = [StageModule(plan, s, comms) for s in stages]
            for mod in self.modules:
                init_parameters(mod, plan.train.seed, plan.model.init_std)
            self._tie_local()
            n_mb, data_parallel = plan.schedule.num_microbatches, mesh.dp
        else:
            self.modules, n_mb, data_parallel = _modules, _ref_microbatches, 1
        if load_weights is not None:
            load_weights(self.modules)
        for mod in self.modules:
            mod.to(mesh.device)
            for moe in mod.moe_layers().values():
                moe.aux_scale = 1.0 / n_mb
        shared, skip_norm = self._shared_params()
        dense, expert = self._split_params()
        self.optimizer = ZeroAdamW(
            dense, expert, plan.train.optimizer, dtype_of(plan.precision.optimizer_states), mesh,
            shared=shared, skip_norm=skip_norm,
        )  # fmt: skip
        self.num_microbatches = n_mb
        self.load_totals: dict[str, torch.Tensor] = {}  # per-expert tokens since start/resume
        sch = plan.schedule
        paired = sch.kind == "dualpipev" and sch.overlap and sch.actions
        if _modules is None and (sch.kind == "dualpipe" or paired):
            # two model copies or overlapped F&B pairs: our executor (torch's has neither)
            from .dualpipe import ActionExecutor

            self.executor = ActionExecutor(plan, self.modules, mesh)
        elif _modules is not None or mesh.pp == 1:
            self.executor = LocalExecutor(self.modules, n_mb)
        else:
            if sch.overlap and mesh.pp > 1:
                warnings.warn(
                    f"schedule.overlap needs the schedule's action lists; running {sch.kind} "
                    "through torch's schedule class without overlap", stacklevel=2,
                )  # fmt: skip
            self.executor = PipelineExecutor(plan, self.modules, mesh.pp_group, mesh.device)
        t = plan.train
        self.data = make_data(
            t.data.kind, vocab=plan.model.vocab, seq_len=t.seq_len, seed=t.seed,
            path=t.data.path or None, dtype=t.data.dtype, base_dir=data_base_dir,
        )  # fmt: skip
        self.sharder = Sharder(
            t.global_batch, data_parallel, mesh.dp_rank if _modules is None else 0, t.micro_batch
        )
        self._moe = None
        self.step_index = 0
        self.keep_grads = False  # tests: leave the averaged full gradients in .grad

    @classmethod
    def reference(cls, plan: Plan, num_microbatches: int = 1) -> Trainer:
        """The unpartitioned model in this process: the whole global batch per step, in one
        forward (or split into `num_microbatches` accumulated ones)."""
        model = build_full_model(plan)
        init_parameters(model, plan.train.seed, plan.model.init_std)
        return cls(plan, ProcessMesh(), _modules=[model], _ref_microbatches=num_microbatches)

    # -- construction ----------------------------------------------------------------
    def _comms(self) -> dict[str, ExpertComm]:
        plan, mesh, prec = self.plan, self.mesh, self.plan.precision
        out = {}
        experts = prec.linear_for("experts")  # an FP8 dispatch quantises as its GEMMs do
        for name, place in plan.experts.items():
            group = mesh.ep_group if mesh.ep > 1 else None
            out[name] = ExpertComm(
                place, mesh.ep_rank, group, prec.dispatch, prec.combine, experts.ue8m0,
                node_size=mesh.node_size, inter_group=mesh.inter_node_group,
                intra_group=mesh.intra_node_group, dispatch_tile=experts.act_tile,
            )  # fmt: skip
        return out

    def _tie_local(self) -> None:
        """Stages on one rank that both hold the embedding share one Parameter."""
        holders = [m for m in self.modules if hasattr(m, "embed_tokens")]
        for m in holders[1:]:
            m.embed_tokens = holders[0].embed_tokens

    def _shared_params(self):
        """Groups of pipeline ranks holding the shared embedding; every rank creates them."""
        plan, mesh = self.plan, self.mesh
        m = plan.model
        if plan.schedule.kind == "dualpipe" and mesh.pp > 1:
            # ranks i and PP-1-i hold the same parameters (the two copies); the executor sums
            # their gradients, the shared embedding included, and only rank i counts them
            # in the gradient norm
            if mesh.pp_rank < mesh.pp // 2:
                return {}, set()
            return {}, {n for mod in self.modules for n, _ in mod.named_parameters()}
        holder_ranks = sorted(
            {
                s.rank
                for s in plan.stages
                if s.embedding or (s.mtp and m.mtp.depth) or (s.head and m.tie_embeddings)
            }
        )
        shared, skip = {}, set()
        group = mesh.pp_subgroup(holder_ranks) if mesh.distributed else None
        if mesh.pp_rank in holder_ranks and len(holder_ranks) > 1:
            shared[_SHARED] = group
            if mesh.pp_rank != holder_ranks[0]:
                skip.add(_SHARED)
        return shared, skip

    def _split_params(self):
        seen, dense, expert = set(), [], []
        for mod in self.modules:
            expert_ids = {
                id(p)
                for sub in mod.modules()
                if isinstance(sub, RoutedExperts)
                for p in sub.parameters()
            }
            for name, p in mod.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                (expert if id(p) in expert_ids else dense).append((name, p))
        return dense, expert

    # -- the step --------------------------------------------------------------------
    def named_parameters(self):
        """(name, parameter) of this rank, each once (routed experts stacked per layer)."""
        for shard in self.optimizer.shards:
            yield from shard.named

    def moe_layers(self):
        """Every MoE layer on this rank, by parameter-name prefix."""
        if self._moe is None:
            self._moe = {
                name: moe for mod in self.modules for name, moe in mod.moe_layers().items()
            }
        return self._moe

    def step(self) -> dict:
        """One optimizer step on this step's batch; returns the metrics (same on every rank)."""
        rows = self.sharder.step_batch(self.data, self.step_index).to(self.mesh.device)
        tokens, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        self.optimizer.zero_grad()
        self.executor.run(tokens, labels)
        program.release_weights(self.modules)  # the FP8 weight copies the step's blocks shared
        lr = lr_at(self.step_index, self.plan.train.optimizer.lr, self.plan.train.lr_schedule)
        grad_norm = self.optimizer.step(lr, keep_grads=self.keep_grads)
        loads = self._update_router_bias()
        expert_load.accumulate(self.load_totals, loads)
        metrics = self._losses()
        ratios = [float(v.max()) / max(float(v.float().mean()), 1e-9) for v in loads.values()]
        ratio = torch.tensor(
            [max(ratios) if ratios else 1.0], dtype=torch.float64, device=self.mesh.device
        )
        if self.mesh.distributed:
            dist.all_reduce(ratio, op=dist.ReduceOp.MAX)
        metrics.update(
            step=self.step_index, lr=lr, grad_norm=grad_norm, max_expert_load_ratio=float(ratio),
            expert_load={name: v.tolist() for name, v in loads.items()},
        )  # fmt: skip
        self.step_index += 1
        return metrics

    def _update_router_bias(self) -> dict[str, torch.Tensor]:
        loads = {}
        for name, moe in sorted(self.moe_layers().items()):
            load = moe.take_load()
            if self.mesh.dp > 1:
                dist.all_reduce(load, group=self.mesh.dp_group)
            loads[name] = load
        copy_group = getattr(self.executor, "copy_group", None)
        if copy_group is not None and loads:
            # DualPipe: each copy of a layer saw half the micro-batches; both take the sum
            flat = torch.cat(list(loads.values()))
            dist.all_reduce(flat, group=copy_group)
            loads = dict(zip(loads, flat.split([len(v) for v in loads.values()])))
        for name, load in loads.items():
            self.moe_layers()[name].update_bias(load)
        return loads

    def _losses(self) -> dict:
        """Mean over micro-batches and data-parallel ranks, summed over pipeline stages
        (under DualPipe each copy of a stage saw half the step's micro-batches)."""
        depth = self.plan.model.mtp.depth
        n = self.num_microbatches
        vec = torch.zeros(
            2 + depth, dtype=torch.float64, device=self.mesh.device
        )  # lm, mtp1.., aux
        for mod in self.modules:
            if mod.loss_log:
                vec[0] += sum(float(e["lm"]) for e in mod.loss_log) / n
                for k in range(1, depth + 1):
                    vec[k] += sum(float(e[f"mtp{k}"]) for e in mod.loss_log) / n
                mod.loss_log.clear()
        for moe in self.moe_layers().values():
            if moe.aux_values:
                vec[-1] += sum(float(a) for a in moe.aux_values) / n
                moe.aux_values.clear()
        if self.mesh.distributed:
            dist.all_reduce(vec)
            vec /= self.mesh.dp
        lm, aux = float(vec[0]), float(vec[-1])
        mtp = [float(v) for v in vec[1 : 1 + depth]]
        weight = self.plan.model.mtp.loss_weight / depth if depth else 0.0
        return {
            "loss": lm + weight * sum(mtp) + aux,
            "lm_loss": lm,
            "mtp_loss": mtp,
            "aux_loss": aux,
        }
