"""How to launch a build on the cluster its spec describes: the torchrun lines.

A plan is laid out in global rank order: ranks i*G .. i*G+G-1 are the G GPUs of
node i, and NVLink domains, EP groups and pipeline stages follow that order
(runtime/mesh.py). So a multi-node job must number its nodes as the cluster does:
each node runs the same command with its own `--node-rank`, under torchrun's
static rendezvous, which keeps that number (c10d's dynamic rendezvous would
number nodes by host address and ignore `--node-rank`). Where the whole world fits
one machine (one node, or at most `ONE_MACHINE` processes, as CPU specs such as
examples/tiny.dsv describe their processes as nodes), the single-machine form is
given too: `dsvc train` launches that one.
"""

from __future__ import annotations

import dataclasses

ONE_MACHINE = 8  # processes one machine runs: the GPUs of an HGX/DGX box, or CPU processes
PLACEHOLDERS = (
    ("<i>", "this node's number, 0 to {last}, in the cluster's order (node i runs {ranks})"),
    ("<HOST:PORT>", "an address and free port of node 0 that every node reaches (the "
                    "rendezvous; e.g. node0:29500)"),
)


@dataclasses.dataclass(frozen=True)
class Launch:
    """The launch of one build: `per_node` runs on every node (None for one node);
    `one_machine` runs everything on one machine (None where the world cannot fit one);
    `placeholders`: (placeholder, what to put there) for the per-node line."""

    nodes: int
    per_node_procs: int
    per_node: str | None
    one_machine: str | None
    placeholders: tuple[tuple[str, str], ...]

    @property
    def world(self) -> int:
        return self.nodes * self.per_node_procs

    def summary(self) -> str:
        """One line for `dsvc compile`: the command, or the per-node one and where the
        placeholders are explained."""
        if self.per_node is None:
            return self.one_machine
        line = f"on each of {self.nodes} nodes: {self.per_node}"
        if self.one_machine is not None:
            line += f"; or on one machine: {self.one_machine}"
        return line + " (README.md explains the placeholders)"


def launch_for(cluster, train_py: str = "train.py", args: str = "--run-dir run") -> Launch:
    """The torchrun lines for `cluster` (a spec's cluster block); `train_py` as the user
    will type it (a path inside the build directory)."""
    nodes, gpn = cluster.nodes, cluster.gpus_per_node
    world = nodes * gpn
    tail = f"{train_py} {args}".rstrip()
    one = f"torchrun --standalone --nproc-per-node {world} {tail}"
    if nodes == 1:
        return Launch(nodes, gpn, None, one, ())
    per_node = (f"torchrun --nnodes {nodes} --nproc-per-node {gpn} --node-rank <i> "
                f"--rdzv-backend static --rdzv-endpoint <HOST:PORT> {tail}")
    ranks = "global rank i" if gpn == 1 else f"global ranks {gpn}i to {gpn}i+{gpn - 1}"
    explained = tuple((p, text.format(last=nodes - 1, ranks=ranks)) for p, text in PLACEHOLDERS)
    return Launch(nodes, gpn, per_node, one if world <= ONE_MACHINE else None, explained)
