"""Shapes built ahead in a forked worker (allocator.ahead) are the shapes the search would
build itself: under a larger time cap and cut to its own, in the same order; and a search
gives the same plan, bound and status with the worker as without it."""

from __future__ import annotations

from pathlib import Path

import pytest

import allocator.ahead as ahead
from allocator.api import plan_spaces, tp_degrees
from allocator.problem import StageTimer
from allocator.search import search
from allocator.shapes import block_shapes
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.models import get_model

EX = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.skipif(not ahead.enabled(), reason="needs fork and two cores")


def test_worker_shapes_equal_local_ones_under_a_smaller_cap():
    cluster = load_cluster(EX / "lab-16.yaml")
    cg = analytic_cost_graph(get_model("gpt3-1.3b"), 2048)
    probs = plan_spaces(cluster, cg, 64, tp_degrees(cluster, cg, "auto"), "auto")
    builder = ahead.Builder({1: (probs, {})})
    try:
        for k, M, wide, cap in ((0, 4, 2.0, 1.0), (1, 8, 1.0, 1.0), (0, 16, 0.5, 0.08)):
            builder.submit((1, k, M), wide / M)
            got = builder.take((1, k, M), cap / M)
            prob = probs[k]
            assert got == block_shapes(prob, StageTimer(prob, 64 // M), M, cap / M)
            assert len(got) > 0
        builder.submit((1, 0, 4), 1.0 / 4)
        assert builder.take((1, 0, 4), 2.0 / 4) is None  # built under a smaller cap: not usable
    finally:
        builder.close()


def test_search_is_the_same_with_and_without_the_worker(monkeypatch):
    cluster = load_cluster(EX / "lab-16.yaml")
    cg = analytic_cost_graph(get_model("gpt3-1.3b"), 2048)
    probs = plan_spaces(cluster, cg, 64, tp_degrees(cluster, cg, "auto"), "auto")
    taken = []
    take = ahead.Builder.take

    def counting(self, key, t_cap):
        got = take(self, key, t_cap)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(ahead.Builder, "take", counting)
    with_worker = search(probs, time_limit=30)
    assert any(taken)
    monkeypatch.setenv("HETALLOC_BUILD_AHEAD", "0")
    alone = search(probs, time_limit=30)
    assert with_worker.status == alone.status == "optimal"
    assert with_worker.best.objective_s == alone.best.objective_s
    assert with_worker.bound == alone.bound
    assert [(s.start, s.stop, s.counts, s.recompute) for s in with_worker.best.stages] == \
        [(s.start, s.stop, s.counts, s.recompute) for s in alone.best.stages]
    def states(res):
        return [{k: v for k, v in s.items() if k != "seconds"} for s in res.solves if s["step"] == "summary"]
    assert states(with_worker) == states(alone)
