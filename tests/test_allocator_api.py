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
    assert s["status"] in ("optimal", "time_limit")
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
