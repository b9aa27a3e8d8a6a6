"""A lower bound on every plan at one micro-batch count M that knows the stages share the
cluster: the class budgets relaxed with Lagrange multipliers, the layers split by a
dynamic program over block counts (models of identical blocks).

For any plan at M with bottleneck tau = max_s t_s and unit counts n_s (per class, one
replica's worth: R = 1 covers every plan, allocator.search), and any multipliers
lam >= 0 (seconds per unit of each class),

    objective >= (M - 1) tau + sum_s t_s
              >= (M - 1) tau + sum_s [t_s + lam . n_s] - lam . N            (sum_s n_s <= N)
              >= (M - 1) tau + min over splits of sum_s price_s(tau, lam) - lam . N

where price_s is the least t + lam . n over stage times t <= tau and real unit counts
0 <= n <= N whose capacity at t covers the micro-batch b: a unit of class c runs at
most k_c(t) samples of the stage's range within t (its time grows with its share; the
exact share split of allocator.problem), so sum_c n_c k_c(t) >= b, and the cheapest such
n is a fractional knapsack. With lam = 0 this is the partition bound of
allocator.bounds; the multipliers price the devices a stage takes from the others, which
is what makes a split into many stages, or a small M, pay for its stages' devices.

Times and shares are put on geometric grids, each rounded in the bound's favour (a
time in [t_g, t_g+1) counts as t_g with the capacity of t_g+1; a share between two grid
shares counts as the larger), so the bound stays valid and loses at most the grids'
ratios. tau runs over the same grid: for tau in [t_h-1, t_h] the bound takes (M - 1)
t_h-1 and stage times up to t_h, so one pass of the program gives the bound of every tau
interval for one lam; the multipliers are then improved for the interval with the
lowest bound (a scan along one direction, then subgradient steps), and the bound of M is
the lowest interval's best.
"""

from __future__ import annotations

import math

import numpy as np

from .dp import njit
from .problem import Problem, StageTimer
from .shapes import FIRST, INNER, LAST, ONLY, block_range

T_RATIO = 1.01
"""Ratio of consecutive grid times (the bound loses at most this factor on stage times)."""

K_EXACT = 64
"""Shares up to this are exact; beyond, a geometric grid of ratio K_RATIO."""

K_RATIO = 1.01

SCAN = 12
"""Multiplier scales tried along the first direction (halving from 4x the objective's scale)."""

STEPS = 15
"""Subgradient steps on the interval with the lowest bound."""


def share_grid(b: int) -> np.ndarray:
    ks = list(range(1, min(b, K_EXACT) + 1))
    k = float(ks[-1])
    while ks[-1] < b:
        k = max(k * K_RATIO, ks[-1] + 1)
        ks.append(min(b, int(math.ceil(k))))
    return np.array(ks, dtype=np.int64)


def stage_specs(prob: Problem) -> list[tuple[int, int]]:
    K = prob.L - 2
    return [(FIRST, l) for l in range(K + 1)] + [(INNER, l) for l in range(1, K + 1)] + \
        [(LAST, l) for l in range(K + 1)] + [(ONLY, K)]


def unit_times(prob: Problem, timer: StageTimer, M: int, budget: list[int], ks: np.ndarray) -> np.ndarray:
    """T[s, c, g]: seconds for one unit of class c to run spec s's range on ks[g] samples
    (the faster recomputation choice that fits memory; inf where none fits), running
    maxima over g so that it grows with the share."""
    specs = stage_specs(prob)
    ranges = [block_range(prob, kind, l) for kind, l in specs]
    I = np.array([i for i, _ in ranges])
    J = np.array([j for _, j in ranges])
    infl = M if prob.schedule == "gpipe" else 1
    dp = prob.most_units(budget) if prob.zero1 else 1
    T = np.full((len(specs), len(prob.classes), len(ks)), np.inf)
    for c in prob.classes:
        if budget[c.index] <= 0:
            continue
        for rc in prob.recompute_options:
            km = np.array([prob.kmem(c, i, j, infl, rc, dp) for i, j in ranges])
            for g, k in enumerate(ks):
                ok = km >= k
                if not ok.any():
                    break
                t = timer.times(c, I, J, int(k), rc)
                T[:, c.index, g] = np.where(ok, np.minimum(T[:, c.index, g], t), T[:, c.index, g])
    return np.maximum.accumulate(T, axis=2)


@njit(cache=True)
def _capacities(T, ks, tg, b):
    """cap[s, c, g]: most samples a unit of class c runs of spec s within tg[g], rounded up
    to just below the next grid share (valid when times grow with the share, as the
    planner's model assumes); the last column: within any time (memory's cap)."""
    S, C, G = T.shape[0], T.shape[1], tg.shape[0]
    cap = np.zeros((S, C, G + 1))
    nk = ks.shape[0]
    for s in range(S):
        for c in range(C):
            p = 0
            for g in range(G + 1):
                while p < nk and (g == G and np.isfinite(T[s, c, p]) or g < G and T[s, c, p] <= tg[g]):
                    p += 1
                if p == 0:
                    cap[s, c, g] = 0.0
                elif p == nk:
                    cap[s, c, g] = ks[nk - 1]
                else:
                    cap[s, c, g] = min(b, ks[p] - 1)
    return cap


@njit(cache=True)
def _knap(caps, lam, N, b, counts):
    """Least lam . n over real 0 <= n <= N with sum n_c caps_c >= b (inf if none); the n in
    ``counts``."""
    C = caps.shape[0]
    need = float(b)
    cost = 0.0
    used = np.zeros(C, dtype=np.bool_)
    for c in range(C):
        counts[c] = 0.0
    while need > 1e-9:
        best, bc = np.inf, -1
        for c in range(C):
            if not used[c] and caps[c] > 0 and N[c] > 0:
                r = lam[c] / caps[c]
                if r < best:
                    best, bc = r, c
        if bc < 0:
            return np.inf
        used[bc] = True
        n = min(N[bc], need / caps[bc])
        counts[bc] = n
        cost += lam[bc] * n
        need -= n * caps[bc]
    return cost


@njit(cache=True)
def _prices(cap, tg, lam, N, b):
    """P[s, h] (h = 1..G): least t + lam . n of spec s over stage times t < tg[h] (t in
    [tg[g], tg[g+1]) counted as tg[g] with the capacity of tg[g+1]); column G: any time."""
    S, C, G1 = cap.shape
    G = G1 - 1
    P = np.full((S, G + 1), np.inf)
    counts = np.zeros(C)
    for s in range(S):
        run = np.inf
        for g in range(G):
            if g >= 1:
                P[s, g] = run
            v = tg[g] + _knap(cap[s, :, g + 1], lam, N, b, counts)
            if v < run:
                run = v
        P[s, G] = run
    return P


@njit(cache=True)
def _split(P, h, K):
    """Least sum of prices (column h) over the ways to split K blocks into stages, and the
    specs of its stages (-1 padded)."""
    inner = np.full(K + 1, np.inf)
    arg = np.full(K + 1, -1, dtype=np.int64)
    inner[0] = 0.0
    for x in range(1, K + 1):
        for l in range(1, x + 1):
            v = P[K + l, h] + inner[x - l]  # INNER l is spec K + l (FIRST 0..K come first)
            if v < inner[x]:
                inner[x] = v
                arg[x] = l
    best = P[3 * K + 2, h]  # ONLY
    ba, bc = -1, -1
    for a in range(K + 1):
        pa = P[a, h]
        if not np.isfinite(pa):
            continue
        for c in range(K + 1 - a):
            v = pa + P[2 * K + 1 + c, h] + inner[K - a - c]
            if v < best:
                best, ba, bc = v, a, c
    chosen = np.full(K + 2, -1, dtype=np.int64)
    if ba < 0:
        if np.isfinite(best):
            chosen[0] = 3 * K + 2
        return best, chosen
    chosen[0] = ba
    chosen[1] = 2 * K + 1 + bc
    x, q = K - ba - bc, 2
    while x > 0:
        l = arg[x]
        chosen[q] = K + l
        q += 1
        x -= l
    return best, chosen


@njit(cache=True)
def _pass(cap, tg, lam, N, b, K, M, h0):
    """The bound of every tau interval h >= h0 for one multiplier vector (interval h < G:
    tau in [tg[h-1], tg[h]]; h = G: tau >= tg[G-1])."""
    P = _prices(cap, tg, lam, N, b)
    G = tg.shape[0]
    lamN = 0.0
    for c in range(lam.shape[0]):
        lamN += lam[c] * N[c]
    out = np.full(G + 1, np.inf)
    loosest, _ = _split(P, G, K)  # no interval's split is cheaper than the loosest cap's
    out[G] = loosest + (M - 1) * tg[G - 1] - lamN
    low = out[G]
    for h in range(max(1, h0), G):
        floor = loosest + (M - 1) * tg[h - 1] - lamN
        if floor >= low:
            break  # this interval and every later one are no lower than the lowest so far
        v, _ = _split(P, h, K)
        out[h] = v + (M - 1) * tg[h - 1] - lamN
        if out[h] < low:
            low = out[h]
    for h in range(max(1, h0), G):  # intervals skipped above: at least their floor
        if not np.isfinite(out[h]) or out[h] == np.inf:
            floor = loosest + (M - 1) * tg[h - 1] - lamN
            if floor >= low:
                out[h] = floor
    return out


@njit(cache=True)
def _used(cap, tg, lam, N, b, K, h):
    """Units per class that the cheapest split of interval h takes at these multipliers."""
    P = _prices(cap, tg, lam, N, b)
    _, chosen = _split(P, h, K)
    C = cap.shape[1]
    G = tg.shape[0]
    tot = np.zeros(C)
    counts = np.zeros(C)
    for q in range(chosen.shape[0]):
        s = chosen[q]
        if s < 0:
            break
        run, gbest = np.inf, -1
        for g in range(min(h, G)):
            v = tg[g] + _knap(cap[s, :, g + 1], lam, N, b, counts)
            if v < run:
                run, gbest = v, g
        if gbest >= 0:
            _knap(cap[s, :, gbest + 1], lam, N, b, counts)
            tot += counts
    return tot


def lagrange_bound(prob: Problem, timer: StageTimer, M: int, stop_at: float = math.inf) -> float:
    """The bound of the module doc for plans at M of a model of identical blocks (inf if
    no split can take the micro-batch). ``stop_at``: return as soon as the bound reaches it."""
    b = timer.b
    budget = [c.count for c in prob.classes]
    K = prob.L - 2
    ks = share_grid(b)
    T = unit_times(prob, timer, M, budget, ks)
    finite = T[np.isfinite(T)]
    if finite.size == 0:
        return math.inf
    lo, hi = float(finite.min()), float(finite.max())
    if M > 1 and math.isfinite(stop_at):
        hi = min(hi, stop_at / (M - 1))
    hi = max(hi, lo)
    n = int(math.ceil(math.log(hi / lo) / math.log(T_RATIO))) + 2 if hi > lo else 2
    tg = lo * T_RATIO ** np.arange(n)
    cap = _capacities(T, ks, tg, b)
    N = np.array(budget, dtype=np.float64)
    h0 = n if M == 1 else 1  # one micro-batch: no bottleneck term, the loosest interval is the lowest
    best = np.full(n + 1, -np.inf)
    best[:h0] = np.inf
    arg: list = [None] * (n + 1)

    def fold(lam: np.ndarray) -> None:
        vals = _pass(cap, tg, lam, N, b, K, M, h0)
        better = vals > best
        best[better] = vals[better]
        for h in np.nonzero(better)[0]:
            arg[h] = lam

    # the first direction: each class priced by its speed (samples per second of one unit)
    # on a typical inner range
    mid = K + max(1, K // 4)
    speed = np.zeros(len(budget))
    for c in range(len(budget)):
        ok = np.nonzero(np.isfinite(T[mid, c]))[0]
        if ok.size:
            speed[c] = ks[ok[-1]] / T[mid, c, ok[-1]]
    if not (speed > 0).any():
        speed = np.ones(len(budget))
    speed = np.maximum(speed, 1e-3 * speed.max())
    direction = speed / max(1e-30, float((speed * N).sum()))  # lam . N = 1
    fold(direction * 0.0)  # the partition bound (allocator.bounds)
    # lam . N of the objective's order: from 4x the incumbent (or 16x the partition bound) down
    scale = 4 * stop_at if math.isfinite(stop_at) else 16 * max(float(best.min()), lo)
    for q in range(SCAN):
        fold(direction * scale * 0.5 ** q)
        if best.min() >= stop_at:
            return float(best.min())
    step = 0.5
    for _ in range(STEPS):  # subgradient steps on the interval with the lowest bound
        low = float(best.min())
        if low >= stop_at or not math.isfinite(low):
            break
        h = int(np.argmin(best))
        lam = arg[h] if arg[h] is not None else direction * scale
        g = (_used(cap, tg, lam, N, b, K, h) - N) / np.maximum(N, 1.0)
        if float(np.abs(g).max()) <= 1e-9:
            break
        fold(lam * np.exp(step * np.clip(g, -1.0, 1.0)))  # the over-used classes dearer
        step *= 0.8
    return float(best.min())
