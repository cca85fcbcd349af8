"""Network formulas: fat-tree counting (paper's 2-layer numbers, a 3-layer case by hand),
what a cluster needs, cost, and a single NVLink domain with no network at all."""

from __future__ import annotations

import functools

import pytest

from dsvc import dsl
from dsvc.compiler.costs.network import (
    fat_tree_endpoints,
    fat_tree_links,
    fat_tree_needed,
    fat_tree_switches,
)
from dsvc.compiler.driver import build_report

# The cost formulas on the documented even split (no graph, no simulation).
build_report = functools.partial(build_report, even_split=True)
from tests.conftest import EXAMPLES, ROOT

SPECS = ROOT / "tests" / "compiler" / "specs"


def test_two_layer_radix_64_plane_matches_the_paper():
    assert fat_tree_endpoints(64, 2) == 2048
    assert fat_tree_switches(64, 2) == 96  # 64 leaves + 32 spines
    assert fat_tree_links(64, 2) == 2048  # 64 leaves x 32 uplinks


def test_three_layer_fat_tree_by_hand():
    # radix 8: pods of 4 edge + 4 aggregation switches, 4 hosts per edge switch, 8 pods;
    # 16 core switches. Hosts 8 x 4 x 4 = 128; switches 32 + 32 + 16 = 80;
    # links edge-agg 8 x 4 x 4 = 128 plus agg-core 32 x 4 = 128.
    assert fat_tree_endpoints(8, 3) == 128
    assert fat_tree_switches(8, 3) == 80
    assert fat_tree_links(8, 3) == 256
    # the classic k^3/4 hosts and 5k^2/4 switches at radix 64
    assert fat_tree_endpoints(64, 3) == 64**3 / 4
    assert fat_tree_switches(64, 3) == 5 * 64**2 / 4


def test_one_layer_is_a_single_switch():
    assert (fat_tree_endpoints(64, 1), fat_tree_switches(64, 1), fat_tree_links(64, 1)) == \
        (64, 1, 0)


def test_needed_tree():
    assert fat_tree_needed(2048, 64, 2) == (2, 96, 2048)  # a full plane
    assert fat_tree_needed(256, 64, 2) == (2, 12, 256)  # 8 leaves, 4 spines
    assert fat_tree_needed(64, 64, 2) == (1, 1, 0)  # fits one switch
    assert fat_tree_needed(65, 64, 2) == (2, 5, 96)  # 3 leaves, 96 uplinks, 2 spines
    assert fat_tree_needed(256, 16, 3) == (3, 80, 512)  # 32 edge, 32 agg, 16 core
    assert fat_tree_needed(0, 64, 2) == (0, 0, 0)


def test_deepseek_v3_fabric():
    r = build_report(dsl.load(EXAMPLES / "deepseek_v3.dsv"))
    assert r.value("network.endpoints") == 16_384
    assert r.value("network.switches") == 768
    assert r.value("network.links") == 16_384
    assert r.value("network.used_endpoints") == 2048
    # 96 switches x $30k + 2048 links x $3k = $9.02M a plane: ~$72M, ~$4.4k per endpoint
    assert r.value("network.cost_usd") == 8 * (96 * 30_000 + 2048 * 3_000)
    assert round(r.value("network.cost_per_endpoint_usd")) == 4406
    # 2048 GPUs over 8 planes: 256 NICs a plane need 8 leaves + 4 spines
    assert r.value("network.used_switches") == 8 * 12
    assert r.value("network.used_links") == 8 * 256
    assert r.value("network.used_cost_usd") == 8 * (12 * 30_000 + 256 * 3_000)


def test_three_layer_cluster_spec():
    r = build_report(dsl.load(SPECS / "fat_tree3.dsv"))
    assert r.value("network.endpoints") == 2 * 1024
    assert r.value("network.switches") == 2 * 320
    assert r.value("network.links") == 2 * 2048
    assert r.value("network.cost_usd") == 640 * 20_000 + 4096 * 1_000
    assert r.value("network.used_endpoints") == 512
    assert r.value("network.used_layers") == 3
    assert (r.value("network.used_switches"), r.value("network.used_links")) == (160, 1024)


def test_single_nvlink_domain_has_no_network():
    r = build_report(dsl.load(SPECS / "v2_lite_nvl72.dsv"))
    assert r.value("network.kind").startswith("none")
    for key in ("endpoints", "switches", "links", "cost_usd", "used_endpoints"):
        assert r.value(f"network.{key}") == 0
    # experts over 8 of the 72 GPUs: all of it on NVLink, nothing on a network
    assert r.value("comm.routing.moe.ib_copies_per_token") == 0
    assert r.value("comm.ep_ib_bytes") == 0
    assert r.value("comm.routing.moe.nvlink_copies_per_token") == pytest.approx(6 * 7 / 8)
