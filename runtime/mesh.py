"""The process mesh a plan asks for: pipeline x data, with expert parallelism inside data.

Global rank = pp_rank * data + dp_rank, and inside the data dimension
dp_rank = edp_rank * expert + ep_rank: an EP group is `expert` consecutive
ranks (so, on a cluster, consecutive GPUs of consecutive nodes), and the
expert-data-parallel group joins the ranks holding the same experts. DeepSeek-V3:
PP 16 x DP 128, EP 64, so expert-DP 2. Groups come from `DeviceMesh`:
("pp", "dp") and ("pp", "edp", "ep"), plus ("pp", "edp", "node", "local") for
the two-hop dispatch (across nodes at one local index, then inside a node).

A `ProcessMesh` is passed explicitly to everything that communicates; there
is no module-level distributed state.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .plan import Plan


@dataclasses.dataclass
class ProcessMesh:
    world_size: int = 1
    rank: int = 0
    pp: int = 1
    dp: int = 1
    ep: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    edp_rank: int = 0
    pp_group: object = None
    dp_group: object = None
    ep_group: object = None
    edp_group: object = None
    inter_node_group: object = None  # same local index, one rank per node of the EP group
    intra_node_group: object = None  # the EP ranks of this node
    node_size: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    device_mesh: object = None  # ("pp", "dp")
    expert_mesh: object = None  # ("pp", "edp", "ep")

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def global_rank(self, pp_rank: int, dp_rank: int) -> int:
        return pp_rank * self.dp + dp_rank

    def pp_subgroup(self, pp_ranks: list[int]):
        """A group of the given pipeline coordinates at this rank's data coordinate.

        Every rank must call this with the same list (groups are created collectively);
        returns None when this rank is not a member or the group has one member."""
        if not self.distributed or len(pp_ranks) < 2:
            return None
        mine = None
        for dp_rank in range(self.dp):
            ranks = [self.global_rank(p, dp_rank) for p in pp_ranks]
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: pp {self.pp_rank}/{self.pp}, dp {self.dp_rank}/{self.dp}, "
            f"ep {self.ep_rank}/{self.ep}, expert-dp {self.edp_rank}/{self.edp}"
        )


def build_mesh(plan: Plan, device: torch.device | None = None) -> ProcessMesh:
    """Groups for this process; the default process group must already exist when the
    plan's world size is above one (see launch.init_distributed)."""
    m = plan.mesh
    device = device or torch.device("cpu")
    if m.world_size == 1:
        return ProcessMesh(device=device)
    if not dist.is_initialized():
        raise RuntimeError(
            f"this plan runs on {m.world_size} processes (pipeline {m.pipeline} x data {m.data}): "
            f"launch it with `torchrun --nproc-per-node {m.world_size} ...`"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != m.world_size:
        raise RuntimeError(
            f"the plan was compiled for {m.world_size} processes (pipeline {m.pipeline} x data "
            f"{m.data}) but this job has {world}; launch with --nproc-per-node/--nnodes to match"
        )
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    pp, dp, ep = m.pipeline, m.data, m.expert
    edp = dp // ep
    dev = device.type
    main = init_device_mesh(dev, (pp, dp), mesh_dim_names=("pp", "dp"))
    experts = DeviceMesh(
        dev, torch.arange(world).view(pp, edp, ep), mesh_dim_names=("pp", "edp", "ep")
    )
    pp_rank, dp_rank = divmod(rank, dp)
    edp_rank, ep_rank = divmod(dp_rank, ep)
    out = ProcessMesh(
        world_size=world, rank=rank, pp=pp, dp=dp, ep=ep,
        pp_rank=pp_rank, dp_rank=dp_rank, ep_rank=ep_rank, edp_rank=edp_rank,
        pp_group=main.get_group("pp"), dp_group=main.get_group("dp"),
        ep_group=experts.get_group("ep"), edp_group=experts.get_group("edp"),
        device=device, device_mesh=main, expert_mesh=experts,
    )  # fmt: skip
    if (
        any(p.two_hop for p in plan.experts.values())
        and m.gpus_per_node
        and ep % m.gpus_per_node == 0
    ):
        node = m.gpus_per_node
        nodes = DeviceMesh(
            dev, torch.arange(world).view(pp, edp, ep // node, node),
            mesh_dim_names=("pp", "edp", "node", "local"),
        )  # fmt: skip
        out.inter_node_group = nodes.get_group("node")
        out.intra_node_group = nodes.get_group("local")
        out.node_size = node
    return out
