"""Exact dynamic program over stage shapes for one micro-batch count M.

For a bottleneck cap tau and a tail cap sigma, ``min_stage_sum`` finds the plan (a
multiset of shapes, allocator.shapes, in pipeline order) whose stages all run within tau
and whose tails are all within sigma, that minimises the sum of its stage times, and fits
the class budgets and 1F1B memory. The search then minimises
(M - 1) tau + sigma + min_stage_sum(tau, sigma) over the caps (allocator.search).

The program builds pipelines from the back. A state is (d, x, u): d stages placed (the
last stage and d - 1 inner stages), x blocks covered, u the devices used per class (a
mixed-radix index). The next stage sits under d stages, so it must have amax >= d; that
makes memory exact without any ordering argument. Depths beyond the deepest finite amax
collapse into one layer (only shapes that fit at any depth go there). The first stage
closes the pipeline: a plan is a first shape at some d whose blocks complete the model.

Costs: states x shapes x depth layers; the search calls it only where the state space
is small (``STATE_LIMIT``) and uses the integer program elsewhere.
"""

from __future__ import annotations

import math

import numpy as np

from .shapes import FIRST, INNER, LAST, ONLY, Shape

STATE_LIMIT = 30_000_000
"""Largest (depth layers x blocks x device vectors) state space the dynamic program is
used for."""

try:  # numba compiles the kernel once (cached on disk); without it the kernel runs in Python
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; this keeps imports working
    def njit(*a, **k):
        def wrap(f):
            return f
        return wrap if not (a and callable(a[0])) else a[0]


class ShapeTable:
    """Arrays of one M's shapes, and the device-vector index of the class budgets."""

    def __init__(self, shapes: list[Shape], budgets: list[int], L: int):
        self.shapes = shapes
        self.L = L
        self.K = L - 2
        C = len(budgets)
        self.N = np.array(budgets, dtype=np.int64)
        dims = [n + 1 for n in budgets]
        strides = np.ones(C, dtype=np.int64)
        for c in range(C - 2, -1, -1):
            strides[c] = strides[c + 1] * dims[c + 1]
        self.strides = strides
        self.nU = int(np.prod(dims)) if C else 1
        grid = np.indices(dims).reshape(C, -1).T if C else np.zeros((1, 0), dtype=np.int64)
        self.comp = np.ascontiguousarray(grid.astype(np.int64))
        n = len(shapes)
        self.kind = np.array([s.kind for s in shapes], dtype=np.int64)
        self.blocks = np.array([s.blocks for s in shapes], dtype=np.int64)
        self.cnt = np.array([s.counts for s in shapes], dtype=np.int64).reshape(n, C)
        self.off = self.cnt @ strides if n else np.zeros(0, dtype=np.int64)
        self.t = np.array([s.t for s in shapes], dtype=np.float64)
        self.tail = np.array([s.tail for s in shapes], dtype=np.float64)
        self.amax = np.array([min(s.amax, L) for s in shapes], dtype=np.int64)
        finite = [a for a in self.amax if a < L]
        self.dcap = (max(finite) + 1) if finite else 1

    def remaining_bound(self, use: np.ndarray) -> np.ndarray:
        """rem[x]: a lower bound on the stage times still to come when the last stages
        cover x blocks: the first stage, and the other blocks at the fastest time per block
        any usable inner shape achieves."""
        K = self.K
        inner = use & (self.kind == INNER)
        per_block = float(np.min(self.t[inner] / self.blocks[inner])) if inner.any() else math.inf
        first = use & (self.kind == FIRST)
        rem = np.full(K + 1, math.inf)
        for f in np.nonzero(first)[0]:
            lf = int(self.blocks[f])
            for x in range(K - lf + 1):
                left = K - x - lf
                v = self.t[f] + (per_block * left if left else 0.0)
                if v < rem[x]:
                    rem[x] = v
        return rem

    def states(self) -> int:
        return (self.dcap + 1) * (self.K + 1) * self.nU


@njit(cache=True)
def _frontier(row, env, comp, strides, nU, rem, limit, out):
    """Mark the cells of one (depth, blocks) row worth expanding: finite, below the limit,
    and not dominated by a cell with the same blocks, no more devices of any class and no
    more stages placed (``env``: the best of the shallower rows; fewer devices and a
    shallower depth are never worse for the stages still to come). Folds the row into env."""
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
        if v + rem >= limit or env[u] <= v:
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
def _open(D, P, Q, d, x):
    D[d, x, :] = np.inf
    P[d, x, :] = -1
    Q[d, x, :] = 0


@njit(cache=True)
def _kernel(K, L, N, comp, strides, nU, dcap, kind, blocks, cnt, off, t, amax, use, limit, rem_lb):
    C = N.shape[0]
    INF = np.inf
    # rows are initialised when first reached: most (depth, blocks) rows never are
    D = np.empty((dcap + 1, K + 1, nU))
    P = np.empty((dcap + 1, K + 1, nU), dtype=np.int32)
    Q = np.empty((dcap + 1, K + 1, nU), dtype=np.int8)  # 1: came from the same layer
    live = np.zeros((dcap + 1, K + 1), dtype=np.bool_)
    n = kind.shape[0]
    best = limit
    best_item = -1
    best_d = -1
    best_u = -1
    cells = np.empty(nU, dtype=np.int64)
    env = np.full((K + 1, nU), INF)
    for k in range(n):  # one-stage plans
        if use[k] and kind[k] == 3 and t[k] < best:
            best, best_item, best_d, best_u = t[k], k, 0, -1
    for k in range(n):  # the last stage
        if use[k] and kind[k] == 2:
            x, u = blocks[k], off[k]
            if not live[1, x]:
                _open(D, P, Q, 1, x)
                live[1, x] = True
            if t[k] < D[1, x, u]:
                D[1, x, u] = t[k]
                P[1, x, u] = k
                live[1, x] = True
    firsts = np.array([k for k in range(n) if use[k] and kind[k] == 1], dtype=np.int64)
    inners = np.array([k for k in range(n) if use[k] and kind[k] == 0], dtype=np.int64)
    for d in range(1, dcap + 1):
        same = d == dcap
        dst = dcap if same else d + 1
        for x in range(K + 1):
            if not live[d, x]:
                continue
            m = _frontier(D[d, x], env[x], comp, strides, nU, rem_lb[x], limit, cells)
            if m == 0:
                continue
            # close with a first stage
            for kk in range(firsts.shape[0]):
                k = firsts[kk]
                if blocks[k] != K - x:
                    continue
                if (same and amax[k] < L) or (not same and amax[k] < d):
                    continue
                for ci in range(m):
                    u = cells[ci]
                    ok = True
                    for c in range(C):
                        if comp[u, c] + cnt[k, c] > N[c]:
                            ok = False
                            break
                    if ok:
                        w = D[d, x, u] + t[k]
                        if w < best:
                            best, best_item, best_d, best_u = w, k, d, u
            # add an inner stage under them
            for kk in range(inners.shape[0]):
                k = inners[kk]
                l = blocks[k]
                if x + l > K:
                    continue
                if (same and amax[k] < L) or (not same and amax[k] < d):
                    continue
                tk = t[k]
                if tk + rem_lb[x + l] >= limit:
                    continue
                for ci in range(m):
                    u = cells[ci]
                    w = D[d, x, u] + tk
                    if w + rem_lb[x + l] >= limit:
                        continue
                    ok = True
                    for c in range(C):
                        if comp[u, c] + cnt[k, c] > N[c]:
                            ok = False
                            break
                    if not ok:
                        continue
                    u2 = u + off[k]
                    if not live[dst, x + l]:
                        _open(D, P, Q, dst, x + l)
                        live[dst, x + l] = True
                    if w < D[dst, x + l, u2]:
                        D[dst, x + l, u2] = w
                        P[dst, x + l, u2] = k
                        Q[dst, x + l, u2] = 1 if same else 0
    return best, best_item, best_d, best_u, P, Q


def min_stage_sum(tab: ShapeTable, use: np.ndarray, limit: float = math.inf) -> tuple[float, list[Shape] | None]:
    """(min sum of stage times, shapes in pipeline order) over plans using only the shapes
    marked in ``use``; (inf, None) if none exists or none sums to less than ``limit``
    (states that cannot get below it are not expanded)."""
    if not use.any():
        return math.inf, None
    rem = tab.remaining_bound(use)
    best, k, d, u, P, Q = _kernel(tab.K, tab.L, tab.N, tab.comp, tab.strides, tab.nU, tab.dcap, tab.kind, tab.blocks,
                                  tab.cnt, tab.off, tab.t, tab.amax, use, float(limit), rem)
    if k < 0 or not math.isfinite(best):
        return math.inf, None
    shapes = tab.shapes
    if shapes[k].kind == ONLY:
        return float(best), [shapes[k]]
    seq = [shapes[k]]
    x = tab.K - shapes[k].blocks
    # walk back from the state the first stage closed
    while d >= 1:
        j = int(P[d, x, u])
        s = shapes[j]
        seq.append(s)
        if s.kind == LAST:
            break
        same = Q[d, x, u] == 1
        x -= s.blocks
        u -= int(tab.off[j])
        if not same:
            d -= 1
    assert seq[-1].kind == LAST and seq[0].kind == FIRST
    assert all(s.kind == INNER for s in seq[1:-1])
    return float(best), seq
