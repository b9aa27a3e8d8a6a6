"""Exact dynamic program over stage options for one micro-batch count M.

Stage options are the stage columns of one M: *shapes* when the model's inner layers are
identical blocks (allocator.shapes; any position), *ranges* otherwise (allocator.columns;
a fixed position). For caps on the stage times (<= tau) and on the tails (<= sigma),
``min_stage_sum`` finds the plan that minimises the sum of its stage times; the search
adds (M - 1) tau and sigma (allocator.caps) to get the planner's objective
(allocator.problem).

Pipelines are built from the back. A state (d, x, u) is d stages placed (the last stage
and d - 1 in front of it), x blocks (or layers) covered, u the devices used per class (a
mixed-radix index). The next stage sits under d stages, so it needs amax >= d: 1F1B
memory is exact without any ordering argument. Depths beyond the deepest finite amax
collapse into one layer.

States that cannot get below ``limit`` are not expanded (the cheapest chain of options
still to come is added, budgets ignored), and a state is dropped when one with the same
coverage, no more stages placed and no more devices of any class is no worse (fewer
devices and a shallower position are never worse for the stages still to come).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STATE_LIMIT = 30_000_000
"""Largest (depth layers x positions x device vectors) state space the program is used
for; beyond it the search bounds that M otherwise."""

try:  # numba compiles the kernel once (cached on disk)
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency
    def njit(*a, **k):
        if a and callable(a[0]):
            return a[0]
        return lambda f: f

INNER, FIRST, LAST, ONLY = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Option:
    """One stage option in the program's terms."""

    kind: int
    xf: int
    """Position (blocks or layers covered behind it) where it must start; -1: anywhere."""
    span: int
    counts: tuple[int, ...]
    t: float
    tail: float
    amax: int
    ref: object
    """The shape or column it stands for."""


class StageTable:
    """The options of one M as arrays, and the device-vector index of the class budgets."""

    @staticmethod
    def effective_budgets(options: list[Option], budgets: list[int], X: int) -> list[int]:
        """Budgets no plan can exceed: a class is never used beyond what its stages can take
        (one first, one last, and at most X inner stages); the same plans, fewer states."""
        out = []
        for c, n in enumerate(budgets):
            most = {kind: max((o.counts[c] for o in options if o.kind == kind), default=0)
                    for kind in (INNER, FIRST, LAST, ONLY)}
            out.append(min(n, max(most[FIRST] + most[LAST] + X * most[INNER], most[ONLY])))
        return out

    @staticmethod
    def count_states(options: list[Option], budgets: list[int], X: int, L: int) -> int:
        eff = StageTable.effective_budgets(options, budgets, X)
        finite = [min(o.amax, L) for o in options if o.amax < L]
        dcap = (max(finite) + 1) if finite else 1
        return (dcap + 1) * (X + 1) * int(np.prod([n + 1 for n in eff]))

    def __init__(self, options: list[Option], budgets: list[int], X: int, L: int):
        self.options = options
        self.X, self.L = X, L
        C = len(budgets)
        budgets = self.effective_budgets(options, budgets, X)
        self.N = np.array(budgets, dtype=np.int64)
        dims = [n + 1 for n in budgets]
        strides = np.ones(C, dtype=np.int64)
        for c in range(C - 2, -1, -1):
            strides[c] = strides[c + 1] * dims[c + 1]
        self.strides = strides
        self.nU = int(np.prod(dims)) if C else 1
        grid = np.indices(dims).reshape(C, -1).T if C else np.zeros((1, 0), dtype=np.int64)
        self.comp = np.ascontiguousarray(grid.astype(np.int64))
        n = len(options)
        self.kind = np.array([o.kind for o in options], dtype=np.int64)
        self.xf = np.array([o.xf for o in options], dtype=np.int64)
        self.span = np.array([o.span for o in options], dtype=np.int64)
        self.cnt = np.array([o.counts for o in options], dtype=np.int64).reshape(n, C)
        self.off = self.cnt @ strides if n else np.zeros(0, dtype=np.int64)
        self.t = np.array([o.t for o in options], dtype=np.float64)
        self.tail = np.array([o.tail for o in options], dtype=np.float64)
        self.amax = np.array([min(o.amax, L) for o in options], dtype=np.int64)
        # options by device vector: group[k] numbers k's vector, byc lists the options vector by vector
        self.group = np.zeros(n, dtype=np.int64)
        if n:
            self.group = np.unique(self.cnt, axis=0, return_inverse=True)[1].astype(np.int64).reshape(n)
        self.byc = np.argsort(self.group, kind="stable").astype(np.int64)
        finite = [a for a in self.amax if a < L]
        self.dcap = (max(finite) + 1) if finite else 1

    @staticmethod
    def shape_options(shapes, unit: int = 1, chunk: int = 1) -> list[Option]:
        return [Option(s.kind, 0 if s.kind in (LAST, ONLY) else -1, s.blocks // chunk,
                       tuple(n // unit for n in s.counts), s.t, s.tail, s.amax, s)
                for s in shapes if s.blocks % chunk == 0]

    @classmethod
    def of_shapes(cls, shapes, budgets: list[int], L: int, limit: int | None = None, unit: int = 1,
                  chunk: int = 1) -> "StageTable | None":
        """The table of shapes (budgets and counts in units of ``unit`` devices, blocks in
        chunks of ``chunk``, which divides the block count), or None if it would have more
        than ``limit`` states."""
        assert (L - 2) % chunk == 0
        opts = cls.shape_options(shapes, unit, chunk)
        budgets = [n // unit for n in budgets]
        X = (L - 2) // chunk
        if limit is not None and cls.count_states(opts, budgets, X, L) > limit:
            return None
        return cls(opts, budgets, X, L)

    @classmethod
    def of_columns(cls, cols, budgets: list[int], L: int, limit: int | None = None) -> "StageTable | None":
        """The table of layer-range columns, or None if it would have more than ``limit`` states."""
        opts = []
        for c in cols:
            kind = ONLY if (c.i == 0 and c.j == L) else FIRST if c.i == 0 else LAST if c.j == L else INNER
            opts.append(Option(kind, L - c.j, c.j - c.i, c.counts, c.t, c.tail, c.amax, c))
        if limit is not None and cls.count_states(opts, budgets, L, L) > limit:
            return None
        return cls(opts, budgets, L, L)

    def states(self) -> int:
        return (self.dcap + 1) * (self.X + 1) * self.nU

    def remaining_bound(self, use: np.ndarray, mx: bool = False) -> np.ndarray:
        """rem[x]: the least time the stages in front can take once x is covered (the
        cheapest chain of usable options from x to a first stage, budgets ignored); ``mx``:
        the least bottleneck of such a chain instead of the least sum."""
        X = self.X
        inf = math.inf
        # W[x, y]: fastest option taking the cover from x to y (y = X + 1: a first stage
        # that closes the pipeline)
        W = np.full((X + 1, X + 2), inf)
        k = np.nonzero(use & ((self.kind == INNER) | (self.kind == FIRST)))[0]
        t, span, xf, first = self.t[k], self.span[k], self.xf[k], self.kind[k] == FIRST
        fixed = xf >= 0
        # fixed-position options (ranges)
        xs = xf[fixed]
        ys = np.where(first[fixed], X + 1, xs + span[fixed])
        np.minimum.at(W, (xs, ys), t[fixed])
        # anywhere-options (shapes): every start that keeps the cover within X
        free = ~fixed
        fs = free & first  # a first stage of span sp closes the cover from X - sp
        xs = X - span[fs]
        ok = xs >= 0
        np.minimum.at(W, (xs[ok], np.full(int(ok.sum()), X + 1)), t[fs][ok])
        m = np.full(X + 1, inf)  # the fastest inner option of each span, at every start
        fi = free & ~first
        np.minimum.at(m, span[fi], t[fi])
        for sp in np.nonzero(np.isfinite(m))[0]:
            idx = np.arange(0, X - sp + 1)
            W[idx, idx + sp] = np.minimum(W[idx, idx + sp], m[sp])
        rem = np.full(X + 2, inf)
        rem[X + 1] = 0.0
        for x in range(X, -1, -1):
            rem[x] = np.min(np.maximum(W[x, x + 1:], rem[x + 1:]) if mx else W[x, x + 1:] + rem[x + 1:])
        return rem[:X + 1]


@njit(cache=True)
def _open(D, P, Q, d, x):
    D[d, x, :] = np.inf
    P[d, x, :] = -1
    Q[d, x, :] = 0


@njit(cache=True)
def _frontier(row, env, comp, strides, nU, rem, limit, out, mx):
    """The states of one (depth, position) row worth expanding: able to get below the
    limit, not dominated within the row by a state with fewer devices of some class, nor
    by ``env`` (the shallower rows). Folds the row into env. ``mx``: values are maxima
    (bottlenecks), not sums."""
    C = strides.shape[0]
    E = row.copy()
    for c in range(C):
        st = strides[c]
        for u in range(nU):
            if comp[u, c] >= 1 and E[u - st] < E[u]:
                E[u] = E[u - st]
    cnt = 0
    for u in range(nU):
        v = row[u]
        if ((v if v > rem else rem) if mx else v + rem) >= limit or env[u] <= v:
            continue
        dom = False
        for c in range(C):
            if comp[u, c] >= 1 and E[u - strides[c]] <= v:
                dom = True
                break
        if not dom:
            out[cnt] = u
            cnt += 1
    for u in range(nU):
        if E[u] < env[u]:
            env[u] = E[u]
    return cnt


@njit(cache=True)
def _kernel(X, L, N, comp, strides, nU, dcap, kind, xf, span, cnt, off, t, amax, group, byc, use, limit, rem,
            floor, mx, max_work):
    """The least sum (``mx``: the least maximum) of stage times over plans, below ``limit``;
    every bound test is against the best plan found so far (itself below ``limit``). A
    plan at ``floor`` (a lower bound on every plan) ends the search. Also returns its work:
    states scanned, options scanned and (state, option) pairs tried, counted (not timed);
    past ``max_work`` it gives up (item -2: no answer)."""
    INF = np.inf
    shp = (dcap + 1, X + 1, nU)
    D = np.empty(shp)  # rows are initialised when first reached: most never are
    P = np.empty(shp, dtype=np.int32)
    Q = np.empty(shp, dtype=np.int8)  # 1: came from the same (collapsed) layer
    live = np.zeros((dcap + 1, X + 1), dtype=np.bool_)
    n = kind.shape[0]
    best = limit
    best_item, best_d, best_u = -1, -1, -1
    work = 0
    cells = np.empty(nU, dtype=np.int64)
    env = np.full((X + 1, nU), INF)
    for k in range(n):  # one-stage plans
        if use[k] and kind[k] == 3 and t[k] < best:
            best, best_item, best_d, best_u = t[k], k, 0, -1
    for k in range(n):  # the last stage
        if use[k] and kind[k] == 2:
            x, u = span[k], off[k]
            if not live[1, x]:
                _open(D, P, Q, 1, x)
                live[1, x] = True
            if t[k] < D[1, x, u]:
                D[1, x, u] = t[k]
                P[1, x, u] = k
    # the options that may follow, grouped by device vector (group: the options sharing
    # one; ``byc`` lists the options group by group) so that a state's budget is checked
    # once per vector, not once per option
    order = np.array([k for k in byc if use[k] and (kind[k] == 0 or kind[k] == 1)], dtype=np.int64)
    app = np.empty(order.shape[0], dtype=np.int64)
    gs = np.empty(order.shape[0] + 1, dtype=np.int64)
    C = N.shape[0]
    for d in range(1, dcap + 1):
        same = d == dcap
        dst = dcap if same else d + 1
        for x in range(X + 1):
            if not live[d, x]:
                continue
            row = D[d, x]
            m = _frontier(row, env[x], comp, strides, nU, rem[x], best, cells, mx)
            work += nU
            if m == 0:
                continue
            work += order.shape[0]
            na, ng, tmin = 0, 0, INF  # the options usable from this row, their groups
            for kk in range(order.shape[0]):
                k = order[kk]
                if (same and amax[k] < L) or (not same and amax[k] < d):
                    continue
                if xf[k] >= 0:
                    if xf[k] != x:
                        continue
                elif kind[k] == 1:
                    if x + span[k] != X:
                        continue
                elif x + span[k] > X:
                    continue
                if na == 0 or group[k] != group[app[na - 1]]:
                    gs[ng] = na
                    ng += 1
                app[na] = k
                na += 1
                if t[k] < tmin:
                    tmin = t[k]
            if na == 0:
                continue
            gs[ng] = na
            # states by value: once a state cannot beat the best with the fastest option,
            # no later one can
            sel = cells[:m][np.argsort(row[cells[:m]], kind="mergesort")]
            for ci in range(m):
                u = sel[ci]
                v = row[u]
                if ((v if v > tmin else tmin) if mx else v + tmin) >= best:
                    break
                work += ng
                if work > max_work:
                    return best, -2, best_d, best_u, P, Q, work
                for gi in range(ng):
                    k0 = app[gs[gi]]
                    fits = True
                    for c in range(C):
                        if comp[u, c] + cnt[k0, c] > N[c]:
                            fits = False
                            break
                    if not fits:
                        continue
                    work += gs[gi + 1] - gs[gi]
                    for i in range(gs[gi], gs[gi + 1]):
                        k = app[i]
                        tk = t[k]
                        w = (v if v > tk else tk) if mx else v + tk
                        if kind[k] == 1:  # the first stage closes the pipeline
                            if w < best:
                                best, best_item, best_d, best_u = w, k, d, u
                                if best <= floor:
                                    return best, best_item, best_d, best_u, P, Q, work
                            continue
                        x2 = x + span[k]
                        if ((w if w > rem[x2] else rem[x2]) if mx else w + rem[x2]) >= best:
                            continue
                        u2 = u + off[k]
                        if not live[dst, x2]:
                            _open(D, P, Q, dst, x2)
                            live[dst, x2] = True
                        if w < D[dst, x2, u2]:
                            D[dst, x2, u2] = w
                            P[dst, x2, u2] = k
                            Q[dst, x2, u2] = 1 if same else 0
    return best, best_item, best_d, best_u, P, Q, work


def _run(tab: StageTable, use: np.ndarray, limit: float, mx: bool, meter: list | None, max_work: int | None):
    """The kernel over the options in ``use`` (``mx``: bottleneck, else sum); None where no
    plan can exist (no usable option, or no last stage that a chain can complete)."""
    if not use.any():
        return None
    rem = tab.remaining_bound(use, mx=mx)
    last, only = use & (tab.kind == LAST), use & (tab.kind == ONLY)
    if not only.any() and not np.isfinite(rem[tab.span[last]]).any():
        return None
    floor = -math.inf
    if mx:  # no plan has a bottleneck below the best chain's, budgets ignored: reaching it ends
        floor = min(float(tab.t[only].min()) if only.any() else math.inf,
                    float(np.maximum(tab.t[last], rem[tab.span[last]]).min()) if last.any() else math.inf)
    out = _kernel(tab.X, tab.L, tab.N, tab.comp, tab.strides, tab.nU, tab.dcap, tab.kind, tab.xf, tab.span, tab.cnt,
                  tab.off, tab.t, tab.amax, tab.group, tab.byc, use, float(limit), rem, floor, mx,
                  np.iinfo(np.int64).max if max_work is None else int(max_work))
    if meter is not None:
        meter[0] += out[6]
    return out


def min_stage_sum(tab: StageTable, use: np.ndarray, limit: float = math.inf, meter: list | None = None,
                  max_work: int | None = None) -> tuple[float, list | None]:
    """(the least sum of stage times of a plan using only the options in ``use``, its
    options from first to last stage); (inf, None) if no plan gets below ``limit``.
    ``meter[0]`` gains the program's counted work; past ``max_work`` of it the program
    gives up: (-inf, None), no answer."""
    out = _run(tab, use, limit, False, meter, max_work)
    if out is None:
        return math.inf, None
    best, k, d, u, P, Q, _ = out
    if k == -2:
        return -math.inf, None
    if k < 0 or not math.isfinite(best):
        return math.inf, None
    opts = tab.options
    if opts[k].kind == ONLY:
        return float(best), [opts[k].ref]
    seq = [opts[k]]
    x = int(opts[k].xf) if opts[k].xf >= 0 else tab.X - int(opts[k].span)
    while True:
        j, same = int(P[d, x, u]), int(Q[d, x, u])
        o = opts[j]
        seq.append(o)
        if o.kind == LAST:
            break
        x -= o.span
        u -= int(tab.off[j])
        if not same:
            d -= 1
    assert seq[-1].kind == LAST and seq[0].kind == FIRST
    return float(best), [o.ref for o in seq]


def min_bottleneck(tab: StageTable, use: np.ndarray, limit: float = math.inf, meter: list | None = None,
                   max_work: int | None = None) -> float:
    """The smallest bottleneck (slowest stage time) of a plan using only the options in
    ``use``; inf if no plan has one below ``limit``. The same program as
    ``min_stage_sum`` with the maximum in place of the sum: one pass instead of a
    bisection of feasibility tests. ``meter[0]`` gains the program's counted work; past
    ``max_work`` of it the program gives up and the answer is -inf (no bound)."""
    out = _run(tab, use, limit, True, meter, max_work)
    if out is None:
        return math.inf
    best, k = out[0], out[1]
    if k == -2:
        return -math.inf
    return float(best) if k >= 0 else math.inf
