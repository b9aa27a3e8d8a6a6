"""The time a first or last stage's rank spends building its inputs or labels at the
start of a step (hetalloc.costs.input_time, DeviceType.data_us / data_sample_us), its
fit from the profile's training runs, and its place in the formulas and the simulator.
Timelines worked out by hand below."""

from __future__ import annotations

import pytest

from hetalloc.cluster import cluster_from_dict
from hetalloc.costs import input_time
from hetalloc.evaluate import predict
from runtime.profile.overhead import fit_data
from simulator import simulate
from simulator.engine import SimOptions, Simulation

from test_sim_compute import LOSS_2, graph, ops, plan


def cluster(data_us: float = 0.0, data_sample_us: float = 0.0):
    """Three devices of type X on one node, links of 1 GB/s without latency."""
    return cluster_from_dict({"name": "toy", "device_types": [
        {"name": "X", "peak_tflops": 1, "memory_gib": 100, "mem_bandwidth_gbps": 32, "data_us": data_us,
         "data_sample_us": data_sample_us}],
        "nodes": [{"name": "n", "gpus": [{"type": "X", "count": 3}],
                   "intra_link": {"bandwidth_gbps": 1.0, "latency_us": 0.0}}]})


def test_input_time_hand_calc_and_fit():
    dt = cluster(250.0, 25.0).dtype("n/0")
    assert input_time(8, dt) == pytest.approx(250e-6 + 8 * 25e-6) and input_time(0, dt) == 0.0
    # two runs of 4 and 16 samples a step: 0.35 ms and 0.65 ms -> 0.25 ms + 25 µs a sample
    a, d = fit_data({4: 0.35e-3, 16: 0.65e-3})
    assert a == pytest.approx(0.25e-3) and d == pytest.approx(25e-6)
    assert fit_data({4: 0.5e-3, 16: 0.4e-3}) == (pytest.approx(0.5e-3), 0.0)  # never negative
    # the figures travel through cluster.yaml
    c = cluster(250.0, 25.0)
    back = cluster_from_dict(c.to_dict())
    assert back.dtype("n/0").data_us == 250.0 and back.dtype("n/0").data_sample_us == 25.0


def test_first_and_last_stages_build_their_inputs_before_their_first_op():
    # Three stages (layer k on n/k), one micro-batch of 1 sample, fwd 1 s, bwd 2 s,
    # activations 0.5 s on the link; inputs 0.2 s + 0.3 s a sample = 0.5 s on the first
    # and the last stage, none on the middle one. n/0: inputs [0, 0.5], F [0.5, 1.5];
    # n/1: F [2, 3]; n/2 built its labels by 0.5, F [3.5, 4.5], B [4.5, 6.5]; n/1: B
    # [7, 9]; n/0: B [9.5, 11.5]; then the loss all-reduce.
    c = cluster(2e5, 3e5)
    p = plan([[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)]), (2, 3, [("n/2", 1)])]], 1)
    res = Simulation(p, c, graph(num_layers=3), SimOptions()).run()
    assert sorted(ops(res)) == sorted([
        ("n/0", "F mb0 L0-0", 0.5, 1.5), ("n/1", "F mb0 L1-1", 2.0, 3.0), ("n/2", "F mb0 L2-2", 3.5, 4.5),
        ("n/2", "B mb0 L2-2", 4.5, 6.5), ("n/1", "B mb0 L1-1", 7.0, 9.0), ("n/0", "B mb0 L0-0", 9.5, 11.5)])
    assert [(a.device, a.t0, a.t1) for a in res.activities if a.kind == "data"] == [
        ("n/0", 0.0, pytest.approx(0.5)), ("n/2", 0.0, pytest.approx(0.5))]
    rep = simulate(p, c, graph(num_layers=3))
    assert rep.iteration_time_s == pytest.approx(11.5 + 2 * LOSS_2)  # the loss all-reduce among 3: 2 rounds
    w0 = rep.devices["n/0"]["work_s"]
    assert w0["other"] == pytest.approx(0.5) and w0["p2p"] == pytest.approx(9.5 - 1.5)  # its wait for the gradient
    # the formulas play the same timeline (contention and overlap off: the simulation is the prediction)
    off = simulate(p, c, graph(num_layers=3), contention=False, overlap=False)
    assert off.iteration_time_s == pytest.approx(predict(p, c, graph(num_layers=3)).iteration_time_s)
    assert predict(p, c, graph(num_layers=3)).iteration_time_s == pytest.approx(
        predict(p, cluster(), graph(num_layers=3)).iteration_time_s + 0.5)


def test_runtime_overhead_fit_leaves_the_inputs_out(tmp_path):
    # After the 2 warm-up steps, 'other' of 1, 2 and 6 ms of which 0.4 ms building inputs:
    # the per-op and per-step fit sees the mean (1 + 2 + 6) / 3 - 0.4 = 2.6 ms (the inputs
    # are priced apart; the mean, stall of the third step included: a step of many ops
    # has many chances of one, so its median holds about the ops' mean).
    import json
    from runtime.profile.overhead import _mean_other
    path = tmp_path / "metrics.rank0.jsonl"
    path.write_text("\n".join(json.dumps({"other_s": 1e-3 * k, "data_s": 0.4e-3}) for k in (9, 9, 1, 2, 6)))
    assert _mean_other(path) == pytest.approx(2.6e-3)
