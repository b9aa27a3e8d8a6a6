"""The search at scale is ended by its work budget, not by the wall clock (the brief's
determinism: the same inputs give the same plan whatever the machine's load): with the
clock stopped it still ends, by the budget, and with the clock running it returns the
same plan and bound."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

import allocator.search as search_module
from allocator.problem import Problem
from allocator.search import search
from hetalloc.cluster import cluster_from_dict
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.models import get_model

ROOT = Path(__file__).resolve().parents[1]


def mix256() -> Problem:
    raw = yaml.safe_load((ROOT / "examples" / "mix-64.yaml").read_text())
    big = copy.deepcopy(raw)
    big["name"] = "mix-256"
    for n in big["nodes"]:
        n["count"] = n.get("count", 1) * 4
    cg = analytic_cost_graph(get_model("gpt3-2.7b"), 2048)
    return Problem(cluster_from_dict(big, "mix-256"), cg, 512, recompute="none")


def outcome(res):
    return (res.best.objective_s, tuple((s.start, s.stop, s.counts) for s in res.best.stages), res.bound, res.status)


def test_the_work_budget_ends_a_search_at_scale(monkeypatch):
    prob = mix256()
    live = search(prob, time_limit=3)
    monkeypatch.setattr(search_module.time, "perf_counter", lambda: 0.0)  # a clock that never moves
    frozen = search(prob, time_limit=3)
    assert not frozen.stopped_by_clock and frozen.status == "time_limit" and frozen.gap > 0  # the budget ended it
    assert outcome(search(prob, time_limit=3)) == outcome(frozen)
    if not live.stopped_by_clock:  # (a machine much slower than the development one: the clock's last resort)
        assert outcome(live) == outcome(frozen)
