"""The simulator against the shared cost formulas and against the baselines, on every
example cluster: with contention and overlap off it must reproduce
hetalloc.evaluate.predict (within 1 %); with them on, the planner's plan must not be
slower than the even split; folding identical replicas must change nothing."""

from __future__ import annotations

import pytest

from hetalloc.evaluate import predict, sync_groups
from simulator import simulate
from workflows.examples import INSTANCES, chained, example_plans


@pytest.fixture(scope="module")
def instances():
    return {name: example_plans(name, model, batch) for name, model, batch in INSTANCES}


@pytest.mark.parametrize("name", [i[0] for i in INSTANCES])
def test_reference_mode_equals_the_cost_formulas(instances, name):
    cl, cg, plans = instances[name]
    checked = 0
    for label, plan in plans.items():
        pred = predict(plan, cl, cg).iteration_time_s
        sim = simulate(plan, cl, cg, contention=False, overlap=False, compare=False).iteration_time_s
        if chained(plan, cl, cg):
            # A collective waits for all its holders; the formula sums each device's groups as
            # if the others were free, so time can only be added — never more than all groups.
            extra = sum(g.time_s for g in sync_groups(plan, cl, cg))
            assert pred * (1 - 1e-9) <= sim <= pred + extra, label
            continue
        assert sim == pytest.approx(pred, rel=0.01), label
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("name", [i[0] for i in INSTANCES])
def test_planner_not_slower_than_even_split_in_simulation(instances, name):
    cl, cg, plans = instances[name]
    planner = simulate(plans["planner"], cl, cg, compare=False).iteration_time_s
    even = [simulate(p, cl, cg, compare=False).iteration_time_s for k, p in plans.items() if k.startswith("even/")]
    assert even
    assert planner <= min(even) * (1 + 1e-9)


@pytest.mark.parametrize("name", ["lab-16", "mix-64"])
def test_folding_identical_replicas_is_exact(instances, name):
    cl, cg, plans = instances[name]
    for label in ("planner", "even/1f1b"):
        plan = plans[label]
        folded = simulate(plan, cl, cg, compare=False)
        full = simulate(plan, cl, cg, compare=False, fold=False)
        assert full.folding["simulated_devices"] == len(plan.device_ids())
        assert folded.iteration_time_s == pytest.approx(full.iteration_time_s, rel=1e-12), label
        for d, stats in full.devices.items():
            assert folded.devices[d]["busy_s"] == pytest.approx(stats["busy_s"], rel=1e-9, abs=1e-12)


def test_large_differences_are_explained(instances):
    cl, cg, plans = instances["mix-64"]
    rep = simulate(plans["planner"], cl, cg, explain=True)
    if abs(rep.predicted["difference"]) > 0.05:
        assert rep.notes and "vs predicted" in rep.notes[0]
        assert any("reference" in n for n in rep.notes)
    else:
        assert not rep.notes or "vs predicted" not in rep.notes[0]


def _cross_node_replicas(pairs):
    from test_sim_timeline import toy_plan
    return toy_plan([[(0, 1, [(a, 1)]), (1, 2, [(b, 1)])] for a, b in pairs], 4, "1f1b")


def test_folding_applies_where_symmetric_and_is_refused_where_not():
    from test_sim_timeline import toy_cluster, toy_graph
    cl = toy_cluster({"a": 2, "b": 3, "c": 1}, intra_gbps=100.0, nic_gbps=1.0)
    cg = toy_graph(params=10**6)
    # a/0->b/0 and a/1->b/1 share a's NIC alike: one pipeline stands for both.
    sym = _cross_node_replicas([("a/0", "b/0"), ("a/1", "b/1")])
    # Adding c/0->b/2 gives a replica of the same shape whose NIC is not shared: the
    # three must be simulated one by one.
    asym = _cross_node_replicas([("a/0", "b/0"), ("a/1", "b/1"), ("c/0", "b/2")])
    for plan, simulated in ((sym, 2), (asym, 6)):
        folded, full = simulate(plan, cl, cg, compare=False), simulate(plan, cl, cg, compare=False, fold=False)
        assert folded.folding["simulated_devices"] == simulated
        assert folded.iteration_time_s == pytest.approx(full.iteration_time_s, rel=1e-12)
    # without contention nothing couples them: all three fold
    assert simulate(asym, cl, cg, contention=False, compare=False).folding["simulated_devices"] == 2


def test_wide_stages_split_into_independent_chains():
    from test_sim_timeline import toy_cluster, toy_graph, toy_plan
    cl, cg = toy_cluster({"n": 4}, intra_gbps=10.0), toy_graph(params=10**6)
    wide = toy_plan([[(0, 1, [("n/0", 1), ("n/1", 1)]), (1, 2, [("n/2", 1), ("n/3", 1)])]], 4, "gpipe")
    rep = simulate(wide, cl, cg, compare=False)
    assert rep.folding["simulated_devices"] == 2 and rep.folding["pipelines"] == 2
    assert rep.iteration_time_s == pytest.approx(simulate(wide, cl, cg, compare=False, fold=False).iteration_time_s,
                                                 rel=1e-12)
    uneven = toy_plan([[(0, 1, [("n/0", 1), ("n/1", 2)]), (1, 2, [("n/2", 2), ("n/3", 1)])]], 4, "gpipe")
    assert simulate(uneven, cl, cg, compare=False).folding["pipelines"] == 1  # slices overlap across
