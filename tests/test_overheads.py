"""The runtime's own time per op and per step (DeviceType.op_overhead_us /
step_overhead_us, measured by hetalloc profile) enters every estimate through the shared
formulas: the planner's objective, the prediction and the simulation agree with it, and
it is read from and written to cluster files."""

from dataclasses import replace

import pytest

import simulator
from allocator import make_plan
from hetalloc.cluster import cluster_from_dict, dump_cluster_yaml, load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.costs import optimizer_time
from hetalloc.errors import SpecError
from hetalloc.models import get_model

SPEC = {
    "name": "two-cpus",
    "device_types": [
        {"name": "FAST", "peak_tflops": 0.2, "memory_gib": 8, "mem_bandwidth_gbps": 10,
         "op_overhead_us": 150, "step_overhead_us": 400},
        {"name": "SLOW", "peak_tflops": 0.1, "memory_gib": 8, "mem_bandwidth_gbps": 10,
         "op_overhead_us": 90},
    ],
    "nodes": [{"name": "vm", "gpus": [{"type": "FAST", "count": 1}, {"type": "SLOW", "count": 1}],
               "intra_link": {"bandwidth_gbps": 5, "latency_us": 40}}],
}


@pytest.fixture(scope="module")
def setup():
    return cluster_from_dict(SPEC, "two-cpus"), analytic_cost_graph(get_model("gpt2-tiny"), 64)


def test_fields_are_read_written_and_checked(setup, tmp_path):
    cluster, _ = setup
    fast, slow = cluster.device_types["FAST"], cluster.device_types["SLOW"]
    assert fast.op_overhead_s == pytest.approx(150e-6) and fast.step_overhead_s == pytest.approx(400e-6)
    assert (slow.op_overhead_us, slow.step_overhead_us) == (90, 0)
    (tmp_path / "c.yaml").write_text(dump_cluster_yaml(cluster))
    again = load_cluster(tmp_path / "c.yaml")
    assert again.device_types["FAST"] == fast and again.device_types["SLOW"] == slow
    bad = {**SPEC, "device_types": [{**SPEC["device_types"][0], "op_overhead_us": -1}]}
    with pytest.raises(SpecError, match=r"device_types\[0\]\.op_overhead_us"):
        cluster_from_dict(bad, "bad.yaml")


def test_compute_quantiles_are_read_written_and_checked(tmp_path):
    spec = {**SPEC, "device_types": [{**SPEC["device_types"][0], "compute_quantiles": [-0.05, 0, 0.02, 0.4]},
                                     SPEC["device_types"][1]]}
    cluster = cluster_from_dict(spec, "q.yaml")
    assert cluster.device_types["FAST"].compute_quantiles == (-0.05, 0.0, 0.02, 0.4)
    assert cluster.device_types["SLOW"].compute_quantiles == ()
    (tmp_path / "c.yaml").write_text(dump_cluster_yaml(cluster))
    assert load_cluster(tmp_path / "c.yaml").device_types == cluster.device_types
    for value, why in (([0.1, 0.0], "must ascend"), ([0.1], "at least 2"), ("0.1", "at least 2")):
        bad = {**SPEC, "device_types": [{**SPEC["device_types"][0], "compute_quantiles": value}]}
        with pytest.raises(SpecError, match=rf"device_types\[0\]\.compute_quantiles.*{why}"):
            cluster_from_dict(bad, "bad.yaml")


def test_formulas_add_them_once_per_op_and_per_step(setup):
    cluster, cg = setup
    fast = cluster.device_types["FAST"]
    bare = replace(fast, op_overhead_us=0.0, step_overhead_us=0.0)
    f, b = cg.range_time(1, 4, fast, 2)
    f0, b0 = cg.range_time(1, 4, bare, 2)
    assert (f - f0, b - b0) == (pytest.approx(150e-6), pytest.approx(150e-6))
    params = cg.params(0, 6)
    assert optimizer_time(params, fast, "fp32", "adamw") - optimizer_time(params, bare, "fp32", "adamw") \
        == pytest.approx(400e-6)


def test_planner_prediction_and_simulation_agree_with_overheads(setup):
    cluster, cg = setup
    plan = make_plan(cluster, cg, 16, time_limit=20)
    predicted = plan.predicted["iteration_time_s"]
    # The planner's model leaves out the end-of-step loss all-reduce over all devices (the
    # same for every plan on these devices); the prediction and the simulation include it.
    loss = plan.predicted["loss_reduction_time_s"]
    assert loss == pytest.approx(40e-6 + 8 / 5e9)  # 2 devices: one round of recursive doubling
    assert plan.solver["objective_s"] + loss == pytest.approx(predicted, rel=1e-9)
    sim = simulator.simulate(plan, cluster, cg, contention=False, overlap=False)
    assert sim.iteration_time_s == pytest.approx(predicted, rel=1e-9)
    # without the overheads the same plan is predicted faster, by at least one step overhead
    bare = {n: replace(t, op_overhead_us=0.0, step_overhead_us=0.0) for n, t in cluster.device_types.items()}
    plain = make_plan(replace(cluster, device_types=bare, _path_cache={}), cg, 16, time_limit=20)
    assert plain.predicted["iteration_time_s"] < predicted
