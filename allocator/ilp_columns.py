"""The integer program over stage columns (allocator.columns) for one (R, M).

    min (M - 1) tau + sum_col t_col x_col + sigma
    s.t. path of stages:       sum_{col starts at 0} x_col = 1, and at every inner boundary j
                               sum_{col ends at j} x_col = sum_{col starts at j} x_col
         every layer l:        tau   >= sum_{col covers l} t_col x_col
                               sigma >= sum_{col covers l} tail_col x_col
         every class c:        sum_col counts_c(col) x_col <= N_c / R
         every boundary j:     A_j = A_{j+1} + sum_{col starts at j} x_col    (stages from j on)
         1F1B memory:          A_j + (L - j - amax) x_col <= L - j   for a column ending at j
         tau >= tau_lb (the smallest feasible bottleneck, from the bisection)

The chosen columns form one path from layer 0 to L, so exactly one covers each layer and the per-layer sums equal the covering stage's
time and tail: tau and sigma are the true maxima, and the objective is the planner
model's iteration time (allocator.problem). ``feasible`` answers whether any plan has
every stage within theta (the bisection on the bottleneck stage time).
"""

from __future__ import annotations

import math

from .columns import Column
from .milp import Milp, MilpResult
from .problem import CountPlan, CountStage, Problem


def _structure(m: Milp, prob: Problem, cols: list[Column], xs: list[int], budget: list[int],
               order: bool = False) -> bool:
    L = prob.L
    starts: list[list[int]] = [[] for _ in range(L + 1)]
    ends: list[list[int]] = [[] for _ in range(L + 1)]
    for col, x in zip(cols, xs):
        starts[col.i].append(x)
        ends[col.j].append(x)
    if not starts[0] or not ends[L]:
        return False
    # The stages form a path from boundary 0 to boundary L (a flow of one unit): the same
    # polytope as "every layer covered once", with two nonzeros per column instead of j - i.
    m.eq({x: 1 for x in starts[0]}, 1)
    for j in range(1, L):
        m.eq({**{x: 1 for x in ends[j]}, **{x: -1 for x in starts[j]}}, 0)
    for c in prob.classes:
        terms = {x: col.counts[c.index] for col, x in zip(cols, xs) if col.counts[c.index]}
        if terms:
            m.le(terms, budget[c.index])
    if order and prob.interchangeable_blocks:
        _order_interior_stages(m, cols, xs, starts, ends, L)
    deep = [(col, x) for col, x in zip(cols, xs) if col.amax < L - col.j]
    if deep:
        A = [m.var(f"A[{j}]", 0, L) for j in range(L + 1)]
        m.eq({A[L]: 1}, 0)
        for j in range(L):
            m.eq({A[j]: 1, A[j + 1]: -1, **{x: -1 for x in starts[j]}}, 0)
        for col, x in deep:
            U = L - col.j
            m.le({A[col.j]: 1, x: U - col.amax}, U)
    return True


def _order_interior_stages(m: Milp, cols: list[Column], xs: list[int], starts, ends, L: int) -> None:
    """Symmetry breaking when the inner layers are identical blocks: inner stages (neither
    first nor last) can be permuted without changing any cost, and sorting them by how
    deep they may sit (amax, descending) keeps a memory-feasible order feasible. So only
    plans whose inner stages are in descending canonical order are kept: one of each
    family of equivalent plans, and the branch-and-bound no longer explores permutations."""
    col_of = dict(zip(xs, cols))
    # The key leaves the time out: equal inner stages at different places differ in it by
    # float round-off only, and (amax, length, counts) already determines it.
    inner = sorted({(c.amax, c.j - c.i, c.counts) for c in cols if c.i > 0 and c.j < L})
    rank = {key: r + 1 for r, key in enumerate(inner)}
    top = len(inner) + 1
    for j in range(1, L):
        terms: dict[int, float] = {}
        for x in starts[j]:
            c = col_of[x]
            if c.j < L:  # the next stage is inner: its rank may not exceed the previous one's
                terms[x] = terms.get(x, 0.0) + rank[(c.amax, c.j - c.i, c.counts)]
        if not terms:
            continue
        for x in ends[j]:
            c = col_of[x]
            r = top if c.i == 0 else rank[(c.amax, c.j - c.i, c.counts)]
            terms[x] = terms.get(x, 0.0) - r
        m.le(terms, 0)


def feasible(prob: Problem, cols: list[Column], R: int, theta: float, backend: str = "highs",
             time_limit: float = 60.0) -> bool | None:
    """Is there a plan whose every stage runs within theta? None if the solver gave up."""
    use = [c for c in cols if c.t <= theta * (1 + 1e-12)]
    m = Milp()
    xs = [m.binary("x") for _ in use]
    budget = [c.count // R for c in prob.classes]
    if not _structure(m, prob, use, xs, budget):
        return False
    res = m.solve(backend, time_limit=time_limit, gap=1.0)
    if res.status in ("optimal", "feasible"):
        return True
    if res.status == "infeasible":
        return False
    return None


def min_bottleneck(prob: Problem, cols: list[Column], R: int, backend: str = "highs",
                   time_limit: float = 60.0) -> float:
    """Bisection over the distinct column times for the smallest feasible bottleneck
    (inf if none is feasible; a lower value than the truth is never returned)."""
    times = sorted({c.t for c in cols})
    if not times:
        return math.inf
    lo, hi = 0, len(times) - 1
    if feasible(prob, cols, R, times[hi], backend, time_limit) is not True:
        return math.inf
    while lo < hi:
        mid = (lo + hi) // 2
        ok = feasible(prob, cols, R, times[mid], backend, time_limit)
        if ok is None:  # unknown: keep the proven lower end
            return times[lo]
        if ok:
            hi = mid
        else:
            lo = mid + 1
    return times[lo]


def cheap_bottleneck(prob: Problem, cols: list[Column]) -> float:
    """Every layer lies in some stage: the bottleneck is at least, for the layer whose
    fastest covering column is slowest, that column's time."""
    best = [math.inf] * prob.L
    for c in cols:
        for l in range(c.i, c.j):
            if c.t < best[l]:
                best[l] = c.t
    return max(best) if best else math.inf


def solve_columns(prob: Problem, cols: list[Column], R: int, M: int, *, tau_lb: float = 0.0,
                  incumbent: float = math.inf, time_limit: float = 60.0, gap: float = 1e-9,
                  backend: str = "highs", msg: bool = False, node_limit: int | None = None,
                  work_limit: int | None = None) -> tuple[MilpResult | None, CountPlan | None, int, int]:
    L = prob.L
    # No stage of a plan that beats the incumbent is slower than (T - tau_lb) / (M - 1).
    if not math.isfinite(incumbent):
        cap = math.inf
    else:
        cap = (incumbent - tau_lb) / (M - 1) if M > 1 else incumbent
    use = [c for c in cols if c.t <= cap * (1 + 1e-12)] if math.isfinite(cap) else cols
    m = Milp()
    tau = m.var("tau", lb=tau_lb, obj=M - 1)
    sigma = m.var("sigma", obj=1.0)
    xs = [m.binary(f"x[{c.i},{c.j},{c.counts}]", obj=c.t) for c in use]
    budget = [c.count // R for c in prob.classes]
    if not _structure(m, prob, use, xs, budget, order=True):
        return None, None, m.num_vars, m.num_rows
    for l in range(L):
        tt = {tau: -1.0}
        ss = {sigma: -1.0}
        for col, x in zip(use, xs):
            if col.i <= l < col.j:
                tt[x] = col.t
                if col.tail:
                    ss[x] = col.tail
        m.le(tt, 0)
        m.le(ss, 0)
    res = m.solve(backend, time_limit=time_limit, gap=gap, cutoff=incumbent, msg=msg, node_limit=node_limit,
                  work_limit=work_limit)
    plan = None
    if res.x is not None:
        chosen = sorted((col for col, x in zip(use, xs) if res.x[x] > 0.5), key=lambda c: c.i)
        plan = CountPlan(R, M, [CountStage(c.i, c.j, c.counts, c.recompute) for c in chosen])
    return res, plan, m.num_vars, m.num_rows
