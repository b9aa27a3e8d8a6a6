"""The baselines' plans start the search: a placed plan becomes a count-level plan of the
spaces it lies in, and the search's plan is never worse in the planner's model than a
baseline it was seeded with."""

import copy
from pathlib import Path

import pytest

from allocator import baseline_plan, make_plan
from allocator.api import plan_spaces
from allocator.problem import Problem, evaluate_counts
from allocator.seeds import count_plan_of, seeds_of
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.models import get_model

EX = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def mix():
    return load_cluster(EX / "mix-64.yaml")


def test_a_baseline_plan_as_counts_keeps_its_devices_and_layers(mix):
    cg = analytic_cost_graph(get_model("gpt2-xl"))
    plan = baseline_plan("metis", mix, cg, 256)
    prob = Problem(mix, cg, 256)
    cp = count_plan_of(plan, prob)
    assert cp is not None and cp.R == 1 and cp.M == plan.num_microbatches
    assert [(s.start, s.stop) for s in cp.stages] == [(s.start, s.stop) for s in plan.replicas[0].stages]
    # every device of the plan is counted once, in its own class
    assert sum(sum(s.counts) for s in cp.stages) == len(plan.device_ids())
    for s, counts in zip(zip(*[r.stages for r in plan.replicas]), (s.counts for s in cp.stages)):
        for c in prob.classes:
            held = sum(1 for st in s for g in st.groups for d in g.devices if d in c.devices)
            assert counts[c.index] == held
    assert evaluate_counts(prob, cp).objective_s < float("inf")


def test_plans_outside_a_space_are_not_seeds(mix):
    cg = analytic_cost_graph(get_model("gpt2-xl"))
    plan = baseline_plan("proportional", mix, cg, 256)
    # replicas with other stage boundaries are not one count-level plan
    assert len({tuple((s.start, s.stop) for s in r.stages) for r in plan.replicas}) > 1
    assert count_plan_of(plan, Problem(mix, cg, 256)) is None
    same = copy.deepcopy(plan)
    same.replicas = [r for r in plan.replicas if [(s.start, s.stop) for s in r.stages] ==
                     [(s.start, s.stop) for s in plan.replicas[0].stages]]
    assert count_plan_of(same, Problem(mix, cg, 256)) is not None
    # single devices are units of the single-device space only; no recomputation where none is offered
    probs = plan_spaces(mix, cg, 256, [1, 2], "none", recompute="none")
    assert [prob.tp for _, prob in seeds_of([same], probs)] == [1]
    same.replicas[0].stages[0].recompute = "full"
    for r in same.replicas:
        r.stages[0].recompute = "full"
    assert seeds_of([same], probs) == []


def test_the_search_starts_from_the_baselines(mix):
    cg = analytic_cost_graph(get_model("gpt3-2.7b"))
    plan = make_plan(mix, cg, 512, time_limit=4)
    assert plan.solver["seeded_by_baselines"] >= 1
    probs = plan_spaces(mix, cg, 512, [1, 2, 4, 8], "auto")
    for name in ("proportional", "metis"):
        seeds = seeds_of([baseline_plan(name, mix, cg, 512)], probs)
        for cp, prob in seeds:
            assert plan.solver["objective_s"] <= evaluate_counts(prob, cp).objective_s * (1 + 1e-9)
