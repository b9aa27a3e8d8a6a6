"""The simulator's links are read from the cluster's topology graph (Cluster.graph), so a
fabric level added to the graph reaches the simulator without a change there."""

from __future__ import annotations

from simulator.links import FABRIC, Topology
from test_sim_timeline import toy_cluster


def _names(topo: Topology, a: str, b: str) -> list[str]:
    return [topo.links[l].name for l in topo.path(a, b)]


def test_links_follow_the_graph():
    topo = Topology(toy_cluster({"a": 2, "b": 2}, intra_gbps=100.0, nic_gbps=10.0))
    assert _names(topo, "a/0", "a/1") == ["a/0 up", "a/1 down"]
    assert _names(topo, "a/0", "b/1") == ["a/0 up", "a nic up", FABRIC, "b nic down", "b/1 down"]
    core = topo.links[topo.core]
    assert core.capacity_bytes_per_s == 2 * 10e9  # two NICs, non-blocking
    assert topo.links[topo.up["a/0"]].capacity_bytes_per_s == 100e9


def test_a_fabric_level_added_to_the_graph_is_simulated():
    cl = toy_cluster({"a": 1, "b": 1, "c": 1}, intra_gbps=100.0, nic_gbps=10.0)
    g = cl.graph
    # Put nodes a and b under a pod switch, 2:1 oversubscribed, with a 5 GB/s uplink.
    g.add_node("pod", kind="fabric", oversubscription=2.0)
    for n in ("a", "b"):
        data = dict(g.edges[f"switch:{n}", "fabric"])
        g.remove_edge(f"switch:{n}", "fabric")
        g.add_edge(f"switch:{n}", "pod", **data)
    g.add_edge("pod", "fabric", bandwidth=5e9, latency=0.0, kind="uplink", name="pod uplink")
    topo = Topology(cl)
    assert _names(topo, "a/0", "b/0") == ["a/0 up", "a nic up", "pod core", "b nic down", "b/0 down"]
    assert _names(topo, "a/0", "c/0") == ["a/0 up", "a nic up", "pod uplink up", FABRIC, "c nic down",
                                          "c/0 down"]
    by_name = {l.name: l for l in topo.links}
    assert by_name["pod core"].capacity_bytes_per_s == 2 * 10e9 / 2.0
    assert by_name[FABRIC].capacity_bytes_per_s == 5e9 + 10e9  # the pod's uplink and c's NIC
    assert min(topo.capacity[l] for l in topo.path("a/0", "c/0")) == 5e9  # the pod's uplink is the bottleneck
