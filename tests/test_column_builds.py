"""The builds of stage columns and shapes (allocator.columns, allocator.shapes): the tables
a build fills at once (share times, memory caps of every range) give exactly the columns
each range computes alone, and the array form of the memory rule is the scalar rule."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

import allocator.shapes as shapes
from allocator.api import plan_spaces, tp_degrees
from allocator.problem import Problem, StageTimer
from hetalloc.catalog import DEVICE_TYPES
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.costs import max_share_for_memory, max_shares_for_memory, usable_memory
from hetalloc.models import get_model

EX = Path(__file__).resolve().parent.parent / "examples"


def test_array_memory_rule_is_the_scalar_rule():
    t4 = DEVICE_TYPES["T4"]
    cap = usable_memory(t4)
    params = np.array([1e6, cap / 40, cap / 16, cap / 4]).reshape(-1, 1, 1)  # the last: the weights do not fit
    saved = np.array([1e8, 3e7, 0.0, 1e5]).reshape(-1, 1, 1)
    infl = np.arange(1, 6, dtype=float).reshape(1, -1, 1)
    shards = params / np.array([1, 2, 8]).reshape(1, 1, -1)
    got = max_shares_for_memory(params, saved, 0.0, infl, "bf16-mixed", "adamw", t4, optimizer_params=shards,
                                working_act_bytes_per_sample=2e6)
    want = np.array([[[max_share_for_memory(float(params[s, 0, 0]), float(saved[s, 0, 0]), 0.0, int(infl[0, a, 0]),
                                            "bf16-mixed", "adamw", t4, optimizer_params=float(shards[s, 0, d]),
                                            working_act_bytes_per_sample=2e6)
                       for d in range(3)] for a in range(5)] for s in range(4)])
    assert got.shape == (4, 5, 3) and np.array_equal(got, want)
    assert (got[3] == -1).all() and (got[0] > 0).all()
    # no bytes per sample: any share fits (the scalar rule's 2^30)
    assert max_shares_for_memory(1e6, 0.0, 0.0, np.ones(2), "bf16-mixed", "adamw", t4).tolist() == [1 << 30] * 2


@pytest.mark.parametrize("schedule, sharding", [("1f1b", "zero1"), ("1f1b", "none"), ("gpipe", "none")])
def test_prefetched_tables_give_the_same_shapes(monkeypatch, schedule, sharding):
    cluster = load_cluster(EX / "lab-16.yaml")
    cg = analytic_cost_graph(get_model("gpt3-1.3b"), 2048)
    if sharding == "zero1":
        probs = [p for p in plan_spaces(cluster, cg, 64, tp_degrees(cluster, cg, "auto"), "auto") if p.zero1]
    else:
        probs = [Problem(cluster, cg, 64, schedule=schedule, recompute="auto", tp=tp) for tp in (1, 2)]
    assert probs
    built = 0
    for prob in probs:
        for M, R, cap in ((4, 1, math.inf), (8, 2, 0.2), (16, 1, 0.05)):
            timer = StageTimer(prob, 64 // M // R)
            tabled = shapes.block_shapes(prob, timer, M, cap, R)
            with monkeypatch.context() as m:
                m.setattr(shapes, "prefetch", lambda *a, **k: None)
                fresh = dataclasses.replace(prob)  # (its own memos: nothing tabled)
                alone = shapes.block_shapes(fresh, StageTimer(fresh, 64 // M // R), M, cap, R)
            assert tabled == alone
            built += len(tabled)
    assert built > 1000
