"""Functions the multi-process runtime tests run on every rank (importable by spawn).

Each returns plain data (metrics, gradients, byte counts) that the test process
compares with a single-process reference.
"""

from __future__ import annotations

import torch


def train_scenarios(
    rank: int, scenarios: list[tuple[str, dict, int]], extras: bool = False
) -> dict:
    """For each (name, plan dict, steps): build a Trainer, run the steps, record per
    step the metrics and the averaged full gradients of this rank's parameters.

    `extras` also records per step the weights and router biases after the update and
    the overlap event logs of the step (pipeline executors that keep them)."""
    from dsvc.runtime.plan import parse_plan
    from dsvc.runtime.trainer import Trainer

    out = {}
    for name, raw, steps in scenarios:
        trainer = Trainer(parse_plan(raw))
        trainer.keep_grads = True
        records, weights, logs = [], [], []
        for _ in range(steps):
            metrics = trainer.step()
            grads = {n: p.grad.detach().clone() for n, p in trainer.named_parameters()}
            records.append((metrics, grads))
            if extras:
                state = {n: p.detach().clone() for n, p in trainer.named_parameters()}
                for mod in trainer.modules:
                    for n, b in mod.named_buffers():
                        if n.endswith("e_score_correction_bias"):
                            state[n] = b.clone()
                weights.append(state)
                logs.append(list(getattr(trainer.executor, "overlap_log", [])))
        mesh = trainer.mesh
        out[name] = {
            "records": records,
            "coords": (mesh.pp_rank, mesh.dp_rank, mesh.ep_rank),
            "state_bytes": trainer.optimizer.state_bytes(),
            "unsharded_state_bytes": trainer.optimizer.unsharded_state_bytes(),
            "expert_ids": {
                n: list(m.expert_ids) for mod in trainer.modules for n, m in mod.named_modules()
                if hasattr(m, "expert_ids")
            },
            "weights": weights, "overlap_logs": logs,
        }  # fmt: skip
    return out


def fail_at_step(rank: int, raw: dict, bad_rank: int) -> None:
    """Train; rank `bad_rank` raises in the middle of step 1 while its peers wait on it."""
    from dsvc.runtime.plan import parse_plan
    from dsvc.runtime.trainer import Trainer

    trainer = Trainer(parse_plan(raw))
    trainer.step()
    if rank == bad_rank:
        raise ValueError("injected failure in step 1")
    trainer.step()  # the others block in the pipeline / collectives until killed


def dispatch_combine(rank: int, raw: dict, num_tokens: int, seed: int) -> dict:
    """EP exchanges on their own: identity experts, routing limits, gradients.

    Every rank builds the same global token set and routing, handles its own
    slice, and returns what it computed so the test can rebuild the global picture."""
    from dsvc.runtime.ep import ExpertComm
    from dsvc.runtime.mesh import build_mesh
    from dsvc.runtime.plan import parse_plan

    plan = parse_plan(raw)
    mesh = build_mesh(plan)
    place = plan.experts["moe"]
    ffn = plan.model.ffn["moe"]
    gen = torch.Generator().manual_seed(seed)
    world_x = torch.randn(mesh.dp, num_tokens, plan.model.hidden, generator=gen)
    # skewed, uneven routing: some experts get nothing, top_k distinct experts per token
    scores = torch.rand(mesh.dp, num_tokens, ffn.routed, generator=gen) * torch.linspace(
        0.2, 2.0, ffn.routed
    )
    world_idx = scores.topk(ffn.top_k, dim=-1).indices
    world_w = torch.rand(mesh.dp, num_tokens, ffn.top_k, generator=gen)
    x, idx, w = world_x[mesh.dp_rank], world_idx[mesh.dp_rank], world_w[mesh.dp_rank]
    result = {}
    for two_hop in (False, True):
        p = type(place)(place.per_rank, place.group_of_expert, two_hop)
        comm = ExpertComm(
            p, mesh.ep_rank, mesh.ep_group, "fp32", "fp32", node_size=mesh.node_size,
            inter_group=mesh.inter_node_group, intra_group=mesh.intra_node_group,
        )  # fmt: skip
        received: list[torch.Tensor] = []

        def identity(x_MD, counts, received=received):
            received.append(counts.clone())
            return x_MD

        halves = torch.full_like(w, 1.0 / ffn.top_k)
        y_identity = comm.run(x, idx, halves, identity)
        # a non-trivial expert (scaled by 1 + global expert id) for gradient checks
        ids = torch.tensor(comm.local_experts, dtype=torch.float32)

        def scaled(x_MD, counts, ids=ids):
            return x_MD * torch.repeat_interleave(1.0 + ids, counts).unsqueeze(1)

        xg = x.clone().requires_grad_(True)
        wg = w.clone().requires_grad_(True)
        y = comm.run(xg, idx, wg, scaled)
        (y * torch.arange(y.numel(), dtype=torch.float32).view_as(y).sin()).sum().backward()
        result["two_hop" if two_hop else "one_hop"] = {
            "y_identity": y_identity, "received": received[0], "y": y.detach(),
            "dx": xg.grad, "dw": wg.grad, "is_two_hop": comm.two_hop,
        }  # fmt: skip
    fp8 = ExpertComm(place, mesh.ep_rank, mesh.ep_group, "fp8_e4m3", "bf16")
    result["fp8_identity"] = fp8.run(x, idx, torch.full_like(w, 1.0 / ffn.top_k), lambda a, c: a)
    result.update(x=x, idx=idx, w=w, coords=(mesh.dp_rank, mesh.ep_rank), local=comm.local_experts)
    return result


def overlapped_pair(rank: int, raw: dict, f_layers: list[int], b_layers: list[int]) -> dict:
    """One F&B pair on the EP ranks of a plan with pipeline 1 (data = EP): the forward of
    micro-batch X through a stage of `f_layers` and the backward of micro-batch Y through
    a stage of `b_layers`, run plain (F then B) and overlapped. Returns per mode the F
    output, the input and parameter gradients, and the event log."""
    from dsvc.runtime.ep import ExpertComm
    from dsvc.runtime.init import init_parameters
    from dsvc.runtime.mesh import build_mesh
    from dsvc.runtime.model import StageModule
    from dsvc.runtime.overlap import OverlapSession
    from dsvc.runtime.plan import Stage, parse_plan

    plan = parse_plan(raw)
    mesh = build_mesh(plan)
    comms = {}
    for name, place in plan.experts.items():
        comms[name] = ExpertComm(
            place, mesh.ep_rank, mesh.ep_group, "fp32", "fp32", node_size=mesh.node_size,
            inter_group=mesh.inter_node_group, intra_group=mesh.intra_node_group,
        )  # fmt: skip
    mods = []
    for i, layers in enumerate((f_layers, b_layers)):
        mod = StageModule(plan, Stage(i, 0, "A", tuple(layers), False, False, False), comms)
        init_parameters(mod, plan.train.seed, plan.model.init_std)
        mods.append(mod)
    f_mod, b_mod = mods
    gen = torch.Generator().manual_seed(100 + mesh.dp_rank)
    shape = (plan.train.micro_batch, plan.train.seq_len, plan.model.hidden)
    x_f, x_b, g_b = (torch.randn(shape, generator=gen) for _ in range(3))
    out = {}
    for mode in ("plain", "overlap"):
        for mod in mods:
            mod.zero_grad(set_to_none=True)
        xb = x_b.clone().requires_grad_(True)
        y_b = b_mod(xb)  # Y's forward happened earlier in the schedule
        session = OverlapSession("1F1", "2B0", interleave=mode == "overlap")
        for comm in comms.values():
            comm.session = session
        y_f, _ = session.run(lambda: f_mod(x_f), lambda y=y_b: torch.autograd.backward(y, g_b))
        for comm in comms.values():
            comm.session = None
        grads = {n: p.grad.clone() for n, p in b_mod.named_parameters() if p.grad is not None}
        out[mode] = {"y_f": y_f.detach(), "dx_b": xb.grad, "grads": grads, "log": session.log}
    return out


def reference_steps(raw: dict, steps: int, num_microbatches: int = 1) -> list:
    """(metrics, gradients by name) of each step of the unpartitioned model in this process."""
    from dsvc.runtime.plan import parse_plan
    from dsvc.runtime.trainer import Trainer

    ref = Trainer.reference(parse_plan(raw), num_microbatches)
    ref.keep_grads = True
    records = []
    for _ in range(steps):
        metrics = ref.step()
        records.append((metrics, {n: p.grad.detach().clone() for n, p in ref.named_parameters()}))
    return records


def decode_jobs(rank: int, jobs: list[dict]) -> list:
    """Each decoding job (runtime/serve.py) on a spawned world: a job of `ep` processes
    runs on every block of `ep` consecutive ranks (each its own process group); rank 0's
    results (None elsewhere)."""
    import torch.distributed as dist

    from dsvc.runtime.serve import run_job

    world = dist.get_world_size()
    out = []
    for job in jobs:
        ep = job["ep"]
        blocks = [dist.new_group(list(range(b, b + ep))) for b in range(0, world, ep)]
        out.append(run_job(job, rank % ep, ep, blocks[rank // ep]))
    return out


def program_block(rank: int, raw: dict, program_path: str, block: str, seed: int) -> dict:
    """One block of a trainer's stage run eagerly and by the generated program, from the
    same weights and this rank's input: the outputs, input gradient and the block's
    parameter gradients of each (expert-parallel exchanges included)."""
    from dsvc.runtime import program as P
    from dsvc.runtime.plan import parse_plan
    from dsvc.runtime.trainer import Trainer

    plan = parse_plan(raw)
    trainer = Trainer(plan)
    (module,) = trainer.modules
    blk = module.get_submodule(block)
    gen = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(2, 16, plan.model.hidden, generator=gen).to(torch.bfloat16)
    dy = torch.randn(2, 16, plan.model.hidden, generator=gen)

    P.detach_program(trainer.modules)
    eager = run_block(module, block, x, dy)
    P.attach_program(trainer.modules, P.load_program(program_path), plan, "torch")
    generated = run_block(module, block, x, dy)
    return {"eager": eager, "program": generated, "runs_program": blk.program is not None,
            "two_hop": blk.mlp.comm.two_hop, "moves": blk.mlp.comm.ep_size > 1}


def run_block(model, block_name: str, x, dy) -> dict:
    """Forward and backward of one block of `model` on input x with output gradient dy:
    its output, input gradient and parameter gradients by name."""
    model.zero_grad(set_to_none=True)
    blk = model.get_submodule(block_name)
    xi = x.clone().requires_grad_(True)
    y = blk(xi)
    (y.float() * dy).sum().backward()
    grads = {n: p.grad.clone() for n, p in blk.named_parameters() if p.grad is not None}
    return {"y": y.detach(), "dx": xi.grad, **grads}
