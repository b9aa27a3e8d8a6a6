"""The Lagrangian bound (allocator.lagrange) never exceeds the best plan at its
micro-batch count (brute force on small instances of identical blocks, single devices and
tensor-parallel units with recomputation and zero1), and it is stronger than the
partition bound that gives every stage the whole cluster."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from allocator.bounds import block_bound
from allocator.lagrange import lagrange_bound
from allocator.problem import Problem, StageTimer
from allocator.search import search
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.models import get_model

from bruteforce import brute_force  # noqa: E402
from test_allocator_optimality import feasible_instance, feasible_v2_instance  # noqa: E402

EX = Path(__file__).parent.parent / "examples"


def check_per_count(prob: Problem) -> int:
    """Assert the bound at every M; the number of M values where it beats the partition bound."""
    stronger = 0
    for M in sorted({M for R, M in prob.candidates() if R == 1}):
        timer = StageTimer(prob, prob.global_batch // M)
        lag = lagrange_bound(prob, timer, M)
        ref = brute_force(replace(prob, microbatch_counts=[M]))
        if ref is not None:
            assert lag <= ref.objective_s * (1 + 1e-9), (M, lag, ref.objective_s)
        stronger += lag > block_bound(prob, timer, M) * (1 + 1e-6)
    return stronger


@pytest.mark.parametrize("seed", [0, 2, 4, 6, 8, 10, 12, 14])
def test_never_above_the_optimum_single_devices(seed):
    prob, _ = feasible_instance(seed)
    assert prob.interchangeable_blocks
    check_per_count(prob)


def test_never_above_the_optimum_units_recompute_zero1():
    seen = 0
    for seed in range(2000, 2032):
        prob, _ = feasible_v2_instance(seed)
        if not prob.interchangeable_blocks:
            continue
        check_per_count(prob)
        seen += 1
    assert seen >= 8


def test_stronger_than_the_partition_bound_where_stages_share_the_cluster():
    lab = load_cluster(EX / "lab-16.yaml")
    prob = Problem(lab, analytic_cost_graph(get_model("gpt2-xl")), 64, tp=1, recompute="none")
    for M in (4, 16):
        res = search(replace(prob, microbatch_counts=[M]), time_limit=30)
        assert res.status == "optimal"
        opt = res.best.objective_s
        timer = StageTimer(prob, 64 // M)
        lag = lagrange_bound(prob, timer, M)
        assert lag <= opt
        assert lag >= 0.85 * opt > 2 * block_bound(prob, timer, M)
