"""The allocator's public face: plans are valid, never worse than the baselines, and an
impossible request says why (with the memory that would be needed)."""

from pathlib import Path

import pytest

from allocator import BASELINES, baseline_plan, make_plan
from hetalloc.cluster import cluster_from_dict, load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.errors import InfeasibleError, SpecError
from hetalloc.models import get_model
from hetalloc.plan import validate_plan

EX = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def lab():
    return load_cluster(EX / "lab-16.yaml")


def test_baselines_are_valid_plans(lab):
    cg = analytic_cost_graph(get_model("gpt2-medium"))
    for name in BASELINES:
        p = baseline_plan(name, lab, cg, 64)
        validate_plan(p, lab, cg)
        assert p.planner == name
        assert p.predicted["iteration_time_s"] > 0


def test_planner_beats_baselines_and_reports_solver(lab):
    cg = analytic_cost_graph(get_model("gpt2-medium"))
    plan = make_plan(lab, cg, 64, time_limit=30)
    validate_plan(plan, lab, cg, check_fingerprints=True)
    t = plan.predicted["iteration_time_s"]
    for name in BASELINES:
        assert t <= baseline_plan(name, lab, cg, 64).predicted["iteration_time_s"] * (1 + 1e-9)
    s = plan.solver
    assert s["status"] in ("optimal", "feasible", "time_limit")
    assert s["bound_s"] <= s["objective_s"] * (1 + 1e-9)
    assert plan.grad_sync in ("ring", "hierarchical", "param_server")
    # uneven devices get uneven work where they share a stage
    assert plan.cluster_spec and plan.cost_graph_spec


def test_plans_are_deterministic(lab):
    cg = analytic_cost_graph(get_model("gpt2-small"))
    a = make_plan(lab, cg, 32, time_limit=20, compare_baselines=False)
    b = make_plan(lab, cg, 32, time_limit=20, compare_baselines=False)
    strip = lambda p: {k: v for k, v in p.to_dict().items() if k != "solver"}  # noqa: E731
    assert strip(a) == strip(b)


def test_infeasible_names_the_memory_needed():
    tiny = cluster_from_dict({"name": "t4s", "nodes": [{"gpus": [{"type": "T4", "count": 2}],
                                                       "intra_link": "PCIe3"}]})
    cg = analytic_cost_graph(get_model("gpt3-175b"))
    with pytest.raises(InfeasibleError) as e:
        make_plan(tiny, cg, 8, time_limit=10)
    msg = str(e.value)
    assert "GiB" in msg and "T4" in msg and "needs" in msg


def test_infeasible_names_the_changes_that_fit(lab):
    """GPT-3 13B at 2048 tokens on lab-16 without tensor parallelism, recomputation or
    sharding does not fit; the error names what the planner checked would, and not the
    1F1B schedule it already uses."""
    cg = analytic_cost_graph(get_model("gpt3-13b"), 2048)
    with pytest.raises(InfeasibleError) as e:
        make_plan(lab, cg, 64, time_limit=10, tp=1, recompute="none", optimizer_sharding="none",
                  compare_baselines=False)
    msg = str(e.value)
    assert "a plan fits with" in msg and "--tp auto" in msg and "--recompute auto" in msg, msg
    assert "--schedule 1f1b" not in msg
    plan = make_plan(lab, cg, 64, time_limit=10, compare_baselines=False)  # the defaults do fit
    assert any(g.tp > 1 for r in plan.replicas for s in r.stages for g in s.groups) or \
        any(s.recompute == "full" for r in plan.replicas for s in r.stages)


@pytest.mark.parametrize("kw, field", [
    ({"global_batch": 0}, "--global-batch"),
    ({"schedule": "zb"}, "--schedule"),
    ({"baseline": "alpa"}, "--baseline"),
    ({"backend": "gurobi"}, "--solver"),
])
def test_bad_requests(lab, kw, field):
    cg = analytic_cost_graph(get_model("gpt2-tiny"))
    args = {"global_batch": 8, **kw}
    B = args.pop("global_batch")
    with pytest.raises(SpecError, match=field):
        make_plan(lab, cg, B, time_limit=5, **args)


def test_pulp_back_ends_agree(lab):
    """The same program solved by HiGHS directly and by CBC through PuLP."""
    from allocator.problem import Problem
    from allocator.search import search
    cl = cluster_from_dict({"name": "s", "nodes": [
        {"gpus": [{"type": "A100-40G", "count": 2}, {"type": "T4", "count": 2}], "intra_link": "PCIe4"}]})
    cg = analytic_cost_graph(get_model("gpt2-tiny"))
    prob = Problem(cl, cg, 8)
    a = search(prob, time_limit=60, gap=1e-9, backend="highs")
    b = search(prob, time_limit=60, gap=1e-9, backend="pulp-cbc")
    assert a.status == b.status == "optimal"
    assert a.best.objective_s == pytest.approx(b.best.objective_s, rel=1e-6)


def test_auto_tp_only_where_the_cost_graph_prices_it(lab):
    """A type whose times were measured (a profile) without a measured tensor-parallel
    efficiency gets no units of several devices under --tp auto; with the efficiency
    given, or with an explicit --tp, it does."""
    from allocator.api import plan_spaces, tp_degrees
    from hetalloc.costgraph import TimeTable

    cg = analytic_cost_graph(get_model("gpt3-2.7b"), 2048)
    a100 = lab.device_types["A100-40G"]
    f, b = zip(*[cg.layer_times(a100, k) for k in (1, 2, 4, 8)])
    measured = cg.with_tables({"A100-40G": TimeTable([1, 2, 4, 8], [list(x) for x in zip(*f)],
                                                     [list(x) for x in zip(*b)])})

    def unit_sizes(g, tp="auto"):
        probs = plan_spaces(lab, g, 64, tp_degrees(lab, g, tp), "none", auto_tp=tp == "auto")
        return {c.dtype.name: max(p.classes[c.index].tp for p in probs) for c in probs[0].classes}

    assert unit_sizes(cg) == {"A100-40G": 8, "V100-16G": 8}
    assert unit_sizes(measured) == {"A100-40G": 1, "V100-16G": 8}
    assert unit_sizes(measured.with_tp_efficiency({"A100-40G": {2: 0.9, 4: 0.8, 8: 0.7}}))["A100-40G"] == 8
    assert unit_sizes(measured, tp=4) == {"A100-40G": 4, "V100-16G": 4}


def test_the_plan_returned_predicts_fastest_among_the_search_pool(lab):
    """The search keeps its best plans; the one returned is the fastest of them once placed
    and predicted (the model charges sends at the sender's NIC, the prediction the real path)."""
    from allocator.api import _finish, placed_best, plan_spaces
    from allocator.placement import place
    from allocator.search import POOL, search

    cg = analytic_cost_graph(get_model("gpt2-xl"))
    probs = plan_spaces(lab, cg, 64, [1], "none", recompute="none")
    res = search(probs, time_limit=10)
    assert res.pool and res.pool[0][0].objective_s == res.best.objective_s and len(res.pool) <= POOL
    assert [cp.objective_s for cp, _ in res.pool] == sorted(cp.objective_s for cp, _ in res.pool)
    plan, chosen, _, rank = placed_best(res.pool, lab, cg, "ring", "auto")
    preds = [_finish(place(q, cp), lab, cg, "auto").predicted["iteration_time_s"] for cp, q in res.pool]
    assert plan.predicted["iteration_time_s"] == pytest.approx(min(preds), rel=1e-12)
    assert chosen is res.pool[rank][0]
    full = make_plan(lab, cg, 64, time_limit=10, tp=1, recompute="none", optimizer_sharding="none",
                     compare_baselines=False)
    s = full.solver
    assert s["model_optimum_s"] <= s["objective_s"] * (1 + 1e-12)
    if s["objective_s"] > s["model_optimum_s"]:
        assert s["status"] in ("feasible", "time_limit") and any("predicts fastest" in n for n in full.notes)


def test_the_memory_advice_counts_tensor_parallel_splitting():
    """The smallest memory a layer needs is on the largest tensor-parallel group one node
    holds (with recomputation where it keeps less), not on one device."""
    from allocator.api import memory_shortfall

    one = cluster_from_dict({"name": "t4x1", "nodes": [{"gpus": [{"type": "T4", "count": 1}], "intra_link": "PCIe3"}]})
    two = cluster_from_dict({"name": "t4x2", "nodes": [{"gpus": [{"type": "T4", "count": 2}], "intra_link": "PCIe3"}]})
    cg = analytic_cost_graph(get_model("gpt3-175b"), 2048)
    alone, split = memory_shortfall(one, cg, "adamw"), memory_shortfall(two, cg, "adamw")
    gib = lambda msg: float(msg.split(" needs ")[1].split(" GiB")[0])  # noqa: E731
    assert "split over 2 T4" in split and "split over" not in alone
    assert gib(split) < gib(alone) / 1.8
