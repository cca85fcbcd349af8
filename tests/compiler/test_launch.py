"""The launch lines `dsvc compile` prints and a build's README gives (compiler/codegen/launch_lines.py):
per node on a multi-node cluster, on one machine where the world fits one; each read back
by torchrun's own argument parser, so what a user pastes starts the job the plan needs."""

from __future__ import annotations

import pathlib
import shlex

import pytest

from dsvc import dsl
from dsvc.compiler.codegen.launch_lines import launch_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


def cluster(name: str):
    checked, _ = dsl.check_file(ROOT / "examples" / "clusters" / f"{name}.dsv")
    return checked.cluster


def torchrun_config(line: str, monkeypatch):
    """torchrun's LaunchConfig and script arguments for a command line as a user types it."""
    from torch.distributed.run import config_from_args, parse_args

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args would set it otherwise
    argv = shlex.split(line)
    assert argv[0] == "torchrun"
    config, script, script_args = config_from_args(parse_args(argv[1:]))
    return config, script, script_args


def test_multi_node_line(monkeypatch):
    launch = launch_for(cluster("h800_64"))  # 8 nodes x 8 GPUs
    assert launch.per_node == (
        "torchrun --nnodes 8 --nproc-per-node 8 --node-rank <i> --rdzv-backend static "
        "--rdzv-endpoint <HOST:PORT> train.py --run-dir run")
    assert launch.one_machine is None  # 64 processes fit no machine
    meaning = dict(launch.placeholders)
    assert "0 to 7" in meaning["<i>"] and "8i to 8i+7" in meaning["<i>"]
    assert "node 0" in meaning["<HOST:PORT>"]
    line = launch.per_node.replace("<i>", "3").replace("<HOST:PORT>", "node0:29500")
    config, script, args = torchrun_config(line, monkeypatch)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (8, 8, 8)
    # static rendezvous: node 3 keeps its number, so it runs global ranks 24..31
    assert config.rdzv_backend == "static" and config.rdzv_configs["rank"] == 3
    assert config.rdzv_endpoint == "node0:29500"
    assert args[-3:] == ["train.py", "--run-dir", "run"]
    summary = launch.summary()
    assert summary.startswith("on each of 8 nodes: torchrun --nnodes 8") and "README.md" in summary


def test_one_node_and_small_worlds(monkeypatch):
    tiny = launch_for(cluster("cpu4"), "build/tiny/train.py")  # 4 one-"GPU" CPU nodes
    assert tiny.per_node.startswith("torchrun --nnodes 4 --nproc-per-node 1 --node-rank <i>")
    assert tiny.one_machine == "torchrun --standalone --nproc-per-node 4 build/tiny/train.py " \
                               "--run-dir run"
    config, _, _ = torchrun_config(tiny.one_machine, monkeypatch)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, 4)
    assert "or on one machine: torchrun --standalone" in tiny.summary()

    class OneNode:
        nodes, gpus_per_node = 1, 8

    one = launch_for(OneNode())
    assert one.per_node is None and one.placeholders == ()
    assert one.summary() == one.one_machine == "torchrun --standalone --nproc-per-node 8 " \
                                               "train.py --run-dir run"
    assert launch_for(cluster("gb200_nvl72")).one_machine is None  # 18 nodes, 72 processes


@pytest.mark.parametrize("name", ["h800_2048", "gb200_nvl72"])
def test_every_node_count_parses(name, monkeypatch):
    c = cluster(name)
    line = launch_for(c).per_node.replace("<i>", str(c.nodes - 1)).replace("<HOST:PORT>", "h:1")
    config, _, _ = torchrun_config(line, monkeypatch)
    assert config.max_nodes * config.nproc_per_node == c.nodes * c.gpus_per_node
    assert config.rdzv_configs["rank"] == c.nodes - 1
