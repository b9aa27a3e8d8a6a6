"""The simulator against the shared cost formulas and against the baselines, on every
example cluster: with contention and overlap off it must reproduce
hetalloc.evaluate.predict (within 1 %); with them on, the planner's plan must not be
slower than the even split; folding identical replicas must change nothing."""

from __future__ import annotations

import pytest

from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.evaluate import predict, sync_groups
from hetalloc.models import get_model
from simulator import simulate
from workflows.examples import EXAMPLES, INSTANCES, chained, example_plans


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


# ---- schema-2 plans: tensor-parallel groups, recomputation, zero1 -------------------------

def _plan(cg, replicas, M, schedule="1f1b", sharding="none", grad_sync="ring"):
    from hetalloc.plan import Group, Plan, Replica, Stage
    reps = [Replica([Stage(a, b, [Group(list(d), s) for d, s in groups], rc) for a, b, groups, rc in r])
            for r in replicas]
    return Plan(cg.model, cg.seq_len, M * sum(r.microbatch for r in reps), M, schedule, grad_sync, reps,
                precision=cg.precision, optimizer_sharding=sharding)


def _a(*ks):
    return tuple(f"a100/{k}" for k in ks)


def _v(*ks):
    return tuple(f"v100/{k}" for k in ks)


def v2_plans(cg):
    """Hand-made schema-2 plans of GPT-3 1.3B (26 layers) on lab-16 (8 A100-40G on NVLink3,
    8 V100-16G on NVLink2, IB-EDR between): label -> (plan, chained)."""
    out = {}
    # one group per stage, t = 4 -> 2 -> 1 (rank pairs between sizes), the V100 stages recomputed
    pipe = [[(0, 9, [(_a(0, 1, 2, 3), 2)], "none"), (9, 18, [(_v(0, 1), 2)], "full"), (18, 26, [(_v(2), 2)], "full")]]
    out["tp pipeline 1f1b"] = (_plan(cg, pipe, 4), False)
    out["tp pipeline gpipe zero1"] = (_plan(cg, pipe, 4, "gpipe", "zero1"), False)
    # two replicas of 4-way groups: each parameter slice reduced by one pair of devices
    dp = [[(0, 13, [(_a(4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3), 2)], "none"),
           (13, 26, [(_v(4 * r, 4 * r + 1, 4 * r + 2, 4 * r + 3), 2)], "full")] for r in range(2)]
    for alg in ("ring", "hierarchical", "param_server"):
        out[f"tp dp {alg}"] = (_plan(cg, dp, 4, grad_sync=alg), False)
        out[f"tp dp {alg} zero1"] = (_plan(cg, dp, 4, sharding="zero1", grad_sync=alg), False)
    # eight 2-way replicas, four per node: each slice reduced by 4 + 4 devices across the nodes
    dp8 = [[(0, 26, [((f"{n}/{2 * r}", f"{n}/{2 * r + 1}"), 1)], "full")] for n in ("a100", "v100") for r in range(4)]
    for alg in ("ring", "hierarchical", "param_server"):
        out[f"tp dp8 {alg} zero1"] = (_plan(cg, dp8, 2, sharding="zero1", grad_sync=alg), False)
    # groups of different sizes in one stage, uneven shares, another cut in the second replica
    mixed = [[(0, 13, [(_a(0, 1, 2, 3), 3), (_a(4, 5), 1)], "none"),
              (13, 26, [(_v(0, 1, 2, 3), 2), (_v(4), 1), (_v(5), 1)], "full")],
             [(0, 10, [(_a(6, 7), 2)], "full"), (10, 26, [(_v(6, 7), 2)], "full")]]
    out["mixed zero1"] = (_plan(cg, mixed, 4, sharding="zero1"), True)
    out["mixed gpipe"] = (_plan(cg, mixed, 4, "gpipe"), True)
    return out


@pytest.fixture(scope="module")
def lab_v2():
    cl = load_cluster(EXAMPLES / "lab-16.yaml")
    cg = analytic_cost_graph(get_model("gpt3-1.3b"))
    return cl, cg, v2_plans(cg)


def test_schema2_plans_reference_mode_equals_the_cost_formulas(lab_v2):
    from hetalloc.plan import validate_plan
    cl, cg, plans = lab_v2
    exact = 0
    for label, (plan, is_chained) in plans.items():
        validate_plan(plan, cl, cg)  # they fit
        assert is_chained == chained(plan, cl, cg), label
        pred = predict(plan, cl, cg).iteration_time_s
        for fold in (True, False):
            sim = simulate(plan, cl, cg, contention=False, overlap=False, compare=False, fold=fold).iteration_time_s
            if is_chained:
                extra = sum(g.time_s for g in sync_groups(plan, cl, cg))
                assert pred * (1 - 1e-9) <= sim <= pred + extra, label
            else:
                assert sim == pytest.approx(pred, rel=1e-9), label
                exact += 1
    assert exact == 2 * 11


def test_schema2_options_cost_what_the_formulas_say(lab_v2):
    cl, cg, plans = lab_v2
    plan = plans["tp dp ring"][0]
    base = predict(plan, cl, cg)
    z = predict(plans["tp dp ring zero1"][0], cl, cg)
    assert z.pipeline_time_s == base.pipeline_time_s and z.sync_time_s == pytest.approx(base.sync_time_s)
    assert z.optimizer_time_s < base.optimizer_time_s  # half of the state per device
    assert max(m.optimizer for m in z.memory.values()) == pytest.approx(
        max(m.optimizer for m in base.memory.values()) / 2)
    st = [s for s in base.stages if s["stage"] == 1][0]
    assert st["tp_s"] > 0 and st["bwd_s"] > 2 * st["fwd_s"]  # recomputed: backward + forward again


@pytest.mark.parametrize("label", ["tp pipeline 1f1b", "tp dp hierarchical zero1", "tp dp8 param_server zero1",
                                   "mixed zero1"])
def test_schema2_plans_with_contention_and_overlap(lab_v2, label):
    cl, cg, plans = lab_v2
    plan = plans[label][0]
    ref = simulate(plan, cl, cg, contention=False, overlap=False, compare=False)
    rep = simulate(plan, cl, cg, explain=True)
    assert 0 < rep.iteration_time_s
    # the tensor-parallel all-reduces, recomputation and zero1 show in the timeline
    kinds = {a.kind for a in rep.result.activities}
    assert "tp" in kinds
    if plan.optimizer_sharding == "zero1" and rep.result.groups:
        assert {"reducescatter", "allgather"} <= kinds and "allreduce" not in kinds
    tp_acts = [a for a in ref.result.activities if a.kind == "tp"]
    w = ref.result.work[tp_acts[0].device]
    assert tp_acts[0].t1 - tp_acts[0].t0 == pytest.approx(w.tp_fwd_s if "F " in tp_acts[0].name else w.tp_bwd_s)
    # ... and in the trace: a TP lane, the ranks' own lanes
    from simulator.trace import trace_events
    events = trace_events(rep)
    cats = {e.get("cat") for e in events}
    assert "tp" in cats and ("allgather" in cats) == (plan.optimizer_sharding == "zero1" and bool(rep.result.groups))
    threads = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert "tp" in threads and any(t.startswith("p2p rank 1 (") for t in threads)
    procs = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert any("(TP " in p for p in procs)
    # folding stays exact with tensor-parallel rings on the links
    full = simulate(plan, cl, cg, compare=False, fold=False)
    assert rep.iteration_time_s == pytest.approx(full.iteration_time_s, rel=1e-12)
