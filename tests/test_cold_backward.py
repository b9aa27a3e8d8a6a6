"""The backward from cold caches (TimeTable.bwd_cold_s): a backward that other ops ran
before, after its own forward, reads its saved activations back from memory; the profile
times it after flushing the last-level cache. Timelines worked out by hand below."""

from __future__ import annotations

import pytest

from hetalloc.costgraph import TimeTable, cost_graph_from_dict
from hetalloc.errors import SpecError
from hetalloc.evaluate import predict
from runtime.profile.overhead import profiled_compute
from simulator import simulate
from simulator.engine import SimOptions, Simulation

from test_sim_compute import graph, plan, ops
from test_sim_noise import cluster


def cold_graph(num_layers: int = 2, cold_s: float = 3.0):
    """Layers of fwd 1 s, bwd 2 s warm and `cold_s` cold, activations 0.5 s on the link."""
    cg = graph(num_layers=num_layers)
    t = cg.tables["X"]
    return cg.with_tables({"X": TimeTable(t.batch_sizes, t.fwd_s, t.bwd_s, bwd_cold_s=[[cold_s]] * num_layers)})


def test_table_keeps_the_cold_backward_never_below_the_warm_one():
    cg = cold_graph()
    d = cg.to_dict()
    assert d["tables"]["X"]["bwd_cold_s"] == [[3.0], [3.0]]
    back = cost_graph_from_dict(d)
    dt = cluster().dtype("n/0")
    assert back.range_time(0, 2, dt, 1) == (2.0, 4.0) and back.range_time(0, 2, dt, 1, cold=True) == (2.0, 6.0)
    # a cold time measured below the warm one is noise: the warm one stands
    low = TimeTable([1], [[1.0]], [[2.0]], bwd_cold_s=[[1.5]])
    assert low.at(0, 1, cold=True) == (1.0, 2.0)
    # a table without it: the warm times, and the graph serialises (and fingerprints) as before
    plain = graph(num_layers=2)
    assert "bwd_cold_s" not in plain.to_dict()["tables"]["X"] and plain.range_time(0, 2, dt, 1, cold=True) == (2.0, 4.0)
    bad = cg.to_dict()
    bad["tables"]["X"]["bwd_cold_s"] = [[3.0]]
    with pytest.raises(SpecError, match="bwd_cold_s"):
        cost_graph_from_dict(bad)


def test_simulated_backwards_are_cold_unless_right_after_their_forward():
    # Two stages (layer 0 on n/0, layer 1 on n/1), 2 micro-batches, 1F1B. n/1 (last
    # stage) runs F0 [1.5, 2.5], B0 warm [2.5, 4.5], F1 [4.5, 5.5] (mb1 came at 2.5),
    # B1 warm [5.5, 7.5]. n/0: F0 [0, 1], F1 [1, 2], then B0 once the gradient came
    # (4.5 + 0.5 = 5), cold: [5, 8]; B1 (gradient at 8) cold: [8, 11].
    p = plan([[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)])]], 2, "1f1b")
    res = Simulation(p, cluster(), cold_graph(), SimOptions()).run()
    assert sorted(ops(res)) == sorted([
        ("n/0", "F mb0 L0-0", 0.0, 1.0), ("n/0", "F mb1 L0-0", 1.0, 2.0),
        ("n/0", "B mb0 L0-0", 5.0, 8.0), ("n/0", "B mb1 L0-0", 8.0, 11.0),
        ("n/1", "F mb0 L1-1", 1.5, 2.5), ("n/1", "B mb0 L1-1", 2.5, 4.5),
        ("n/1", "F mb1 L1-1", 4.5, 5.5), ("n/1", "B mb1 L1-1", 5.5, 7.5)])
    # the formulas play the same op order: with contention and overlap off (sends block
    # the op that made them) the simulation is the prediction
    rep = simulate(p, cluster(), cold_graph(), contention=False, overlap=False)
    assert rep.iteration_time_s == pytest.approx(predict(p, cluster(), cold_graph()).iteration_time_s)
    assert predict(p, cluster(), cold_graph()).iteration_time_s > predict(p, cluster(), graph(2)).iteration_time_s


def test_profile_fit_of_compute_counts_the_cold_backwards():
    # The calibration plan's first stage (1F1B, 2 stages, M = 2) runs F F B B: both
    # backwards cold, 2 x 1 + 2 x 3 = 8 s of profiled compute; the last stage F B F B
    # warm: 2 x (1 + 2) = 6 s. (What a run measures beyond it is the op's extra compute.)
    p = plan([[(0, 1, [("n/0", 1)]), (1, 2, [("n/1", 1)])]], 2, "1f1b")
    dt = cluster().dtype("n/0")
    assert profiled_compute(cold_graph(), p, 0, dt) == pytest.approx(8.0)
    assert profiled_compute(cold_graph(), p, 1, dt) == pytest.approx(6.0)
