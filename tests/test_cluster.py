"""Cluster spec loading, topology, and one-line errors naming the field."""

from pathlib import Path

import pytest

from hetalloc.cluster import cluster_from_dict, dump_cluster_yaml, load_cluster
from hetalloc.errors import SpecError

EXAMPLES = Path(__file__).parent.parent / "examples"


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_examples_load():
    for f in sorted(EXAMPLES.glob("*.yaml")):
        c = load_cluster(f)
        assert c.num_devices > 0
        assert len({d.id for d in c.devices}) == c.num_devices
    lab = load_cluster(EXAMPLES / "lab-16.yaml")
    assert lab.type_counts() == {"A100-40G": 8, "V100-16G": 8}
    mix = load_cluster(EXAMPLES / "mix-64.yaml")
    assert mix.num_devices == 64 and len(mix.type_counts()) == 3
    fleet = load_cluster(EXAMPLES / "fleet-1024.yaml")
    assert fleet.num_devices == 1024 and len(fleet.type_counts()) == 4


def test_paths_are_bottlenecks():
    c = load_cluster(EXAMPLES / "lab-16.yaml")
    intra = c.path("a100/0", "a100/3")
    assert intra.bandwidth_bytes_per_s == 300e9  # NVLink3
    inter = c.path("a100/0", "v100/0")
    assert inter.bandwidth_bytes_per_s == 12.5e9  # IB EDR is the slowest link on the way
    assert inter.latency_s == pytest.approx(5e-6)


def test_any_shape_mixed_vendors_and_odd_counts():
    c = cluster_from_dict({"name": "odd", "nodes": [
        {"name": "x", "gpus": [{"type": "A100-80G", "count": 3}, {"type": "T4", "count": 2}],
         "intra_link": "PCIe4", "nic": "Eth-100G"},
        {"name": "y", "count": 3, "gpus": ["5xMI250-GCD"], "intra_link": "InfinityFabric", "nic": "IB-HDR"},
    ]})
    assert c.num_devices == 5 + 15
    assert [n.name for n in c.nodes] == ["x", "y-0", "y-1", "y-2"]
    assert c.device("y-2/4").type == "MI250-GCD"
    assert c.path("x/0", "y-1/0").bandwidth_bytes_per_s == 12.5e9


def test_round_trip_and_fingerprint():
    c = load_cluster(EXAMPLES / "mix-64.yaml")
    import yaml
    c2 = cluster_from_dict(yaml.safe_load(dump_cluster_yaml(c)))
    assert c2.fingerprint() == c.fingerprint()


@pytest.mark.parametrize("text, where, fix", [
    ("nodes:\n  - gpus: [{type: A10O, count: 8}]\n    intra_link: NVLink3\n",
     "nodes[0].gpus[0].type: unknown GPU 'A10O'", "did you mean"),
    ("nodes:\n  - gpus: [{type: T4, count: 2}]\n    intra_link: {bandwidth_gbps: -5}\n",
     "nodes[0].intra_link.bandwidth_gbps: must be > 0, got -5", "GB/s"),
    ("nodes:\n  - gpus: [{type: T4, count: 2}\n    intra_link: PCIe3\n", "invalid YAML", "fix the syntax"),
    ("name: empty\nnodes: []\n", "nodes: the cluster has no nodes", "add at least one node"),
    ("", "the file is empty", "describe the cluster"),
    ("nodes:\n  - gpus: [{type: T4, count: 2}]\n    intra_link: PCIe3\n    count: 2\n",
     "nodes[0].nic: missing", "network link"),
    ("nodes:\n  - gpus: [{type: T4, count: 2}]\n    intra_lnk: PCIe3\n", "nodes[0].intra_lnk: unknown field",
     "did you mean 'intra_link'"),
    ("nodes:\n  - gpus: [{type: T4, count: 0}]\n    intra_link: PCIe3\n", "nodes[0].gpus[0].count: must be > 0", ""),
    ("nodes:\n  - gpus: [{type: T4, count: 2}]\n    intra_link: NVLink9\n", "unknown link 'NVLink9'", "did you mean"),
])
def test_bad_input_errors_name_the_field(tmp_path, text, where, fix):
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_cluster(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(p))
    assert where in msg
    assert fix in msg


def test_missing_file():
    with pytest.raises(SpecError, match="file not found"):
        load_cluster("/nonexistent/cluster.yaml")


def test_a_nodes_share_efficiency_round_trips_and_counts_in_its_signature():
    from hetalloc.cluster import cluster_from_dict
    from hetalloc.errors import SpecError
    spec = {"name": "h", "device_types": [{"name": "X", "peak_tflops": 1, "memory_gib": 8, "mem_bandwidth_gbps": 10}],
            "nodes": [{"name": "n", "gpus": [{"type": "X", "count": 3}], "compute_slots": 2,
                       "compute_share_efficiency": 0.8125, "intra_link": {"bandwidth_gbps": 1.0, "latency_us": 0.0}}]}
    c = cluster_from_dict(spec)
    assert c.nodes[0].share_efficiency == 0.8125
    again = cluster_from_dict(c.to_dict())
    assert again.nodes[0].share_efficiency == 0.8125 and again.fingerprint() == c.fingerprint()
    plain = cluster_from_dict({**spec, "nodes": [{k: v for k, v in spec["nodes"][0].items()
                                                  if k != "compute_share_efficiency"}]})
    assert plain.nodes[0].share_efficiency == 1.0 and "compute_share_efficiency" not in plain.to_dict()["nodes"][0]
    assert plain.nodes[0].signature() != c.nodes[0].signature()
    spec["nodes"][0]["compute_share_efficiency"] = 1.5
    with pytest.raises(SpecError, match="compute_share_efficiency"):
        cluster_from_dict(spec)
