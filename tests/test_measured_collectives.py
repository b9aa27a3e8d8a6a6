"""Measured collectives (a cluster file's ``collectives``), shared compute slots and
interference figures: read, checked and written back; the one formula that reads a
table (hetalloc.costs.measured_collective_time) against hand calculations; the
predictions and the simulation using it where a profile provides it, the analytic
formulas otherwise."""

from __future__ import annotations

import pytest

from hetalloc.cluster import cluster_from_dict, dump_cluster_yaml, load_cluster
from hetalloc.costs import collective_multipliers, collective_time, interpolated_time, measured_collective_time
from hetalloc.errors import SpecError
from hetalloc.evaluate import allreduce_time, collective_time as group_collective_time, loss_reduction_time, predict
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.models import get_model
from runtime.plans import hand_plan

import simulator

TABLE = {"op": "allreduce", "scope": "intra", "link": "lan", "ranks": 2,
         "bytes": [8, 1000, 1_000_000], "seconds": [100e-6, 120e-6, 1.1e-3], "latency_us": 50, "bandwidth_gbps": 1}


def spec(collectives=None, slots=0, interference=0.0):
    node = {"name": "vm", "gpus": [{"type": "CPUX", "count": 4}], "intra_link": {"name": "lan", "bandwidth_gbps": 5,
                                                                                "latency_us": 40}}
    if slots:
        node["compute_slots"] = slots
    d = {"name": "vm", "device_types": [{"name": "CPUX", "peak_tflops": 0.1, "memory_gib": 8, "mem_bandwidth_gbps": 5,
                                                                          "interference_collective": interference, "interference_p2p": interference / 2,
                                         "comm_slowdown_collective": 2 * interference, "comm_slowdown_p2p": 0.0}],
         "nodes": [node]}
    if collectives is not None:
        d["collectives"] = collectives
    return d


def test_interpolation_by_hand():
    sizes, times = [8, 1000, 1_000_000], [100e-6, 120e-6, 1.1e-3]
    assert interpolated_time(sizes, times, 1) == 100e-6  # below the smallest size: its time
    assert interpolated_time(sizes, times, 504) == pytest.approx(110e-6)  # half way 8..1000
    assert interpolated_time(sizes, times, 1000) == pytest.approx(120e-6)
    # above the largest: the last segment's slope, (1.1e-3 - 120e-6) / 999000 per byte
    assert interpolated_time(sizes, times, 2_000_000) == pytest.approx(1.1e-3 + 0.98e-3 * 1e6 / 999e3)


def test_other_group_sizes_scale_by_the_ring_shape():
    # measured among 2: t(2, B); among 4 the ring formula with the fitted hop figures
    # (50 µs, 1 GB/s) scales it: t(4, B) = t(2, B) * (6 a + 1.5 B/b) / (2 a + B/b).
    assert collective_multipliers("allreduce", 4) == (6.0, 1.5)
    assert collective_multipliers("all_gather", 4) == (3.0, 0.75)
    assert collective_multipliers("broadcast", 5) == (3.0, 3.0)  # binomial tree: ceil(log2 5) rounds
    a, b, B = 50e-6, 1e9, 1000.0
    expect = 120e-6 * (6 * a + 1.5 * B / b) / (2 * a + 1.0 * B / b)
    got = measured_collective_time("allreduce", B, 4, 2, [8, 1000, 1e6], [100e-6, 120e-6, 1.1e-3], b, a)
    assert got == pytest.approx(expect)
    assert collective_time("allreduce", B, 4, b, a) == pytest.approx(6 * a + 1.5 * B / b)


def test_cluster_fields_round_trip_and_are_checked(tmp_path):
    c = cluster_from_dict(spec([TABLE], slots=2, interference=0.3), "c.yaml")
    assert c.nodes[0].compute_slots == 2 and c.nodes[0].shares_compute
    t = c.device_types["CPUX"]
    assert (t.interference_collective, t.interference_p2p, t.comm_slowdown_collective) == (0.3, 0.15, 0.6)
    (tmp_path / "c.yaml").write_text(dump_cluster_yaml(c))
    again = load_cluster(tmp_path / "c.yaml")
    assert again.to_dict() == c.to_dict() and again.fingerprint() == c.fingerprint()
    assert again.collectives == c.collectives
    # A cluster without them writes none (old files keep their fingerprints).
    plain = cluster_from_dict(spec(), "p.yaml")
    assert "collectives" not in plain.to_dict() and "compute_slots" not in plain.to_dict()["nodes"][0]
    for bad, where in [({**TABLE, "op": "gather"}, r"collectives\[0\]\.op"),
                       ({**TABLE, "ranks": 1}, r"collectives\[0\]\.ranks"),
                       ({**TABLE, "seconds": [1e-4, 2e-4]}, r"collectives\[0\]\.seconds"),
                       ({**TABLE, "bytes": [8, 8, 9]}, r"collectives\[0\]\.bytes"),
                       ({**TABLE, "latency_us": -1}, r"collectives\[0\]\.latency_us")]:
        with pytest.raises(SpecError, match=where):
            cluster_from_dict(spec([bad]), "bad.yaml")
    with pytest.raises(SpecError, match=r"nodes\[0\]\.compute_slots"):
        cluster_from_dict(spec(slots=-1), "bad.yaml")


def test_measured_tables_replace_the_formulas_where_they_apply():
    c = cluster_from_dict(spec([TABLE]), "c.yaml")
    plain = cluster_from_dict(spec(), "p.yaml")
    two, four = ["vm/0", "vm/1"], ["vm/0", "vm/1", "vm/2", "vm/3"]
    assert allreduce_time(c, two, 1000, "ring") == pytest.approx(120e-6)
    # no table: the ring formula over the intra link (5 GB/s, 40 µs)
    assert allreduce_time(plain, two, 1000, "ring") == pytest.approx(2 * 40e-6 + 1000 / 5e9)
    assert allreduce_time(c, four, 1000, "ring") == pytest.approx(
        120e-6 * (6 * 50e-6 + 1.5 * 1e-6) / (2 * 50e-6 + 1e-6))
    # the loss all-reduce: 8 bytes among the plan's devices
    assert loss_reduction_time(c, two) == pytest.approx(100e-6)
    assert loss_reduction_time(plain, two) == pytest.approx(40e-6 + 8 / 5e9)  # recursive doubling: 1 round
    assert loss_reduction_time(plain, four) == pytest.approx(2 * (40e-6 + 8 / 5e9))  # 2 rounds
    # a collective the profile did not measure falls back to the formula
    assert group_collective_time(c, "broadcast", two, 1000) == pytest.approx(40e-6 + 1000 / 5e9)
    # a table for another link class does not apply
    other = cluster_from_dict(spec([{**TABLE, "link": "nvlink"}]), "o.yaml")
    assert allreduce_time(other, two, 1000, "ring") == pytest.approx(2 * 40e-6 + 1000 / 5e9)


def test_prediction_and_simulation_use_the_measured_collective():
    """Data parallel on two devices: the gradient all-reduce and the loss reduction come
    from the table in the prediction, in the simulation without contention (the formulas
    played out) and alone on the links with contention (its steps are fitted to it)."""
    c = cluster_from_dict(spec([TABLE]), "c.yaml")
    cg = analytic_cost_graph(get_model("gpt2-tiny"), 32, precision="fp32")
    plan = hand_plan(c, cg, [[((0, cg.num_layers), [("vm/0", 2)])], [((0, cg.num_layers), [("vm/1", 2)])]],
                     num_microbatches=1, schedule="gpipe")
    pred = predict(plan, c, cg)
    grads = cg.total_params * 4
    assert pred.sync_time_s == pytest.approx(interpolated_time([8, 1000, 1e6], [100e-6, 120e-6, 1.1e-3], grads))
    assert pred.loss_reduction_time_s == pytest.approx(100e-6)
    ref = simulator.simulate(plan, c, cg, contention=False, overlap=False)
    assert ref.iteration_time_s == pytest.approx(pred.iteration_time_s, rel=1e-12)
    links = simulator.simulate(plan, c, cg, contention=True, overlap=False)
    assert links.iteration_time_s == pytest.approx(pred.iteration_time_s, rel=1e-9)
    # and the simulated step splits into the kinds of work the runtime measures
    work = ref.devices["vm/0"]["work_s"]
    assert sum(work.values()) == pytest.approx(ref.iteration_time_s, rel=1e-12)
    assert work["loss"] == pytest.approx(100e-6) and work["allreduce"] == pytest.approx(pred.sync_time_s)
