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


def fluid_bottleneck(prob, timer, M: int, t_cap: float, backend: str = "highs", rel_tol: float = 1e-3,
                     deadline: float = math.inf) -> float:
    """A lower bound on the bottleneck stage time at this M, with devices shared among
    stages: the largest theta (within rel_tol) for which even fractional devices cannot
    cover a path of stages whose every device runs its share within theta.

    LP at theta: path flow y over ranges; fractional devices n_rc >= 0 with
    sum_c n_rc K_c(r, theta) >= b y_r, sum_c n_rc <= b y_r (a device takes >= 1 sample),
    sum_r n_rc <= N_c. Infeasible LP => no plan has a bottleneck <= theta.
    """
    import time as _time

    from .columns import RangeTimes
    from .milp import Milp
    gpipe = prob.schedule == "gpipe"
    budget = [c.count for c in prob.classes]
    L, b = prob.L, timer.b
    lists: dict[tuple[int, int], dict[int, list[float]]] = {}
    for i in range(L):
        for j in range(i + 1, L + 1):
            rt = RangeTimes(prob, timer, i, j, t_cap, budget, M if gpipe else 1)
            if rt.ts:
                lists[(i, j)] = rt.ts
    if not lists:
        return math.inf
    import bisect as _b

    def feasible(theta: float) -> bool:
        m = Milp()
        ys, starts, ends = {}, [[] for _ in range(L + 1)], [[] for _ in range(L + 1)]
        use = {c: [] for c in range(len(budget))}
        for (i, j), ts in lists.items():
            caps = {ci: _b.bisect_right(t, theta * (1 + 1e-12)) for ci, t in ts.items()}
            caps = {ci: k for ci, k in caps.items() if k > 0}
            if not caps:
                continue
            y = m.var("y", 0, 1)
            ys[(i, j)] = y
            starts[i].append(y)
            ends[j].append(y)
            ns = {ci: m.var("n", 0, min(budget[ci], b)) for ci in caps}
            m.ge({**{ns[ci]: caps[ci] for ci in caps}, y: -b}, 0)
            m.le({**{v: 1 for v in ns.values()}, y: -b}, 0)
            for ci, v in ns.items():
                use[ci].append(v)
        if not starts[0] or not ends[L]:
            return False
        m.eq({y: 1 for y in starts[0]}, 1)
        for j in range(1, L):
            m.eq({**{y: 1 for y in ends[j]}, **{y: -1 for y in starts[j]}}, 0)
        for ci, vs in use.items():
            if vs:
                m.le({v: 1 for v in vs}, budget[ci])
        r = m.solve(backend, time_limit=max(1.0, deadline - _time.perf_counter()))
        return r.status != "infeasible"

    lo = min(min(t[0] for t in ts.values()) for ts in lists.values())
    hi = min(t_cap, max(max(t[-1] for t in ts.values()) for ts in lists.values()))
    if not feasible(hi):
        return hi if math.isfinite(t_cap) else math.inf
    if feasible(lo):
        return lo
    while hi - lo > rel_tol * hi and _time.perf_counter() < deadline:
        mid = (lo + hi) / 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return lo
