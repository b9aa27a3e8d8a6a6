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
interval for one lam; the multipliers are then improved (a scan along one direction,
then, for the full bound, cutting planes on the blocks of intervals with the lowest
bounds, which reach each block's Lagrangian dual: ``Dual.ascend``), and the bound of M
is the lowest interval's best.

The deep bound also counts the largest tail sigma (gradient all-reduce and optimizer step,
allocator.problem.stage_tail): sigma is cut into levels; within a level every stage's tail
is below its top, which caps the stage's units (``tail_units``: a lower bound on the
all-reduce grows with the units), and the knapsack takes that cap as a second row
(``_knap``, exact by its one-dimensional dual).
"""

from __future__ import annotations

import heapq
import math
import time

import numpy as np

from hetalloc.costs import ring_allreduce_time, zero1_halves

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

TAIL_LEVELS = 4
"""Levels of the largest tail the deep bound tells apart (``lagrange_bound``)."""

SPLIT_WEIGHT = 2
"""Each knapsack of a pass or ascent step counted this many times, TAIL_WEIGHT times more
where the tail levels cap the units (a second row: its dual's greedy runs once per
break); measured on the 2-core development machine, splits and master programs included:
~7-7.7 million knapsacks per second without caps (mix-256 x GPT-3 13B v2, fleet-1024 x
GPT-3 175B v1), ~4 million in the deep bounds with caps (fleet-1024 x GPT-3 6.7B v1),
where the search's budget counts 15 million units per second:
search.LAGRANGE_WORK_PER_EVAL x EVALS_PER_SECOND."""

TAIL_WEIGHT = 2

BLOCKS = 60
"""Blocks of tau intervals whose multipliers the full bound optimises (lowest first)."""

ITERATIONS = 20
"""Cutting-plane steps per interval."""

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
    infls = sorted({min(M, 1 << q) for q in range(D.bit_length() + 1) if 1 << q <= D} | {min(M, D)} |
                   ({min(M, QUICK_DEPTHS + 1)} if D > QUICK_DEPTHS + 1 else set()))  # (deeper rows refine the first ones)
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
def _greedy(caps, cost, N, b, counts):
    """Least cost . n over real 0 <= n <= N with sum n_c caps_c >= b (inf if none): the
    classes by cost per sample; the n in ``counts``."""
    C = caps.shape[0]
    need = float(b)
    total = 0.0
    used = np.zeros(C, dtype=np.bool_)
    for c in range(C):
        counts[c] = 0.0
    while need > 1e-9:
        best, bc = np.inf, -1
        for c in range(C):
            if not used[c] and caps[c] > 0 and N[c] > 0:
                r = cost[c] / caps[c]
                if r < best:
                    best, bc = r, c
        if bc < 0:
            return np.inf
        used[bc] = True
        n = min(N[bc], need / caps[bc])
        counts[bc] = n
        total += cost[bc] * n
        need -= n * caps[bc]
    return total


@njit(cache=True)
def _knap(caps, lam, N, b, counts, U):
    """Least lam . n over real 0 <= n <= N with sum n_c caps_c >= b and sum n_c <= U (inf
    if none); the n in ``counts``. With U binding it is a two-row program: its value is the
    largest of the dual function of the unit row, max over nu >= 0 of
    greedy(lam + nu) - nu U (exact: that function is concave and piecewise linear with
    its breaks where two classes' costs per sample cross), its n the mix of the two greedy
    solutions either side of the best nu that uses exactly U units."""
    if U < 0:
        return np.inf
    v = _greedy(caps, lam, N, b, counts)
    if not np.isfinite(v) or U == np.inf:
        return v
    tot = 0.0
    for c in range(counts.shape[0]):
        tot += counts[c]
    if tot <= U * (1 + 1e-12):
        return v
    C = caps.shape[0]
    # feasible at all? the most samples U units run: the largest capacities first
    order = np.argsort(-caps)
    left, most = U, 0.0
    for c in order:
        if caps[c] > 0 and N[c] > 0 and left > 0:
            n = min(N[c], left)
            most += n * caps[c]
            left -= n
    if most < b * (1 - 1e-12):
        return np.inf
    nus = np.zeros(C * (C - 1) // 2 + 1)
    m = 1
    for a in range(C):
        for d in range(a + 1, C):
            if caps[a] > 0 and caps[d] > 0 and caps[a] != caps[d]:
                nu = (lam[d] * caps[a] - lam[a] * caps[d]) / (caps[d] - caps[a])
                if nu > 0:
                    nus[m] = nu
                    m += 1
    nus = np.sort(nus[:m])
    cost = np.empty(C)
    tmp = np.empty(C)
    best, k = -np.inf, 0
    for i in range(m):
        for c in range(C):
            cost[c] = lam[c] + nus[i]
        g = _greedy(caps, cost, N, b, tmp) - nus[i] * U
        if g > best:
            best, k = g, i
    # the greedy solutions inside the pieces either side of nus[k]
    lo_nu = 0.5 * (nus[k - 1] + nus[k]) if k > 0 else nus[k]
    hi_nu = 0.5 * (nus[k] + nus[k + 1]) if k + 1 < m else 2.0 * nus[k] + 1.0
    for c in range(C):
        cost[c] = lam[c] + lo_nu
    _greedy(caps, cost, N, b, counts)
    for c in range(C):
        cost[c] = lam[c] + hi_nu
    _greedy(caps, cost, N, b, tmp)
    s_lo, s_hi = 0.0, 0.0
    for c in range(C):
        s_lo += counts[c]
        s_hi += tmp[c]
    th = 1.0 if s_lo - s_hi <= 1e-12 else min(1.0, max(0.0, (U - s_hi) / (s_lo - s_hi)))
    for c in range(C):
        counts[c] = th * counts[c] + (1 - th) * tmp[c]
    return best


@njit(cache=True)
def _prices(cap, tg, lam, N, b, upto, U):
    """P[s, h, q] (h = 1..G): least t + lam . n of spec s at in-flight bucket q over stage
    times t < tg[h] (t in [tg[g], tg[g+1]) counted as tg[g] with the capacity of tg[g+1]);
    column G: any time. Only the columns up to ``upto`` are priced (G: all). U[s]: most
    units spec s may take (``tail_units``; inf: any)."""
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
                v = tg[g] + _knap(cap[s, :, g + 1, q], lam, N, b, counts, U[s])
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
def _pass(cap, tg, lam, N, b, K, M, of, U):
    """The bound of every tau interval for one multiplier vector (interval h < G: tau in
    [tg[h-1], tg[h]]; h = G: tau >= tg[G-1]): objective >= (M - 1) tau + sum_s t_s, and
    >= M tau (a stage takes tau). And the number of splits made (their work:
    ``split_work``)."""
    P = _prices(cap, tg, lam, N, b, tg.shape[0], U)
    G = tg.shape[0]
    lamN = 0.0
    for c in range(lam.shape[0]):
        lamN += lam[c] * N[c]
    out = np.full(G + 1, np.inf)
    loosest, _ = _split(P, G, K, of)  # no interval's split is cheaper than the loosest cap's
    splits = 1
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
        splits += 1
        block = max(v + (M - 1) * tg[h - 1] - lamN, M * tg[h - 1])
        if block >= low:
            for q in range(h, top + 1):
                out[q] = block
        else:
            for q in range(h, top + 1):
                v, _ = _split(P, q, K, of)
                splits += 1
                out[q] = max(v + (M - 1) * tg[q - 1] - lamN, M * tg[q - 1])
                if out[q] < low:
                    low = out[q]
        h = top + 1
    return out, splits


@njit(cache=True)
def _used(cap, tg, lam, N, b, K, h, of, U):
    """The cheapest split of interval h at these multipliers: its sum of prices, its stages
    front to back as (spec, depth) (-1 padded), the (fractional) units per class of each,
    and the largest time-grid index its stages take (the split is one of interval h' for
    every h' above that index)."""
    P = _prices(cap, tg, lam, N, b, h, U)
    v, chosen = _split(P, h, K, of)
    C = cap.shape[1]
    G = tg.shape[0]
    per = np.zeros((chosen.shape[0], C))
    counts = np.zeros(C)
    top = 0
    for n in range(chosen.shape[0]):
        s, d = chosen[n, 0], chosen[n, 1]
        if s < 0:
            break
        q = of[d]
        run, gbest = np.inf, -1
        for g in range(min(h, G)):
            v2 = tg[g] + _knap(cap[s, :, g + 1, q], lam, N, b, counts, U[s])
            if v2 < run:
                run, gbest = v2, g
        if gbest >= 0:
            _knap(cap[s, :, gbest + 1, q], lam, N, b, counts, U[s])
            per[n] = counts
            top = max(top, gbest)
    return v, chosen, per, top


def lagrange_bound(prob: Problem, timer: StageTimer, M: int, stop_at: float = math.inf,
                   quick: bool = False, meter: list[int] | None = None, deep: bool = False,
                   work: float = math.inf, deadline: float = math.inf) -> float:
    """The bound of the module doc for plans at M of a model of identical blocks (inf if
    no split can take the micro-batch). ``stop_at``: return as soon as the bound reaches it;
    ``quick``: only the scan along the first direction (a pruning test, not the best bound);
    ``meter``: its work is added to meter[0] (unit times tabled, knapsacks priced), a count
    the caller can charge to a work budget; ``deep``: memory told apart at every depth
    where it changes (``depths_needed``, up to DEPTHS rows: a stronger bound for models
    that fill the devices, at a higher cost), else at the first QUICK_DEPTHS; ``work``:
    the ascents stop once meter[0] has grown by this much (the bound so far holds: every
    interval's value is a bound at every step); ``deadline``: a ``time.perf_counter()``
    value at which they stop too (the caller's last resort)."""
    meter = meter if meter is not None else [0]
    limit = (meter[0] + work, deadline)
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
    S = cap.shape[0]
    dual = Dual(cap, tg, N, b, K, M, of, np.full(S, np.inf), meter, limit)
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
    dual.fold(direction * 0.0)  # the partition bound (allocator.bounds), with in-flight memory
    # lam . N of the objective's order: from 4x the incumbent (or 16x the partition bound) down
    scale = 4 * stop_at if math.isfinite(stop_at) else 16 * max(dual.low, lo)
    flat = 0
    for q in range(SCAN):
        before = dual.low
        dual.fold(direction * scale * 0.5 ** q)
        if dual.low >= stop_at:
            return dual.low
        flat = flat + 1 if dual.low <= before else 0
        if quick and flat >= QUICK_FLAT:  # (past its peak: each smaller scale's bound lower still)
            break
    if quick:
        return dual.low
    dual.ascend(stop_at, direction * scale, Cuts(N, scale))
    if not deep or dual.low >= stop_at or not math.isfinite(stop_at) or not math.isfinite(dual.low):
        return dual.low
    # The largest tail sigma (gradient all-reduce and optimizer step) is part of the
    # objective (allocator.problem.stage_tail), not of the bound above. Plans whose sigma
    # is at least sig = stop_at - low are bounded by low + sig = stop_at. Below, sigma is
    # cut at TAIL_LEVELS levels s_1 < ... < s_m = sig, each twice the one before: a plan
    # with sigma in [s_k, s_k+1) has every stage's tail below s_k+1, which caps each
    # stage's units (``tail_units``): it costs at least s_k plus the bound with those caps
    # (s_0 = 0).
    sig = stop_at - dual.low
    levels = [sig * 0.5 ** (TAIL_LEVELS - 1 - k) for k in range(TAIL_LEVELS)]
    bound = stop_at
    for k, top in enumerate(levels):
        U = tail_units(prob, top, budget)
        capped = dual.capped(U)
        floor = levels[k - 1] if k else 0.0
        if not np.isinf(U).all():
            capped.ascend(bound - floor, direction * scale, Cuts(N, scale))  # (no piece need pass the lowest)
        bound = min(bound, floor + capped.low)
    return max(dual.low, bound)


def tail_units(prob: Problem, sig: float, budget: list[int]) -> np.ndarray:
    """U[s]: the most units (real) a stage of spec s (``stage_specs``) may have for its
    tail (allocator.problem.stage_tail) to be at most sig, by a lower bound on that tail
    over the classes and links it could use: its gradient all-reduce (hetalloc.costs, the
    same formulas) at the fastest link and least latency any stage of that many units has
    (a node's own link only within one node), plus the least optimizer step of any class
    (its shard at the most units, with zero1); -1 where no stage of the spec is that
    fast, inf where any number is."""
    classes = [c for c in prob.classes if budget[c.index] > 0]
    used = {c.group for c in classes}
    inter = [(prob.groups[g].inter_bw, prob.groups[g].inter_lat) for g in used]
    links = [(max(x[0] for x in inter), min(x[1] for x in inter), math.inf)]
    links += [(prob.groups[g].intra_bw, prob.groups[g].intra_lat,
               float(sum(budget[c.index] for c in classes if c.group == g))) for g in used if prob.groups[g].single_node]
    most = float(sum(budget))
    slices = max(c.tp for c in classes)
    out = np.empty(len(stage_specs(prob)))
    for s, (kind, l) in enumerate(stage_specs(prob)):
        i, j = block_range(prob, kind, l)
        room = sig - min(prob.opt_time(c, i, j, int(most)) for c in classes)
        if room < 0:
            out[s] = -1.0
            continue
        nbytes = prob.grad_bytes(i, j, slices)
        n = max(min(units, _most_units(nbytes, room, bw, lat, most, prob.zero1)) for bw, lat, units in links)
        out[s] = n if n < most else np.inf
    return out


def _most_units(nbytes: float, room: float, bw: float, lat: float, most: float, zero1: bool) -> float:
    """The most (real) n in [1, most] whose gradient all-reduce among n units
    (hetalloc.costs.ring_allreduce_time, as zero1's halves where it applies: increasing in
    n) takes at most room, by bisection; rounded up (a cap: above is safe); most if every
    n up to it does."""
    def time_of(n: float) -> float:
        ar = ring_allreduce_time(nbytes, n, bw, lat)
        return sum(zero1_halves(ar)) if zero1 else ar
    if time_of(most) <= room:
        return most
    lo, hi = 1.0, most  # time_of(lo) = 0 <= room < time_of(hi)
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if time_of(mid) <= room:
            lo = mid
        else:
            hi = mid
    return hi


class Dual:
    """The bound of every tau interval of one table (``_pass``), the best over the
    multipliers tried, and the ascent that raises the lowest ones. U[s]: most units of
    spec s (``tail_units``; inf: any)."""

    def __init__(self, cap, tg, N, b, K, M, of, U, meter, limit=(math.inf, math.inf)):
        self.cap, self.tg, self.N, self.b, self.K, self.M, self.of, self.U = cap, tg, N, b, K, M, of, U
        self.weight = SPLIT_WEIGHT * (TAIL_WEIGHT if np.isfinite(U).any() else 1)
        """Counted work per knapsack (SPLIT_WEIGHT)."""
        self.meter, self.limit = meter, limit
        """(work, deadline): its ascents stop when meter[0] reaches the work or the clock the
        deadline."""
        n = tg.shape[0]
        self.best = np.full(n + 1, -np.inf)
        self.best[0] = np.inf
        self.arg: list = [None] * (n + 1)

    def capped(self, U: np.ndarray) -> "Dual":
        """The same table with the units capped by U, starting from this one's bounds (caps
        only raise an interval's bound)."""
        out = Dual(self.cap, self.tg, self.N, self.b, self.K, self.M, self.of, U, self.meter, self.limit)
        out.best, out.arg = self.best.copy(), list(self.arg)
        return out

    def spent(self) -> bool:
        return self.meter[0] >= self.limit[0] or time.perf_counter() > self.limit[1]

    @property
    def low(self) -> float:
        return float(self.best.min())

    def fold(self, lam: np.ndarray) -> None:
        cap = self.cap
        self.meter[0] += self.weight * cap.shape[0] * cap.shape[2] * cap.shape[3]  # knapsacks priced per pass
        vals, _ = _pass(cap, self.tg, lam, self.N, self.b, self.K, self.M, self.of, self.U)
        better = vals > self.best
        self.best[better] = vals[better]
        for h in np.nonzero(better)[0]:
            self.arg[h] = lam

    def ascend(self, stop_at: float, start: np.ndarray, cuts: "Cuts") -> None:
        """Raise the lowest bounds: a branch and bound over blocks of tau intervals. A block
        [h1, h2] is bounded by the loosest cap of its last interval and the least tau of
        its first (valid for each of its intervals); its multipliers by cutting planes
        (Kelley: each split found is a linear function of lam that bounds the block's dual
        from above; the master LP's maximiser is the next lam) until its dual is reached
        or the bound passes stop_at. A block left below stop_at is halved; lowest block
        first, until the lowest is a single interval at its dual (the bound stands) or
        every block reaches stop_at. The splits found are kept as cuts (a split within a
        cap is one of every looser cap)."""
        best, arg = self.best, self.arg
        G = self.tg.shape[0]
        heap = [(self.low, 1, G, False)]
        for _ in range(BLOCKS):
            if not heap or self.spent():
                return
            v, h1, h2, final = heapq.heappop(heap)
            v = max(v, float(best[h1:h2 + 1].min()))
            if v >= stop_at or not math.isfinite(v):
                return
            if final:
                return  # the lowest block is an interval at its dual: the bound stands
            if h1 < h2 and v > float(best[h1:h2 + 1].min()) - 1e-15 and heap and v > heap[0][0]:
                heapq.heappush(heap, (v, h1, h2, False))
                continue
            lam0 = arg[h1] if arg[h1] is not None else start
            val, lam, reached = self._kelley(h1, h2, lam0, stop_at, cuts)
            seg = best[h1:h2 + 1]
            np.maximum(seg, val, out=seg)
            if lam is not None:
                self.fold(lam)
            v = max(val, float(best[h1:h2 + 1].min()))
            if v >= stop_at:
                continue
            if h1 == h2:
                heapq.heappush(heap, (v, h1, h2, reached))
            else:
                mid = (h1 + h2) // 2
                heapq.heappush(heap, (max(val, float(best[h1:mid + 1].min())), h1, mid, False))
                heapq.heappush(heap, (max(val, float(best[mid + 1:h2 + 1].min())), mid + 1, h2, False))

    def _kelley(self, h1: int, h2: int, lam: np.ndarray, stop_at: float, cuts: "Cuts"):
        """(the block's best bound, its multipliers (None if no split), its dual reached?)"""
        cap, tg, N, M = self.cap, self.tg, self.N, self.M
        floor = (M - 1) * tg[h1 - 1]
        top, at = -math.inf, None
        for _ in range(ITERATIONS):
            if self.spent():
                break
            self.meter[0] += self.weight * cap.shape[0] * min(h2, cap.shape[2]) * cap.shape[3]
            v, _, per, g = _used(cap, tg, lam, N, self.b, self.K, h2, self.of, self.U)
            if not math.isfinite(v):  # (no split within the block's cap, at any lam: no plan)
                return math.inf, at, True
            n = per.sum(axis=0)
            cuts.add(v - float(lam @ n), n, g + 1)
            val = max(v + floor - float(lam @ N), M * tg[h1 - 1])
            if val > top:
                top, at = val, lam
            if top >= stop_at:
                return top, at, False
            nxt, up = cuts.master(h2)
            if nxt is None:
                return top, at, False
            if up + floor <= top + 1e-9 * abs(top):
                return top, at, True
            lam = nxt
        return top, at, False


class Cuts:
    """The splits found, as the linear functions cost + lam . n of the multipliers (their
    sum of prices less lam . n), each valid from the interval its slowest stage needs; the
    master program: the largest min over the valid ones less lam . N, lam in a box."""

    def __init__(self, N: np.ndarray, scale: float):
        self.N = N
        self.cost: list[float] = []
        self.h: list[int] = []
        self.hs = None
        try:
            from .milp import _new_highs
            self.hs = _new_highs(False)
        except ImportError:  # (no solver: the bound stands without the ascent)
            return
        import highspy
        self.inf = highspy.kHighsInf
        C = len(N)
        for c in range(C):  # box: lam_c N_c at most 4x the scale
            self.hs.addVar(0.0, 4 * scale / max(1.0, float(N[c])))
        self.hs.addVar(-self.inf, self.inf)
        self.hs.changeColsCost(C + 1, np.arange(C + 1, dtype=np.int32), np.concatenate([N, [-1.0]]))
        self.idx = np.arange(C + 1, dtype=np.int32)
        self.optimal = highspy.HighsModelStatus.kOptimal

    def add(self, cost: float, n: np.ndarray, h: int) -> None:
        if self.hs is None:
            return
        self.cost.append(cost)
        self.h.append(h)
        self.hs.addRow(-self.inf, cost, len(self.idx), self.idx, np.concatenate([-n, [1.0]]))  # z - lam . n <= cost

    def master(self, h: int) -> tuple[np.ndarray | None, float]:
        """(the maximiser, the maximum) of min_p (cost_p + lam . n_p) - lam . N over the
        cuts valid at interval h; (None, inf) without any."""
        if self.hs is None:
            return None, math.inf
        on = np.array(self.h) <= h
        if not on.any():
            return None, math.inf
        upper = np.where(on, np.array(self.cost), self.inf)
        self.hs.changeRowsBounds(len(upper), np.arange(len(upper), dtype=np.int32), np.full(len(upper), -self.inf),
                                 upper)
        self.hs.run()
        if self.hs.getModelStatus() != self.optimal:
            return None, math.inf
        C = len(self.N)
        x = np.array(self.hs.getSolution().col_value[:C])
        return np.maximum(x, 0.0), -self.hs.getInfo().objective_function_value
