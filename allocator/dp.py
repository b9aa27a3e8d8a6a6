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

MULTIPLIER_STEPS = 30
"""Subgradient steps for the device prices of a table's priced remaining bound."""

MULTIPLIER_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
"""The priced remaining bound is taken at these multiples of the prices found (states
nearer the front have fewer blocks and devices left than the whole pipeline)."""



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
    def effective_budgets(kind: np.ndarray, cnt: np.ndarray, budgets: list[int], X: int) -> list[int]:
        """Budgets no plan can exceed: a class is never used beyond what its stages can take
        (one first, one last, and at most X inner stages); the same plans, fewer states."""
        most = {k: (cnt[kind == k].max(axis=0) if (kind == k).any() else np.zeros(len(budgets), dtype=np.int64))
                for k in (INNER, FIRST, LAST, ONLY)}
        return [min(n, max(int(most[FIRST][c] + most[LAST][c] + X * most[INNER][c]), int(most[ONLY][c])))
                for c, n in enumerate(budgets)]

    @staticmethod
    def count_states(kind: np.ndarray, cnt: np.ndarray, amax: np.ndarray, budgets: list[int], X: int, L: int) -> int:
        eff = StageTable.effective_budgets(kind, cnt, budgets, X)
        finite = amax[amax < L]
        dcap = (int(finite.max()) + 1) if len(finite) else 1
        return (dcap + 1) * (X + 1) * int(np.prod([n + 1 for n in eff]))

    def __init__(self, options: list[Option], budgets: list[int], X: int, L: int):
        C = len(budgets)
        arrays = (np.array([o.kind for o in options], dtype=np.int64), np.array([o.xf for o in options], dtype=np.int64),
                  np.array([o.span for o in options], dtype=np.int64),
                  np.array([o.counts for o in options], dtype=np.int64).reshape(len(options), C),
                  np.array([o.t for o in options], dtype=np.float64), np.array([o.tail for o in options], dtype=np.float64),
                  np.array([o.amax for o in options], dtype=np.int64))
        self._setup(*arrays, [o.ref for o in options], budgets, X, L)
        self._options = options

    @classmethod
    def of_arrays(cls, kind, xf, span, cnt, t, tail, amax, refs: list, budgets: list[int], X: int,
                  L: int) -> "StageTable":
        tab = cls.__new__(cls)
        tab._setup(kind, xf, span, cnt, t, tail, amax, refs, budgets, X, L)
        tab._options = None
        return tab

    def _setup(self, kind, xf, span, cnt, t, tail, amax, refs, budgets, X, L):
        self.refs = refs
        """The shape or column each option stands for."""
        self.X, self.L = X, L
        C = len(budgets)
        n = len(kind)
        budgets = self.effective_budgets(kind, cnt, budgets, X)
        self.N = np.array(budgets, dtype=np.int64)
        dims = [n_ + 1 for n_ in budgets]
        strides = np.ones(C, dtype=np.int64)
        for c in range(C - 2, -1, -1):
            strides[c] = strides[c + 1] * dims[c + 1]
        self.strides = strides
        self.nU = int(np.prod(dims)) if C else 1
        grid = np.indices(dims).reshape(C, -1).T if C else np.zeros((1, 0), dtype=np.int64)
        self.comp = np.ascontiguousarray(grid.astype(np.int64))
        self.kind, self.xf, self.span = kind, xf, span
        self.cnt = np.ascontiguousarray(cnt.reshape(n, C))
        self.off = self.cnt @ strides if n else np.zeros(0, dtype=np.int64)
        self.t, self.tail = t, tail
        self.amax = np.minimum(amax, L)
        # options by device vector: group[k] numbers k's vector, byc lists the options vector by vector
        self.group = np.zeros(n, dtype=np.int64)
        if n:
            self.group = np.unique(self.cnt, axis=0, return_inverse=True)[1].astype(np.int64).reshape(n)
        self.byc = np.argsort(self.group, kind="stable").astype(np.int64)
        finite = self.amax[self.amax < L]
        self.dcap = (int(finite.max()) + 1) if len(finite) else 1

    @property
    def options(self) -> list[Option]:
        if self._options is None:
            self._options = [Option(int(k), int(x), int(sp), tuple(int(v) for v in c), float(t), float(tl), int(a), r)
                             for k, x, sp, c, t, tl, a, r in zip(self.kind, self.xf, self.span, self.cnt, self.t,
                                                                 self.tail, self.amax, self.refs)]
        return self._options

    @staticmethod
    def shape_arrays(shapes, unit: int = 1, chunk: int = 1) -> tuple:
        """(kind, xf, span, counts, t, tail, amax, refs) of the shapes (an
        allocator.shapes.ShapeSet) whose blocks are a multiple of ``chunk``, blocks in
        chunks and counts in units; refs: those shapes (a ShapeSet)."""
        if chunk > 1:
            shapes = shapes.take(shapes.blocks % chunk == 0)
        kind = shapes.kind
        xf = np.where((kind == LAST) | (kind == ONLY), 0, -1).astype(np.int64)
        return kind, xf, shapes.blocks // chunk, shapes.counts // unit, shapes.t, shapes.tail, shapes.amax, shapes

    @classmethod
    def of_shapes(cls, shapes, budgets: list[int], L: int, limit: int | None = None, unit: int = 1,
                  chunk: int = 1) -> "StageTable | None":
        """The table of shapes (budgets and counts in units of ``unit`` devices, blocks in
        chunks of ``chunk``, which divides the block count), or None if it would have more
        than ``limit`` states."""
        assert (L - 2) % chunk == 0
        kind, xf, span, cnt, t, tail, amax, refs = cls.shape_arrays(shapes, unit, chunk)
        budgets = [n // unit for n in budgets]
        X = (L - 2) // chunk
        if limit is not None and cls.count_states(kind, cnt, np.minimum(amax, L), budgets, X, L) > limit:
            return None
        return cls.of_arrays(kind, xf, span, cnt, t, tail, amax, refs, budgets, X, L)

    @classmethod
    def of_columns(cls, cols, budgets: list[int], L: int, limit: int | None = None) -> "StageTable | None":
        """The table of layer-range columns, or None if it would have more than ``limit`` states."""
        opts = []
        for c in cols:
            kind = ONLY if (c.i == 0 and c.j == L) else FIRST if c.i == 0 else LAST if c.j == L else INNER
            opts.append(Option(kind, L - c.j, c.j - c.i, c.counts, c.t, c.tail, c.amax, c))
        if limit is not None:
            kind = np.array([o.kind for o in opts], dtype=np.int64)
            cnt = np.array([o.counts for o in opts], dtype=np.int64).reshape(len(opts), len(budgets))
            amax = np.array([min(o.amax, L) for o in opts], dtype=np.int64)
            if cls.count_states(kind, cnt, amax, budgets, L, L) > limit:
                return None
        return cls(opts, budgets, L, L)

    def states(self) -> int:
        return (self.dcap + 1) * (self.X + 1) * self.nU

    def priced_remaining(self, use: np.ndarray, lams: np.ndarray) -> np.ndarray:
        """For each multiplier vector lam (rows of ``lams``, seconds per device of each
        class): R[j, x], the least sum of t + lam . counts of a chain of usable options from
        cover x to a first stage. A state that has used u devices then needs at least
        R[j, x] - lam . (N - u) more stage time (its stages in front use at most N - u:
        Lagrange's bound on the budgets the plain ``remaining_bound`` ignores)."""
        X, C = self.X, len(self.N)
        out = np.empty((len(lams), X + 1))
        used = np.zeros((X + 1, C), dtype=np.int64)
        for j, lam in enumerate(lams):
            _chain(X, self.kind, self.xf, self.span, self.cnt, self.t, use, np.ascontiguousarray(lam, dtype=np.float64),
                   out[j], used)
        return out

    def multipliers(self) -> np.ndarray:
        """Device prices (seconds per device of each class) that raise the priced remaining
        bound of the whole pipeline (a last stage and the chain in front of it, within the
        budgets) the most: subgradient steps on its Lagrangian dual, every option usable.
        Computed once per table; the bound holds for any prices, these only make it
        strong."""
        if getattr(self, "_lams", None) is not None:
            return self._lams
        X, C, N = self.X, len(self.N), self.N.astype(np.float64)
        use = np.ones(len(self.t), dtype=np.bool_)
        last = np.nonzero(self.kind == LAST)[0]
        R = np.empty(X + 1)
        used = np.zeros((X + 1, C), dtype=np.int64)
        lam = np.zeros(C)
        best, best_lam = -math.inf, lam.copy()
        scale = None
        for i in range(MULTIPLIER_STEPS):
            _chain(X, self.kind, self.xf, self.span, self.cnt, self.t, use, lam, R, used)
            tot = self.t[last] + self.cnt[last] @ lam + R[self.span[last]]
            if not len(tot) or not np.isfinite(tot).any():
                break
            k = last[int(np.argmin(tot))]
            val = float(tot.min() - lam @ N)
            if val > best:
                best, best_lam = val, lam.copy()
            g = (self.cnt[k] + used[self.span[k]] - N) / np.maximum(N, 1)  # overuse, as a share of each budget
            if scale is None:
                scale = float(tot.min()) / max(1.0, float(N.sum()))
            if not np.any(g > 0) and not np.any((g < 0) & (lam > 0)):
                break
            lam = np.maximum(0.0, lam + scale * 2.0 / (1 + i) * g)
        self._lams = np.array([best_lam * a for a in MULTIPLIER_SCALES]) if best > -math.inf and best_lam.any() \
            else np.zeros((0, C))
        return self._lams

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
def _chain(X, kind, xf, span, cnt, t, use, lam, R, used):
    """R[x]: the least sum of t + lam . counts over chains of usable options from cover x
    to a first stage (budgets ignored; inf where none); used[x]: that chain's counts.
    Anywhere-options (shapes) count by span, the cheapest of each; fixed-position ones
    (ranges) at their position."""
    n, C = kind.shape[0], cnt.shape[1]
    cost = np.empty(n)
    bi = np.full(X + 1, np.inf)  # the cheapest anywhere inner option of each span, and which
    ai = np.full(X + 1, -1, dtype=np.int64)
    bf = np.full(X + 1, np.inf)  # first options likewise
    af = np.full(X + 1, -1, dtype=np.int64)
    nfix = np.zeros(X + 2, dtype=np.int64)  # fixed-position options per position (offsets)
    for k in range(n):
        if not use[k] or (kind[k] != 0 and kind[k] != 1):
            continue
        c = t[k]
        for j in range(C):
            c += lam[j] * cnt[k, j]
        cost[k] = c
        sp = span[k]
        if xf[k] >= 0:
            if xf[k] <= X:
                nfix[xf[k] + 1] += 1
        elif sp <= X:
            if kind[k] == 0:
                if sp >= 1 and c < bi[sp]:
                    bi[sp], ai[sp] = c, k
            elif c < bf[sp]:
                bf[sp], af[sp] = c, k
    for x in range(X + 1):
        nfix[x + 1] += nfix[x]
    fix = np.empty(nfix[X + 1], dtype=np.int64)
    fill = nfix[:X + 1].copy()
    for k in range(n):
        if use[k] and (kind[k] == 0 or kind[k] == 1) and 0 <= xf[k] <= X:
            fix[fill[xf[k]]] = k
            fill[xf[k]] += 1
    arg = np.full(X + 1, -1, dtype=np.int64)
    for x in range(X, -1, -1):
        best, bk = np.inf, -1
        if af[X - x] >= 0:
            best, bk = bf[X - x], af[X - x]
        for sp in range(1, X - x + 1):
            if ai[sp] >= 0:
                c = bi[sp] + R[x + sp]
                if c < best:
                    best, bk = c, ai[sp]
        for q in range(nfix[x], nfix[x + 1]):
            k = fix[q]
            if kind[k] == 1:
                c = cost[k]
            else:
                x2 = x + span[k]
                if x2 == x or x2 > X:
                    continue
                c = cost[k] + R[x2]
            if c < best:
                best, bk = c, k
        R[x] = best
        arg[x] = bk
    for x in range(X + 1):
        for j in range(C):
            used[x, j] = 0
        y = x
        while y <= X and arg[y] >= 0:
            k = arg[y]
            for j in range(C):
                used[x, j] += cnt[k, j]
            if kind[k] == 1:
                break
            y += span[k]


CELL_WEIGHT = 6
"""Cells of the kernel's passes over a row of device vectors (the frontier's envelope, one
pass per class, its scan and fold; a row's opening; the sort of the states kept) and the
priced checks, counted as one unit of work per CELL_WEIGHT: measured over 390 programs of
six instances (lab-16 to fleet-1024, v1 and v2) on a 2-core machine, ~12 ns per state,
option or (state, option) pair tried, the older units, and ~1-2.5 ns per such cell (from
the fleet instances' time beyond their older units); the charge then predicts the
kernel's time within 0.82-1.38x on those six instances (0.45-1.19x before). Before
they were counted, a fleet-1024 x GPT-3 1.3B v2 search spent 2.2x the time its counted
kernel work said (four device classes: the passes per class dominate)."""


@njit(cache=True)
def _open(D, P, Q, d, x):
    D[d, x, :] = np.inf
    P[d, x, :] = -1
    Q[d, x, :] = 0


@njit(cache=True)
def _frontier(row, env, comp, strides, nU, rem, limit, out, mx, lams, prem, N):
    """The states of one (depth, position) row worth expanding: able to get below the
    limit, not dominated within the row by a state with fewer devices of some class, nor
    by ``env`` (the shallower rows). Folds the row into env. ``mx``: values are maxima
    (bottlenecks), not sums. ``prem[j]``: the row's priced remaining bound at prices
    ``lams[j]`` (sums only)."""
    C = strides.shape[0]
    J = lams.shape[0]
    E = row.copy()
    for c in range(C):
        st = strides[c]
        for u in range(nU):
            if comp[u, c] >= 1 and E[u - st] < E[u]:
                E[u] = E[u - st]
    cnt = 0
    checked = 0
    for u in range(nU):
        v = row[u]
        if ((v if v > rem else rem) if mx else v + rem) >= limit or env[u] <= v:
            continue
        checked += 1
        priced = False
        for j in range(J):
            r = prem[j]
            for c in range(C):
                r -= lams[j, c] * (N[c] - comp[u, c])
            if v + r >= limit:
                priced = True
                break
        if priced:
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
    return cnt, checked


@njit(cache=True)
def _kernel(X, L, N, comp, strides, nU, dcap, kind, xf, span, cnt, off, t, amax, group, byc, use, limit, rem,
            floor, mx, max_work, lams, prem):
    """The least sum (``mx``: the least maximum) of stage times over plans, below ``limit``;
    every bound test is against the best plan found so far (itself below ``limit``). A
    plan at ``floor`` (a lower bound on every plan) ends the search. Also returns its work:
    states scanned, options scanned and (state, option) pairs tried, and the cells of
    its passes over rows in CELL_WEIGHT's units, counted (not timed);
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
    cells = np.empty(nU, dtype=np.int64)
    env = np.full((X + 1, nU), INF)
    work = (X + 1) * nU // CELL_WEIGHT  # (the envelopes' initialisation)
    J = lams.shape[0]
    for k in range(n):  # one-stage plans
        if use[k] and kind[k] == 3 and t[k] < best:
            best, best_item, best_d, best_u = t[k], k, 0, -1
    for k in range(n):  # the last stage
        if use[k] and kind[k] == 2:
            x, u = span[k], off[k]
            if not live[1, x]:
                _open(D, P, Q, 1, x)
                live[1, x] = True
                work += nU // CELL_WEIGHT
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
            m, checked = _frontier(row, env[x], comp, strides, nU, rem[x], best, cells, mx, lams, prem[:, x], N)
            # (the row's passes: the envelope, one per class, the scan and the fold; the
            # priced and dominance checks of the states that pass the first test)
            work += nU + (nU * (C + 2) + checked * (J + 1) * C) // CELL_WEIGHT
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
            work += m * (1 + int(math.log2(m + 1))) // CELL_WEIGHT
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
                            work += nU // CELL_WEIGHT
                        if w < D[dst, x2, u2]:
                            D[dst, x2, u2] = w
                            P[dst, x2, u2] = k
                            Q[dst, x2, u2] = 1 if same else 0
    return best, best_item, best_d, best_u, P, Q, work


SETUP_WORK_PER_OPTION = 500
"""Counted work charged per option of the table for a program's set-up outside the kernel
(remaining bounds, priced bounds, masks): 3.7 us per option fitted over 193 programs on
mix-64 x GPT-3 1.3B v2 with another benchmark running (~2 us alone, taking the load's
slowdown as the kernel's), ~500 of the kernel's units."""


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
    lams, prem = np.zeros((0, len(tab.N))), np.zeros((0, tab.X + 1))
    if not mx and math.isfinite(limit):  # (sums: the budgets priced in the remaining bound)
        lams = tab.multipliers()
        prem = tab.priced_remaining(use, lams)
    out = _kernel(tab.X, tab.L, tab.N, tab.comp, tab.strides, tab.nU, tab.dcap, tab.kind, tab.xf, tab.span, tab.cnt,
                  tab.off, tab.t, tab.amax, tab.group, tab.byc, use, float(limit), rem, floor, mx,
                  np.iinfo(np.int64).max if max_work is None else int(max_work), lams, prem)
    if meter is not None:  # (the set-up's work: SETUP_WORK_PER_OPTION)
        meter[0] += out[6] + SETUP_WORK_PER_OPTION * len(tab.t)
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
    if tab.kind[k] == ONLY:
        return float(best), [tab.refs[k]]
    seq = [k]
    x = int(tab.xf[k]) if tab.xf[k] >= 0 else tab.X - int(tab.span[k])
    while True:
        j, same = int(P[d, x, u]), int(Q[d, x, u])
        seq.append(j)
        if tab.kind[j] == LAST:
            break
        x -= int(tab.span[j])
        u -= int(tab.off[j])
        if not same:
            d -= 1
    assert tab.kind[seq[-1]] == LAST and tab.kind[seq[0]] == FIRST
    return float(best), [tab.refs[j] for j in seq]


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
