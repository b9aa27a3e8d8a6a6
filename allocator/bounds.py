"""Cheap lower bounds on the planner's objective for a given number of micro-batches M.

Give every stage the whole device budget and it can only get faster; the layers must
still be split into contiguous stages. So for any plan at M,

    objective >= min over layer splits of (M - 1) * max_s tmin(r_s) + sum_s tmin(r_s)

where tmin(r) is the fastest time any column achieves on range r. The minimum is found
by enumerating the bottleneck value and a shortest-path DP over layer boundaries. The
bound is also never below M * tau_lb when the bottleneck is known to be >= tau_lb.
"""

from __future__ import annotations

import math

import numpy as np


def partition_bound(L: int, tmin: dict[tuple[int, int], float], M: int, tau_lb: float = 0.0) -> float:
    """Lower bound described in the module doc (inf if no split exists): for every
    bottleneck value tau at once (rows), the least sum over splits into ranges of time at
    most tau (a shortest path over layer boundaries)."""
    if not tmin:
        return math.inf
    T = np.full((L + 1, L + 1), np.inf)
    for (i, j), t in tmin.items():
        T[i, j] = t
    taus = np.unique(np.fromiter(tmin.values(), dtype=np.float64))
    eff = np.maximum(taus, tau_lb)
    d = np.full((len(taus), L + 1), np.inf)
    d[:, 0] = 0.0
    for j in range(1, L + 1):
        col = T[:j, j]
        allowed = np.where(col[None, :] <= taus[:, None], col[None, :], np.inf)
        d[:, j] = np.min(d[:, :j] + allowed, axis=1)
    ok = np.isfinite(d[:, L])
    if not ok.any():
        return math.inf
    return float(np.min((M - 1) * eff[ok] + np.maximum(d[ok, L], eff[ok])))


def block_bound(prob, timer, M: int) -> float:
    """A cheap lower bound on every plan at M for a model of identical blocks (inf if none
    can fit in memory):
    - memory: a device of class c holding l blocks takes at most kmem_c(l) samples of a
      micro-batch (one in flight, the fewest any schedule holds), so it serves at most
      l * kmem_c(l) block-samples; the devices together must serve K blocks x b samples;
    - time: every stage is at least as slow as if the whole cluster served it (the
      partition bound above, on the times of each kind and block count)."""
    from .columns import whole_budget_times
    from .shapes import FIRST, INNER, LAST, ONLY, block_range

    if not prob.state_fits:
        return math.inf
    L, K, b = prob.L, prob.L - 2, timer.b
    gpipe = prob.schedule == "gpipe"
    infl = M if gpipe else 1
    capacity = 0
    most = prob.most_units([c.count for c in prob.classes]) if prob.zero1 else 1  # zero1's largest sharding
    for c in prob.classes:
        best = 0
        for l in range(1, K + 1):
            k = min(b, max(prob.kmem(c, 1, 1 + l, infl, rc, most) for rc in prob.recompute_options))
            if k < 1:
                break
            best = max(best, l * k)
        capacity += c.count * best
    if capacity < K * b:
        return math.inf
    budget = [c.count for c in prob.classes]
    rep: dict[tuple[int, int], float] = {}
    specs = [(FIRST, l) for l in range(K + 1)] + [(INNER, l) for l in range(1, K + 1)] + \
            [(LAST, l) for l in range(K + 1)] + [(ONLY, K)]
    ths = whole_budget_times(prob, timer, M, [block_range(prob, kind, l) for kind, l in specs], budget)
    for (kind, l), th in zip(specs, ths.tolist()):
        if math.isfinite(th):
            rep[(kind, l)] = th
    tmin: dict[tuple[int, int], float] = {}
    for (kind, l), t in rep.items():
        if kind == INNER:
            for i in range(1, L - l):
                tmin[(i, i + l)] = t
        else:
            tmin[block_range(prob, kind, l)] = t
    return partition_bound(L, tmin, M)
