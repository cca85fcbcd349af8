"""Network: a multi-plane fat-tree's capacity and cost, and what the cluster actually needs.

One plane is a k-ary fat-tree of L layers of radix-k switches (a leaf uses k/2
ports down, k/2 up; the top layer uses all k down), as the ISCA 2025 paper
counts it:

* endpoints per plane            2 (k/2)^L
* switches per plane             (2L - 1) (k/2)^(L-1)
* switch-to-switch links         (L - 1) x 2 (k/2)^L

(L = 2, k = 64: 2,048 endpoints, 96 switches, 2,048 links; L = 3, k = 64:
65,536 / 5,120 / 131,072.) A multi-plane fabric is `planes` such trees, one
per NIC of a node; cost = switches x switch_price + links x link_price.

What the cluster needs: its GPUs spread evenly over the planes (one NIC per
GPU); per plane the smallest tree of the same radix with at most L layers that
reaches them: n_1 = endpoints, each layer below the top has ceil(n_l / (k/2))
switches with as many uplinks as downlinks, the top layer ceil(n_l / k).
"""

from __future__ import annotations

from .symbols import Quantities, ceil_div


def fat_tree_endpoints(k, layers):
    """Endpoints of one plane."""
    return 2 * (k / 2) ** layers


def fat_tree_switches(k, layers):
    """Switches of one plane."""
    return (2 * layers - 1) * (k / 2) ** (layers - 1)


def fat_tree_links(k, layers):
    """Switch-to-switch links of one plane."""
    return (layers - 1) * 2 * (k / 2) ** layers


def fat_tree_needed(endpoints: int, k: int, max_layers: int) -> tuple[int, int, int]:
    """(layers, switches, links) of the smallest plane reaching `endpoints` NICs."""
    if endpoints <= 0:
        return 0, 0, 0
    half = k // 2
    layers = 1
    while layers < max_layers and endpoints > 2 * half ** layers:
        layers += 1
    switches = links = 0
    n = endpoints
    for _ in range(layers - 1):  # layers below the top: half the ports down, half up
        s = ceil_div(n, half)
        switches, links = switches + s, links + s * half
        n = s * half
    return layers, switches + ceil_div(n, k), links


LABELS = {
    "endpoints": "endpoints (capacity)", "switches": "switches", "links": "switch-to-switch links",
    "cost_usd": "cost", "used_endpoints": "endpoints used (one NIC per GPU)",
    "used_switches": "switches the cluster needs", "used_links": "links the cluster needs",
    "used_cost_usd": "cost of what the cluster needs",
}


def network_figures(spec, q: Quantities) -> None:
    """Record `network.*`; keys are always present (None where there is no fat-tree)."""
    c = spec.cluster
    net = c.network
    world = c.world_size
    if net is None:  # one NVLink domain: no NICs, no switches
        q.figure("network.kind", "scale-out network", "text", "none (NVLink only)")
        for key in ("endpoints", "switches", "links", "cost_usd", "used_endpoints",
                    "used_switches", "used_links", "used_cost_usd"):
            q.figure(f"network.{key}", LABELS[key], "USD" if "cost" in key else "count", 0)
        return
    q.figure("network.kind", "scale-out network", "text", net.kind)
    topo = net.topology
    if topo is None:
        for key in ("endpoints", "switches", "links", "cost_usd"):
            q.figure(f"network.{key}", LABELS[key], "count", None, note="no topology given")
        q.figure("network.used_endpoints", LABELS["used_endpoints"], "count", world)
        return
    k = q.sym("k_sw", topo.radix, "cluster.network.topology.radix")
    L = q.sym("L_ft", topo.layers, "cluster.network.topology.layers")
    planes = q.sym("n_planes", topo.planes, "cluster.network.topology.planes")
    p_sw = q.sym("c_sw", topo.switch_price, "cluster.network.topology.switch_price")
    p_ln = q.sym("c_link", topo.link_price, "cluster.network.topology.link_price")
    ends = q.figure("network.endpoints", LABELS["endpoints"], "count",
                    planes * fat_tree_endpoints(k, L))
    sw = q.figure("network.switches", LABELS["switches"], "count", planes * fat_tree_switches(k, L))
    ln = q.figure("network.links", LABELS["links"], "count", planes * fat_tree_links(k, L))
    cost = q.figure("network.cost_usd", LABELS["cost_usd"], "USD", sw * p_sw + ln * p_ln)
    q.figure("network.cost_per_endpoint_usd", "cost per endpoint", "USD", cost / ends)
    per_plane = ceil_div(world, topo.planes)
    layers, s, lk = fat_tree_needed(per_plane, topo.radix, topo.layers)
    used_cost = topo.planes * (s * topo.switch_price + lk * topo.link_price)
    q.figure("network.used_endpoints", LABELS["used_endpoints"], "count", world)
    q.figure("network.used_layers", "layers the cluster needs per plane", "count", layers)
    q.figure("network.used_switches", LABELS["used_switches"], "count", topo.planes * s)
    q.figure("network.used_links", LABELS["used_links"], "count", topo.planes * lk)
    q.figure("network.used_cost_usd", LABELS["used_cost_usd"], "USD", used_cost)
