"""Example instances shared by the simulator's agreement test and its benchmark
(tests/test_sim_agreement.py, benchmarks/sim_agreement.py): an example cluster of the
checkout's examples/, a model and a global batch, with the planner's plan and every
baseline that fits.
"""

from __future__ import annotations

from pathlib import Path

from allocator import baseline_plan, make_plan
from hetalloc.cluster import Cluster, load_cluster
from hetalloc.costgraph import CostGraph, analytic_cost_graph
from hetalloc.errors import InfeasibleError
from hetalloc.evaluate import sync_groups
from hetalloc.models import get_model
from hetalloc.plan import Plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
INSTANCES = [  # example cluster, model, global batch
    ("lab-16", "gpt3-1.3b", 64),
    ("mix-64", "gpt3-6.7b", 256),
    ("cpu-4", "gpt2-tiny", 16),
    ("cpu-2-slow", "gpt2-tiny", 8),
]


def example_plans(name: str, model: str, batch: int, time_limit: float = 5.0
                  ) -> tuple[Cluster, CostGraph, dict[str, Plan]]:
    """An example instance: its cluster, cost graph, and the planner's plan plus every
    baseline that fits (key 'planner' or 'baseline/schedule')."""
    cl = load_cluster(EXAMPLES / f"{name}.yaml")
    cg = analytic_cost_graph(get_model(model))
    plans = {"planner": make_plan(cl, cg, batch, time_limit=time_limit)}
    for base in ("even", "proportional", "pipedream"):
        for schedule in ("1f1b", "gpipe"):
            try:
                plans[f"{base}/{schedule}"] = baseline_plan(base, cl, cg, batch, schedule=schedule)
            except InfeasibleError:
                pass
    return cl, cg, plans


def chained(plan: Plan, cl: Cluster, cg: CostGraph) -> bool:
    """Does some device hold several gradient groups (so collectives must wait for each other)?"""
    seen: dict[str, int] = {}
    for g in sync_groups(plan, cl, cg):
        for d in g.devices:
            seen[d] = seen.get(d, 0) + 1
    return any(len(g.devices) > 1 and any(seen[d] > 1 for d in g.devices) for g in sync_groups(plan, cl, cg))
