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


def partition_bound(L: int, tmin: dict[tuple[int, int], float], M: int, tau_lb: float = 0.0,
                    stop_at: float = math.inf) -> float:
    """Lower bound described in the module doc (inf if no split exists)."""
    if not tmin:
        return math.inf
    T = np.full((L + 1, L + 1), np.inf)
    for (i, j), t in tmin.items():
        T[i, j] = t
    best = math.inf
    for tau in sorted({t for t in tmin.values()}):
        eff = max(tau, tau_lb)
        if (M - 1) * eff >= min(best, stop_at):
            break
        allowed = np.where(T <= tau, T, np.inf)
        d = np.full(L + 1, np.inf)
        d[0] = 0.0
        for j in range(1, L + 1):
            d[j] = np.min(d[:j] + allowed[:j, j])
        if math.isfinite(d[L]):
            best = min(best, (M - 1) * eff + max(d[L], eff))
    return best
