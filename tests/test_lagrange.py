"""The Lagrangian bound (allocator.lagrange) never exceeds the best plan at its
micro-batch count (brute force on small instances of identical blocks, single devices and
tensor-parallel units with recomputation and zero1; also the deep bound with the tail
levels, against a target above the optimum), and it is stronger than the partition bound
that gives every stage the whole cluster. Its parts: the knapsack with a unit cap equals
its linear program, and a stage whose tail is within a level has at most the units the
level allows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from allocator.bounds import block_bound
import itertools
import math

import numpy as np

from allocator.lagrange import _knap, block_range, lagrange_bound, stage_specs, tail_units
from allocator.milp import _new_highs
from allocator.problem import Problem, StageTimer, stage_tail
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
            for above in (1.05, 2.0):  # the deep bound, its tail levels cut below the target
                deep = lagrange_bound(prob, timer, M, stop_at=above * ref.objective_s, deep=True)
                assert deep <= ref.objective_s * (1 + 1e-9), (M, above, deep, ref.objective_s)
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


def _knap_lp(caps, lam, N, b, U) -> float:
    """min lam . n, caps . n >= b, sum n <= U, 0 <= n <= N, by HiGHS."""
    h = _new_highs(False)
    C = len(caps)
    for c in range(C):
        h.addVar(0.0, float(N[c]))
    h.changeColsCost(C, np.arange(C, dtype=np.int32), lam)
    idx = np.arange(C, dtype=np.int32)
    h.addRow(float(b), math.inf, C, idx, caps)
    if math.isfinite(U):
        h.addRow(-math.inf, float(U), C, idx, np.ones(C))
    h.run()
    if h.getModelStatus().name != "kOptimal":
        return math.inf
    return h.getInfo().objective_function_value


def test_knapsack_with_a_unit_cap_equals_its_linear_program():
    rng = np.random.default_rng(7)
    counts = np.zeros(4)
    checked = 0
    for _ in range(400):
        C = int(rng.integers(1, 5))
        caps = rng.integers(0, 9, C).astype(float)
        lam = rng.random(C) * rng.choice([0.0, 1.0], C, p=[0.2, 0.8])
        N = rng.integers(0, 12, C).astype(float)
        b = int(rng.integers(1, 40))
        U = float(rng.choice([math.inf, rng.random() * 12]))
        got = _knap(caps, lam, N, b, counts[:C], U)
        ref = _knap_lp(caps, lam, N, b, U)
        if math.isinf(ref):
            assert math.isinf(got)
            continue
        assert got == pytest.approx(ref, rel=1e-7, abs=1e-9)
        n = counts[:C]  # its units: feasible and of that cost
        assert (n >= -1e-9).all() and (n <= N + 1e-9).all() and caps @ n >= b - 1e-7 and n.sum() <= U + 1e-7
        assert lam @ n == pytest.approx(got, rel=1e-7, abs=1e-9)
        checked += 1
    assert checked > 200


def test_a_stage_within_a_tail_level_has_at_most_its_units():
    for seed in (0, 2, 4):
        prob, _ = feasible_instance(seed)
        budget = [c.count for c in prob.classes]
        specs = stage_specs(prob)
        for s, (kind, l) in enumerate(specs):
            i, j = block_range(prob, kind, l)
            for counts in itertools.product(*[range(n + 1) for n in budget]):
                if not any(counts):
                    continue
                tail = stage_tail(prob, 1, i, j, counts)
                U = tail_units(prob, tail, budget)  # the level its own tail sits at
                assert U[s] >= sum(counts) * (1 - 1e-9), (seed, s, counts, tail, U[s])
