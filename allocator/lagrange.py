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
Memory follows the stage's depth: in 1F1B a stage with d stages behind it holds
min(M, d + 1) micro-batches, so the split is built from the last stage forward with the
depth in its state; depths are grouped into buckets of powers of two, each priced at its
smallest in-flight count (the least memory: still a relaxation).

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

BLOCK = 16
"""Bottleneck intervals resolved together where their common bound is high enough."""

STEPS = 15
"""Subgradient steps on the interval with the lowest bound."""

QUICK_FLAT = 2
"""The quick bound's scan stops after this many scales in a row that did not raise it
(measured on lab-16 and mix-64: the bound peaks within the first 1-3 scales and falls
after)."""


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


def inflight_buckets(prob: Problem, M: int, K: int, depths: int) -> tuple[np.ndarray, np.ndarray]:
    """(in-flight micro-batches of each bucket, bucket of each depth row). A stage with d
    stages behind it holds min(M, d + 1) micro-batches in 1F1B (M in GPipe). Rows are the
    depths 0 .. ``depths``, the last one standing for every deeper stage too; rows are
    grouped into buckets of powers of two; each bucket is counted at its smallest in-flight
    count (the least memory: a valid relaxation)."""
    if prob.schedule == "gpipe":  # every stage holds M: the last stage and all the others
        return np.array([M]), np.zeros(2, dtype=np.int64)
    D = min(M, K + 1, depths) + 1
    infls = sorted({min(M, 1 << q) for q in range(D.bit_length() + 1) if 1 << q <= D} | {min(M, D)})
    of = np.array([max(b for b, f in enumerate(infls) if f <= min(M, d + 1)) for d in range(D)], dtype=np.int64)
    return np.array(infls), of


DEPTHS = 64
"""Most pipeline depths the deep bound's memory tells apart (deeper stages count as this
deep); fewer where memory no longer changes with depth (``depths_needed``)."""

QUICK_DEPTHS = 8
"""Depths the first bound of a micro-batch count tells apart (``lagrange_bound``: deep
bounds are for the budget a search has left at its end)."""


def depths_needed(prob: Problem, M: int, K: int, b: int, budget: list[int]) -> int:
    """The fewest depth rows (a power of two, at most DEPTHS) whose deepest row's memory is
    that of the deepest stage a plan can have: every range's largest share that fits
    (capped at the micro-batch b) is the same there for every class and recomputation
    choice. Memory that does not bind needs one row; a model that fills the devices needs
    the depths at which its caps still fall (in 1F1B a deeper stage holds more)."""
    if prob.schedule == "gpipe":
        return 1
    specs = stage_specs(prob)
    ranges = [block_range(prob, kind, l) for kind, l in specs]
    dp = prob.most_units(budget) if prob.zero1 else 1
    classes = [c for c in prob.classes if budget[c.index] > 0]

    def caps(f: int) -> list:
        return [min(b, prob.kmem(c, i, j, f, rc, dp)) for c in classes for rc in prob.recompute_options
                for i, j in ranges]

    deepest = caps(min(M, K + 2))
    D = 1
    while D < min(M, K + 1, DEPTHS) and caps(min(M, D + 1)) != deepest:
        D *= 2
    return min(D, M, K + 1, DEPTHS)


def unit_tables(prob: Problem, timer: StageTimer, M: int, budget: list[int], ks: np.ndarray,
                infls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T[r, s, c, g]: seconds for one unit of class c to run spec s's range on ks[g]
    samples with recomputation choice r, memory aside, as running maxima over g (times grow
    with the share); KM[r, s, c, q]: the largest share that fits at in-flight infls[q])."""
    specs = stage_specs(prob)
    ranges = [block_range(prob, kind, l) for kind, l in specs]
    I = np.array([i for i, _ in ranges])
    J = np.array([j for _, j in ranges])
    dp = prob.most_units(budget) if prob.zero1 else 1
    R = prob.recompute_options
    T = np.full((len(R), len(specs), len(prob.classes), len(ks)), np.inf)
    KM = np.full((len(R), len(specs), len(prob.classes), len(infls)), -1, dtype=np.int64)
    for c in prob.classes:
        if budget[c.index] <= 0:
            continue
        for r, rc in enumerate(R):
            for q, f in enumerate(infls):
                KM[r, :, c.index, q] = [prob.kmem(c, i, j, int(f), rc, dp) for i, j in ranges]
            if KM[r, :, c.index, 0].max() < 1:
                continue
            for g, k in enumerate(ks):
                T[r, :, c.index, g] = timer.times(c, I, J, int(k), rc)
    return np.maximum.accumulate(T, axis=3), KM


@njit(cache=True)
def _capacities(T, KM, ks, tg, b):
    """cap[s, c, g, q]: most samples a unit of class c runs of spec s within tg[g] at
    in-flight bucket q, over the recomputation choices: the share grid rounded up to just
    below the next grid share (valid when times grow with the share, as the planner's model
    assumes), capped by memory; column g = G: within any time."""
    Rn, S, C, nk = T.shape
    G = tg.shape[0]
    Q = KM.shape[3]
    cap = np.zeros((S, C, G + 1, Q))
    for r in range(Rn):
        for s in range(S):
            for c in range(C):
                p = 0
                for g in range(G + 1):
                    while p < nk and (g == G and np.isfinite(T[r, s, c, p]) or g < G and T[r, s, c, p] <= tg[g]):
                        p += 1
                    if p == 0:
                        k = 0
                    elif p == nk:
                        k = ks[nk - 1]
                    else:
                        k = min(b, ks[p] - 1)
                    for q in range(Q):
                        v = min(k, KM[r, s, c, q])
                        if v > cap[s, c, g, q]:
                            cap[s, c, g, q] = v
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
def _prices(cap, tg, lam, N, b, upto):
    """P[s, h, q] (h = 1..G): least t + lam . n of spec s at in-flight bucket q over stage
    times t < tg[h] (t in [tg[g], tg[g+1]) counted as tg[g] with the capacity of tg[g+1]);
    column G: any time. Only the columns up to ``upto`` are priced (G: all)."""
    S, C, G1, Q = cap.shape
    G = G1 - 1
    P = np.full((S, G + 1, Q), np.inf)
    counts = np.zeros(C)
    for q in range(Q):
        for s in range(S):
            run = np.inf
            for g in range(min(upto, G)):
                if g >= 1:
                    P[s, g, q] = run
                v = tg[g] + _knap(cap[s, :, g + 1, q], lam, N, b, counts)
                if v < run:
                    run = v
            P[s, upto, q] = run
    return P


@njit(cache=True)
def _split(P, h, K, of):
    """Least sum of prices (column h) over the ways to split K blocks into stages, each
    priced at its depth's in-flight bucket (``of``: bucket of each depth; the last depth
    absorbs every deeper one when it saturates), and its stages front to back as (spec,
    depth) (-1 padded)."""
    D = of.shape[0]
    E = np.full((D, K + 1), np.inf)
    A = np.full((D, K + 1), -1, dtype=np.int64)  # blocks of the inner stage placed last
    F = np.full((D, K + 1), -1, dtype=np.int64)  # the depth it came from
    for c in range(K + 1):  # the last stage, depth 0
        E[0, c] = P[2 * K + 1 + c, h, of[0]]
    for d in range(1, D):
        q = of[d]
        for x in range(1, K + 1):
            for l in range(1, x + 1):
                pr = P[K + l, h, q]
                v = E[d - 1, x - l] + pr
                if v < E[d, x]:
                    E[d, x], A[d, x], F[d, x] = v, l, d - 1
                if d == D - 1:  # deeper stages hold as many: the same depth again
                    v = E[d, x - l] + pr
                    if v < E[d, x]:
                        E[d, x], A[d, x], F[d, x] = v, l, d
    best = P[3 * K + 2, h, of[0]]  # one stage
    bd, bx = -1, -1
    for d in range(D):
        qf = of[min(d + 1, D - 1)]
        for x in range(K + 1):
            if not np.isfinite(E[d, x]):
                continue
            v = E[d, x] + P[K - x, h, qf]  # the first stage: FIRST K - x is spec K - x
            if v < best:
                best, bd, bx = v, d, x
    out = np.full((K + 2, 2), -1, dtype=np.int64)
    if bd < 0:
        if np.isfinite(best):
            out[0, 0], out[0, 1] = 3 * K + 2, 0
        return best, out
    out[0, 0], out[0, 1] = K - bx, min(bd + 1, D - 1)
    n, d, x = 1, bd, bx
    while True:
        if A[d, x] < 0:  # the last stage
            out[n, 0], out[n, 1] = 2 * K + 1 + x, 0
            n += 1
            break
        l = A[d, x]
        out[n, 0], out[n, 1] = K + l, d
        n += 1
        d2 = F[d, x]
        x -= l
        d = d2
    return best, out


@njit(cache=True)
def _pass(cap, tg, lam, N, b, K, M, of):
    """The bound of every tau interval for one multiplier vector (interval h < G: tau in
    [tg[h-1], tg[h]]; h = G: tau >= tg[G-1]): objective >= (M - 1) tau + sum_s t_s, and
    >= M tau (a stage takes tau)."""
    P = _prices(cap, tg, lam, N, b, tg.shape[0])
    G = tg.shape[0]
    lamN = 0.0
    for c in range(lam.shape[0]):
        lamN += lam[c] * N[c]
    out = np.full(G + 1, np.inf)
    loosest, _ = _split(P, G, K, of)  # no interval's split is cheaper than the loosest cap's
    out[G] = max(loosest + (M - 1) * tg[G - 1] - lamN, M * tg[G - 1])
    low = out[G]
    # blocks of BLOCK intervals: a block's lowest tau with its loosest cap bounds all of
    # them; only blocks whose bound is below the lowest value so far are resolved
    h = 1
    while h < G:
        top = min(G - 1, h + BLOCK - 1)
        floor = max(loosest + (M - 1) * tg[h - 1] - lamN, M * tg[h - 1])
        if floor >= low:  # this block and every later one are no lower than the lowest so far
            for q in range(h, G):
                out[q] = max(loosest + (M - 1) * tg[q - 1] - lamN, M * tg[q - 1])
            break
        v, _ = _split(P, top, K, of)
        block = max(v + (M - 1) * tg[h - 1] - lamN, M * tg[h - 1])
        if block >= low:
            for q in range(h, top + 1):
                out[q] = block
        else:
            for q in range(h, top + 1):
                v, _ = _split(P, q, K, of)
                out[q] = max(v + (M - 1) * tg[q - 1] - lamN, M * tg[q - 1])
                if out[q] < low:
                    low = out[q]
        h = top + 1
    return out


@njit(cache=True)
def _used(cap, tg, lam, N, b, K, h, of):
    """The cheapest split of interval h at these multipliers: its stages front to back as
    (spec, depth) (-1 padded) and the (fractional) units per class of each."""
    P = _prices(cap, tg, lam, N, b, h)
    _, chosen = _split(P, h, K, of)
    C = cap.shape[1]
    G = tg.shape[0]
    per = np.zeros((chosen.shape[0], C))
    counts = np.zeros(C)
    for n in range(chosen.shape[0]):
        s, d = chosen[n, 0], chosen[n, 1]
        if s < 0:
            break
        q = of[d]
        run, gbest = np.inf, -1
        for g in range(min(h, G)):
            v = tg[g] + _knap(cap[s, :, g + 1, q], lam, N, b, counts)
            if v < run:
                run, gbest = v, g
        if gbest >= 0:
            _knap(cap[s, :, gbest + 1, q], lam, N, b, counts)
            per[n] = counts
    return chosen, per


def lagrange_bound(prob: Problem, timer: StageTimer, M: int, stop_at: float = math.inf,
                   quick: bool = False, meter: list[int] | None = None, deep: bool = False) -> float:
    """The bound of the module doc for plans at M of a model of identical blocks (inf if
    no split can take the micro-batch). ``stop_at``: return as soon as the bound reaches it;
    ``quick``: only the scan along the first direction (a pruning test, not the best bound);
    ``meter``: its work is added to meter[0] (unit times tabled, knapsacks priced), a count
    the caller can charge to a work budget; ``deep``: memory told apart at every depth
    where it changes (``depths_needed``, up to DEPTHS rows: a stronger bound for models
    that fill the devices, at a higher cost), else at the first QUICK_DEPTHS."""
    meter = meter if meter is not None else [0]
    b = timer.b
    budget = [c.count for c in prob.classes]
    K = prob.L - 2
    ks = share_grid(b)
    infls, of = inflight_buckets(prob, M, K, depths_needed(prob, M, K, b, budget) if deep else QUICK_DEPTHS)
    T, KM = unit_tables(prob, timer, M, budget, ks, infls)
    meter[0] += T.size
    fits = np.isfinite(T) & (KM[..., :1] >= ks[None, None, None, :])
    if not fits.any():
        return math.inf
    lo, hi = float(T[fits].min()), float(T[fits].max())
    if math.isfinite(stop_at):  # objective >= M tau (some stage takes tau): larger tau are done
        hi = min(hi, stop_at / M)
    hi = max(hi, lo)
    n = int(math.ceil(math.log(hi / lo) / math.log(T_RATIO))) + 2 if hi > lo else 2
    tg = lo * T_RATIO ** np.arange(n)
    cap = _capacities(T, KM, ks, tg, b)
    N = np.array(budget, dtype=np.float64)
    best = np.full(n + 1, -np.inf)
    best[0] = np.inf
    arg: list = [None] * (n + 1)

    def fold(lam: np.ndarray) -> None:
        meter[0] += cap.shape[0] * cap.shape[2] * cap.shape[3]  # knapsacks priced per pass
        vals = _pass(cap, tg, lam, N, b, K, M, of)
        better = vals > best
        best[better] = vals[better]
        for h in np.nonzero(better)[0]:
            arg[h] = lam

    # the first direction: each class priced by its speed (samples per second of one unit)
    # on a typical inner range
    mid = K + max(1, K // 4)
    speed = np.zeros(len(budget))
    for c in range(len(budget)):
        ok = np.nonzero(fits[0, mid, c])[0]
        if ok.size:
            speed[c] = ks[ok[-1]] / T[0, mid, c, ok[-1]]
    if not (speed > 0).any():
        speed = np.ones(len(budget))
    speed = np.maximum(speed, 1e-3 * speed.max())
    direction = speed / max(1e-30, float((speed * N).sum()))  # lam . N = 1
    fold(direction * 0.0)  # the partition bound (allocator.bounds), with in-flight memory
    # lam . N of the objective's order: from 4x the incumbent (or 16x the partition bound) down
    scale = 4 * stop_at if math.isfinite(stop_at) else 16 * max(float(best.min()), lo)
    flat = 0
    for q in range(SCAN):
        before = float(best.min())
        fold(direction * scale * 0.5 ** q)
        if best.min() >= stop_at:
            return float(best.min())
        flat = flat + 1 if best.min() <= before else 0
        if quick and flat >= QUICK_FLAT:  # (past its peak: each smaller scale's bound lower still)
            break
    step = 0.5
    for _ in range(0 if quick else STEPS):  # subgradient steps on the interval with the lowest bound
        low = float(best.min())
        if low >= stop_at or not math.isfinite(low):
            break
        h = int(np.argmin(best))
        lam = arg[h] if arg[h] is not None else direction * scale
        _, per = _used(cap, tg, lam, N, b, K, h, of)
        g = (per.sum(axis=0) - N) / np.maximum(N, 1.0)
        if float(np.abs(g).max()) <= 1e-9:
            break
        fold(lam * np.exp(step * np.clip(g, -1.0, 1.0)))  # the over-used classes dearer
        step *= 0.8
    return float(best.min())
