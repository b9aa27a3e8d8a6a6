"""What-if scenarios: cluster transformations, the old plan's validity, re-planning that
respects failures, prices, sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from allocator import baseline_plan
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.errors import SpecError
from hetalloc.models import get_model
from simulator import scenarios
from simulator import simulate
from workflows import whatif
from test_sim_timeline import toy_cluster, toy_graph, toy_plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = whatif.WhatIfOptions(planner="even", sim={"contention": True, "overlap": True})


@pytest.fixture(scope="module")
def lab():
    cl = load_cluster(EXAMPLES / "lab-16.yaml")
    cg = analytic_cost_graph(get_model("gpt3-1.3b"))
    plan = baseline_plan("pipedream", cl, cg, 64)
    return scenarios.Case(cl, cg, 64, plan)


def test_failed_device_invalidates_old_plan_and_replan_excludes_it(lab):
    assert "a100/3" in lab.old_plan.device_ids()
    case = scenarios.apply_scenario(scenarios.scenario("fail", "a100/3"), lab)
    assert case.old_plan is None
    assert "a100/3" in case.old_invalid and "re-plan" in case.old_invalid
    assert "a100/3" not in case.cluster.device_by_id
    assert "a100/4" in case.cluster.device_by_id  # the others keep their ids
    new = whatif.replan(case, lab.old_plan, FAST)
    assert "a100/3" not in new.device_ids() and new.device_ids()
    row = whatif.scenario_row("fail a100/3", case, lab.old_plan, FAST)
    assert row["old_plan_s"] is None and row["replan_s"] > 0 and row["devices"] == 15


def test_failed_node_and_unknown_target(lab):
    case = scenarios.apply_scenario(scenarios.scenario("fail", "v100"), lab)
    assert case.cluster.num_devices == 8 and {d.type for d in case.cluster.devices} == {"A100-40G"}
    with pytest.raises(SpecError, match="no device or node 'x100'"):
        scenarios.apply_scenario(scenarios.scenario("fail", "x100"), lab)


def test_swap_add_remove(lab):
    case = scenarios.apply_scenario(scenarios.scenario("swap", "8xV100=4xH100"), lab)
    assert case.cluster.type_counts() == {"A100-40G": 8, "H100-80G": 4}
    node = case.cluster.node_by_name["v100"]
    assert [d.id for d in node.devices] == ["v100/8", "v100/9", "v100/10", "v100/11"]  # new ids
    assert node.intra.name == "NVLink2"  # the node keeps its links
    assert case.old_plan is None and "v100/" in case.old_invalid
    case = scenarios.apply_scenario(scenarios.scenario("add", "8xH100-80G@NVLink4/IB-NDR"), lab)
    assert case.cluster.num_devices == 24 and case.old_plan is not None
    added = case.cluster.node_by_name["added0"]
    assert added.intra.name == "NVLink4" and added.nic.name == "IB-NDR"
    case = scenarios.apply_scenario(scenarios.scenario("remove", "4xV100-16G"), lab)
    assert case.cluster.type_counts() == {"A100-40G": 8, "V100-16G": 4}
    with pytest.raises(SpecError, match="cannot remove 9"):
        scenarios.apply_scenario(scenarios.scenario("remove", "9xV100-16G"), lab)


def test_link_changes_and_units(lab):
    assert scenarios.parse_bandwidth("200Gb/s", "x") == 25e9
    assert scenarios.parse_bandwidth("25GB/s", "x") == 25e9 == scenarios.parse_bandwidth("25", "x")
    case = scenarios.apply_scenario(scenarios.scenario("link", "v100.nic=400Gb/s,2us"), lab)
    v100, a100 = case.cluster.node_by_name["v100"], case.cluster.node_by_name["a100"]
    assert v100.nic.bandwidth_bytes_per_s == 50e9 and v100.nic.latency_s == pytest.approx(2e-6)
    assert a100.nic.bandwidth_bytes_per_s == 12.5e9
    assert case.old_plan is not None  # same devices: the old plan still runs
    case = scenarios.apply_scenario(scenarios.scenario("link", "fabric=4"), lab)
    assert case.cluster.fabric_oversubscription == 4
    slow_net = scenarios.apply_scenario(scenarios.scenario("link", "nic=1Gb/s"), lab)
    fast = simulate(lab.old_plan, lab.cluster, lab.cg, compare=False).iteration_time_s
    slow = simulate(slow_net.old_plan, slow_net.cluster, slow_net.cg, compare=False).iteration_time_s
    assert slow > fast


def test_straggler_slows_exactly_by_its_factor():
    # One device: fwd 1 s + bwd 2 s + optimizer 1 s = 4 s; twice as slow: 8 s.
    cl, cg = toy_cluster({"n": 1}), toy_graph(num_layers=1, params=10**9)
    plan = toy_plan([[(0, 1, [("n/0", 1)])]], 1, "gpipe")
    base = scenarios.Case(cl, cg, 1, plan)
    assert simulate(plan, cl, cg, compare=False).iteration_time_s == pytest.approx(4.0)
    case = scenarios.apply_scenario(scenarios.scenario("slow", "n/0=2"), base)
    assert case.cluster.device("n/0").type == "X@x2" and case.old_plan is not None
    assert simulate(case.old_plan, case.cluster, case.cg, compare=False).iteration_time_s == pytest.approx(8.0)


def test_batch_and_seq(lab):
    case = scenarios.apply_scenario(scenarios.scenario("batch", "128"), lab)
    per_round = lab.old_plan.global_batch // lab.old_plan.num_microbatches
    assert case.global_batch == 128
    assert case.old_plan.num_microbatches == 128 // per_round
    odd = scenarios.apply_scenario(scenarios.scenario("batch", str(per_round * 3 + 1)), lab)
    assert odd.old_plan is None and "not a multiple" in odd.old_invalid
    case = scenarios.apply_scenario(scenarios.scenario("seq", "1024"), lab)
    assert case.cg.seq_len == 1024 and case.old_plan.seq_len == 1024
    # the cost graph's own tensor-parallel efficiencies survive the new length
    tuned = scenarios.Case(lab.cluster, lab.cg.with_tp_efficiency({"*": {4: 0.5}}), 64, lab.old_plan)
    assert scenarios.apply_scenario(scenarios.scenario("seq", "1024"), tuned).cg.tp_efficiency == {"*": {4: 0.5}}


def test_prices_and_cheapest_meeting_deadline(lab):
    priced = scenarios.with_prices(lab.cluster, {"A100-40G": 1.0, "V100": 0.5})
    assert scenarios.cost_per_hour(priced) == 8 * 1.0 + 8 * 0.5
    rows = [{"scenario": "a", "best_s": 1.0, "usd_per_iteration": 3.0},
            {"scenario": "b", "best_s": 2.0, "usd_per_iteration": 1.0},
            {"scenario": "c", "best_s": 9.0, "usd_per_iteration": 0.5}]
    # 3600 steps: a takes 1 h, b 2 h, c 9 h; within 4 h the cheapest is b.
    assert whatif.cheapest_meeting(rows, 3600, 4.0)["scenario"] == "b"
    assert whatif.cheapest_meeting(rows, 3600, 0.5) is None


def test_run_rows_and_sweeps(lab):
    knob, values, unit, scs = scenarios.sweep_scenarios("nic=10..400Gb/s:3")
    assert (knob, unit) == ("nic", "Gb/s") and values == pytest.approx([10, 63.25, 400], rel=1e-3)
    assert scenarios.parse_sweep("batch=64,128") == ("batch", ["64", "128"], "")
    rows = whatif.run_scenarios(lab, scs + [scenarios.scenario("fail", "a100/0")], FAST)
    assert [r["scenario"] for r in rows][0] == "base"
    times = [r["old_plan_s"] for r in rows[1:4]]
    assert times[0] > times[1] >= times[2]  # more NIC bandwidth never hurts
    price = rows[0]["cost_per_hour_usd"]
    assert rows[0]["usd_per_iteration"] == pytest.approx(price * rows[0]["best_s"] / 3600)
    assert rows[0]["samples_per_usd"] == pytest.approx(64 / rows[0]["usd_per_iteration"])
    assert rows[-1]["old_plan_s"] is None and rows[-1]["replan_s"] > 0


def test_plan_options_toggled_on_the_old_plan():
    from hetalloc.evaluate import predict
    from hetalloc.plan import Group, Plan, Replica, Stage
    cl = load_cluster(EXAMPLES / "lab-16.yaml")
    cg = analytic_cost_graph(get_model("gpt3-1.3b"))
    # two replicas, each stage four single devices with one sample each
    reps = [Replica([Stage(0, 18, [Group([f"a100/{4 * r + k}"], 1) for k in range(4)]),
                     Stage(18, 26, [Group([f"v100/{4 * r + k}"], 1) for k in range(4)])]) for r in range(2)]
    plan = Plan(cg.model, cg.seq_len, 32, 4, "1f1b", "ring", reps, precision=cg.precision)
    base = scenarios.Case(cl, cg, 32, plan)
    tp4 = scenarios.apply_scenario(scenarios.scenario("tp", "4"), base).old_plan
    assert [[(g.devices, g.share) for g in s.groups] for s in tp4.replicas[1].stages] == [
        [(["a100/4", "a100/5", "a100/6", "a100/7"], 4)], [(["v100/4", "v100/5", "v100/6", "v100/7"], 4)]]
    tp2 = scenarios.apply_scenario(scenarios.scenario("tp", "2"), base).old_plan
    assert [(g.devices, g.share) for g in tp2.replicas[0].stages[0].groups] == [(["a100/0", "a100/1"], 2),
                                                                               (["a100/2", "a100/3"], 2)]
    back = scenarios.apply_scenario(scenarios.scenario("tp", "1"), scenarios.Case(cl, cg, 32, tp2))
    assert back.old_plan.to_dict()["replicas"] == plan.to_dict()["replicas"]
    bad = scenarios.apply_scenario(scenarios.scenario("tp", "8"), base)
    assert bad.old_plan is None and "4 A100-40G on node a100 do not make groups of 8" in bad.old_invalid
    with pytest.raises(SpecError, match="tensor-parallel degree is one of 1, 2, 4, 8"):
        scenarios.scenario("tp", "3")
    rc = scenarios.apply_scenario(scenarios.scenario("recompute", "full"), base).old_plan
    assert {s.recompute for r in rc.replicas for s in r.stages} == {"full"}
    z = scenarios.apply_scenario(scenarios.scenario("optimizer_sharding", "zero1"), base).old_plan
    assert z.optimizer_sharding == "zero1"
    with pytest.raises(SpecError, match="unknown optimizer sharding 'zero3'"):
        scenarios.scenario("optimizer_sharding", "zero3")
    # the rows simulate the toggled plans; without contention and overlap, as the formulas say
    ref = whatif.WhatIfOptions(replan=False, sim={"contention": False, "overlap": False})
    scs = [scenarios.scenario(k, v) for k, v in (("tp", "4"), ("recompute", "full"), ("optimizer_sharding", "zero1"))]
    rows = whatif.run_scenarios(base, scs, ref)
    for row, p in zip(rows, (plan, tp4, rc, z)):
        assert row["old_plan_s"] == pytest.approx(predict(p, cl, cg).iteration_time_s, rel=1e-9), row["scenario"]
    assert rows[2]["old_plan_s"] > rows[0]["old_plan_s"]  # recomputing costs a forward more
    assert rows[3]["old_plan_s"] < rows[0]["old_plan_s"]  # each device steps half the state
