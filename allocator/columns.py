"""Stage columns: every (layer range, device counts) a stage can be, with its exact costs.

A column fixes a stage completely: its range [i, j), how many devices of each class serve
it per replica, its time t (the exact min-max integer split of the micro-batch, found as
the smallest device time at which the devices' capacity reaches b), its tail (gradient
all-reduce of its group plus the slowest optimizer step, allocator.problem.stage_tail),
and how deep in a 1F1B pipeline it may sit (``amax``: most stages after it whose
in-flight activations still fit at time t).

Only useful columns are generated: a column must run within the time cap (no stage of
a plan that beats the incumbent is slower than T / M), and every device in it must
matter — removing any one of them must make the stage slower (or infeasible); a column
with an idle-able device is dominated (same time, more devices, larger all-reduce).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .problem import Problem, StageTimer, least_time, stage_tail


@dataclass(frozen=True, slots=True)
class Column:
    i: int
    j: int
    counts: tuple[int, ...]
    t: float
    tail: float
    amax: int
    """Most stages that may follow (memory); >= L means unlimited."""
    recompute: str = "none"


@dataclass(frozen=True, slots=True)
class ColArrays:
    """The columns of one range and recomputation choice as arrays (one row each, in
    Column order: vector by vector, shallow to deep)."""

    counts: np.ndarray
    """(columns, classes) device counts."""
    t: np.ndarray
    tail: np.ndarray
    amax: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def take(self, rows) -> "ColArrays":
        return ColArrays(self.counts[rows], self.t[rows], self.tail[rows], self.amax[rows])

    @staticmethod
    def empty(C: int) -> "ColArrays":
        return ColArrays(np.zeros((0, C), dtype=np.int64), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))

    def columns(self, i: int, j: int, rc: str) -> list[Column]:
        return [Column(i, j, tuple(c), t, tl, a, rc) for c, t, tl, a in
                zip(self.counts.tolist(), self.t.tolist(), self.tail.tolist(), self.amax.tolist())]


class RangeTimes:
    """Per class: device times f_c(r, k) for k = 1..cap (cap from memory at in-flight q)."""

    def __init__(self, prob: Problem, timer: StageTimer, i: int, j: int, t_cap: float, budget: list[int],
                 in_flight: int, recompute: str = "none", dp: int = 1):
        self.prob, self.i, self.j, self.b = prob, i, j, timer.b
        self.ts: dict[int, list[float]] = {}
        for c in prob.classes:
            if budget[c.index] < 1:
                continue
            km = min(self.b, prob.kmem(c, i, j, in_flight, recompute, dp))
            if km < 1:
                continue
            t = timer.share_times(c, i, j, km, recompute)
            over = t > t_cap
            ts = (t[:int(np.argmax(over))] if over.any() else t).tolist()  # up to the first beyond the cap
            if ts:
                self.ts[c.index] = ts


def _stage_times(ts: dict[int, list[float]], caps: dict[int, int], V: np.ndarray, b: int) -> np.ndarray:
    """Stage time of every count vector (rows of V; columns = classes): the smallest device
    time at which the devices can take b samples, each device at least one (inf if never)."""
    C = V.shape[1]
    lists = {ci: ts[ci][:caps.get(ci, len(ts[ci]))] for ci in ts}
    levels = np.array(sorted({t for l in lists.values() for t in l}))
    if not len(levels):
        return np.full(len(V), np.inf)
    K = np.zeros((len(levels), C))
    first = np.full(C, np.inf)
    for ci, l in lists.items():
        if l:
            K[:, ci] = np.searchsorted(np.array(l), levels * (1 + 1e-12), side="right")
            first[ci] = l[0]
    out = np.full(len(V), np.inf)
    # only vectors that can take b samples at the top level have a time at all
    live = np.nonzero((V @ K[-1] >= b) & (V.sum(axis=1) <= b))[0]
    if not len(live):
        return out
    W = V[live].astype(np.float64)
    used = W > 0
    floor = np.where(used, first[None, :], 0.0).max(axis=1)  # every device takes one sample
    if len(W) * len(levels) <= DENSE_CELLS:  # the first level at or above the floor that reaches b
        ok = (W @ K.T >= b) & (levels[None, :] >= floor[:, None])
        idx = ok.argmax(axis=1)
        out[live] = np.where(ok.any(axis=1), levels[idx], np.inf)
        return out
    # (many vectors and levels: capacity grows with the level, so a bisection per vector,
    # all vectors at once, finds it without the vectors x levels matrix)
    lo = np.searchsorted(levels, floor, side="left")
    hi = np.full(len(W), len(levels) - 1)
    while True:
        open_ = lo < hi
        if not open_.any():
            break
        mid = (lo + hi) // 2
        ok = (W * K[mid]).sum(axis=1) >= b
        hi = np.where(open_ & ok, mid, hi)
        lo = np.where(open_ & ~ok, mid + 1, lo)
    out[live] = np.where(lo < len(levels), levels[np.minimum(lo, len(levels) - 1)], np.inf)
    return out


def _grid(prob: Problem, timer: StageTimer, dims: tuple[int, ...], unit: int, zero1: bool) -> tuple:
    """Every count vector of the grid ``dims`` (in ``unit``s) and what the columns need of
    it: (vectors in mixed radix order, strides, devices of each, the distinct device counts
    1..b, the vectors ordered by device count and those counts, which vectors use units of
    one tensor-parallel size), remembered per timer (every range of a build shares them)."""
    key = ("grid", dims, unit, zero1)
    hit = timer.memo.get(key)
    if hit is None:
        C = len(dims)
        grid = np.indices(dims).reshape(C, -1).T * unit  # every count vector, mixed radix order
        strides = np.array([int(np.prod(dims[c + 1:])) for c in range(C)])
        n_dev = grid.sum(axis=1)
        b = timer.b
        sizes = np.unique(n_dev[(n_dev > 0) & (n_dev <= b)]) if zero1 else np.zeros(1, dtype=np.int64)
        by_n = np.argsort(n_dev, kind="stable") if zero1 else None
        sorted_n = n_dev[by_n] if zero1 else None
        if zero1:  # a zero1 stage's units have one tensor-parallel size
            tps = np.array([prob.classes[c].tp for c in range(C)])
            sizes_used = sum((grid[:, tps == v] > 0).any(axis=1).astype(np.int64) for v in np.unique(tps))
            one_size = sizes_used <= 1
        else:
            one_size = np.ones(len(grid), dtype=bool)
        hit = timer.memo[key] = (grid, strides, n_dev, sizes, by_n, sorted_n, one_size)
    return hit


def _steps(f, lo: int, hi: int) -> list:
    """f over the integers lo..hi as its steps [(first index, value), ...], for an f whose
    every component is monotone (so equal values at two indices hold between them)."""
    changes: dict[int, object] = {}

    def rec(a: int, fa, b: int, fb) -> None:
        if fa == fb:
            return
        if b == a + 1:
            changes[b] = fb
            return
        m = (a + b) // 2
        fm = f(m)
        rec(a, fa, m, fm)
        rec(m, fm, b, fb)

    first = f(lo)
    if hi > lo:
        rec(lo, first, hi, f(hi))
    return [(lo, first)] + sorted(changes.items())


DENSE_CELLS = 1_000_000
"""Largest vectors x levels matrix _stage_times forms (beyond: a bisection per vector)."""


def range_arrays(prob: Problem, timer: StageTimer, R: int, M: int, i: int, j: int, t_cap: float,
                 budget: list[int], unit: int = 1, memo: "ColumnMemo | None" = None) -> list[tuple[str, ColArrays]]:
    """The useful columns of range [i, j) for one of R replicas, per recomputation choice
    that can help (Problem.recompute_helps), as arrays; with ``unit`` > 1 only device
    counts that are multiples of it (a coarser plan space, for plans only). ``memo``:
    columns already built for this range under a larger time cap (ColumnMemo)."""
    deepest = M if prob.schedule == "gpipe" else min(M, 1 + prob.L - j)
    out: list[tuple[str, ColArrays]] = []
    for rc in prob.recompute_options:  # (zero1: one unit in each replica shards the least)
        if rc == "full" and "none" in prob.recompute_options and \
                not prob.recompute_helps(budget, i, j, timer.b, deepest, R):
            continue
        key = (M, timer.b, R, unit, i, j, rc)
        cols = memo.get(key, t_cap) if memo is not None else None
        if cols is None:
            cols = _range_columns(prob, timer, R, M, i, j, t_cap, budget, unit, rc)
            if memo is not None:
                memo.put(key, t_cap, cols)
        if rc == "full" and out and len(cols) and len(out[0][1]):
            cols = cols.take(~_dominated(out[0][1], cols))
        out.append((rc, cols))
    return out


def _dominated(plain: ColArrays, full: ColArrays) -> np.ndarray:
    """Which recomputing columns are no faster nor deeper than a plain one of their counts
    (dominated: the same devices, a longer backward)."""
    both = np.concatenate([plain.counts, full.counts])
    _, keys = np.unique(both, axis=0, return_inverse=True)
    keys = keys.reshape(-1)
    _, tr = np.unique(np.concatenate([plain.t, full.t]), return_inverse=True)
    tr = tr.reshape(-1)
    n = len(plain)
    width = int(tr.max()) + 1
    pk, fk = keys[:n], keys[n:]
    comp = pk.astype(np.int64) * width + tr[:n]  # (counts, time) as one ordered integer
    order = np.argsort(comp, kind="stable")
    comp_s, key_s, amax_s = comp[order], pk[order], plain.amax[order].astype(np.int64)
    # the deepest plain column of the same counts at each time or below (a running
    # maximum that restarts with each counts group: groups are offset by the depth range)
    group = np.cumsum(np.concatenate([[0], key_s[1:] != key_s[:-1]]))
    span = int(max(amax_s.max(), full.amax.max())) + 2
    cm = np.maximum.accumulate(group * span + amax_s) - group * span
    pos = np.searchsorted(comp_s, fk.astype(np.int64) * width + tr[n:], side="right") - 1
    ok = pos >= 0
    pos = np.maximum(pos, 0)
    return ok & (key_s[pos] == fk) & (cm[pos] >= full.amax)


def range_columns(prob: Problem, timer: StageTimer, R: int, M: int, i: int, j: int, t_cap: float,
                  budget: list[int], unit: int = 1, memo: "ColumnMemo | None" = None) -> list[Column]:
    """``range_arrays`` as Column objects."""
    return [c for rc, arrs in range_arrays(prob, timer, R, M, i, j, t_cap, budget, unit, memo)
            for c in arrs.columns(i, j, rc)]


class ColumnMemo:
    """Columns built for one cost model (plan spaces that differ only in which
    recomputation choices they offer: allocator.search's first pass and the space it was
    cut from), per (M, b, R, unit, range, recomputation choice), with the time cap they
    were built under. A smaller cap's columns are the larger cap's whose time is within
    it, in the same order: a vector's stage time and usefulness do not depend on the cap
    where its time is within both (share times are cut at the cap, and only times above
    it change), and its columns end at the same depths (times only grow with depth)."""

    def __init__(self):
        self.cols: dict[tuple, tuple[float, ColArrays]] = {}

    def get(self, key: tuple, t_cap: float) -> ColArrays | None:
        hit = self.cols.get(key)
        if hit is None or t_cap > hit[0]:
            return None
        return hit[1] if t_cap == hit[0] else hit[1].take(hit[1].t <= t_cap)

    def put(self, key: tuple, t_cap: float, cols: ColArrays) -> None:
        self.cols[key] = (t_cap, cols)


def _range_columns(prob: Problem, timer: StageTimer, R: int, M: int, i: int, j: int, t_cap: float,
                   budget: list[int], unit: int, rc: str) -> ColArrays:
    gpipe = prob.schedule == "gpipe"
    zero1 = prob.zero1
    b, L, C = timer.b, prob.L, len(budget)
    rt = RangeTimes(prob, timer, i, j, t_cap, budget, M if gpipe else 1, rc,
                    prob.most_units(budget, R) if zero1 else 1)
    if not rt.ts:
        return ColArrays.empty(C)
    dims = [min(budget[c], b) // unit + 1 if c in rt.ts else 1 for c in range(C)]
    grid, strides, n_dev, sizes, by_n, sorted_n, one_size = _grid(prob, timer, tuple(dims), unit, zero1)
    # Memory caps per depth. 1F1B: deeper in the pipeline more micro-batches are in flight,
    # so memory may cap the shares and the time may grow (caps only fall with depth).
    # zero1: the caps also depend on how many units hold the stage (n per replica: R n
    # shard the optimizer state; caps only grow with n). Both are step functions, found
    # by bisection (``_steps``): a tier is a depth at which some cap falls; a tier's caps
    # are steps over the sorted unit counts (one step, index 0, without zero1).
    cis = sorted(rt.ts)
    fullc = [len(rt.ts[ci]) for ci in cis]

    def one(infl: int, n: int) -> tuple:
        dp = R * max(1, int(n))
        return tuple(max(0, min(f, prob.kmem(prob.classes[ci], i, j, infl, rc, dp))) for ci, f in zip(cis, fullc))

    def caps_at(infl: int) -> list:
        if not zero1:  # (at the first tier these are fullc: RangeTimes capped the times there)
            return [(0, one(infl, 0))]
        return _steps(lambda k: one(infl, sizes[k]), 0, len(sizes) - 1) if len(sizes) else []

    if gpipe or j == L:
        tiers = [(0, caps_at(M if gpipe else 1))]
    else:
        tiers = _steps(lambda a: caps_at(min(M, 1 + a)), 0, min(M - 1, L - j))
    tier_depth = [a for a, _ in tiers]
    tier_caps = [c for _, c in tiers]

    def times(caps: list) -> np.ndarray:
        if not zero1:
            return _stage_times(rt.ts, dict(zip(cis, caps[0][1])), grid, b)
        out = np.full(len(grid), np.inf)
        for q, (k0, cap) in enumerate(caps):  # the rows whose unit count falls in this step
            n_next = sizes[caps[q + 1][0]] if q + 1 < len(caps) else sizes[-1] + 1
            rows = by_n[np.searchsorted(sorted_n, sizes[k0]):np.searchsorted(sorted_n, n_next)]
            if len(rows):
                out[rows] = _stage_times(rt.ts, dict(zip(cis, cap)), grid[rows], b)
        return out

    # A vector is useful if at some tier it runs within the cap and every device matters
    # there (one device fewer of any used class is slower or cannot take the micro-batch);
    # at other tiers another vector with fewer devices does at least as well.
    keep = np.zeros(len(grid), dtype=bool)
    tier_times = []
    for caps in tier_caps:
        t_all = times(caps)
        ok = np.isfinite(t_all) & (t_all <= t_cap) & one_size
        for c in range(C):
            has = grid[:, c] > 0
            fewer = np.where(has, np.arange(len(grid)) - strides[c], 0)
            ok &= ~(has & (n_dev > 1) & (t_all[fewer] <= t_all))
        keep |= ok
        tier_times.append(t_all)
    rows = np.nonzero(keep)[0]
    if not len(rows):
        return ColArrays.empty(C)
    V = grid[rows]
    t0 = tier_times[0][rows]
    # per depth a = 0, 1, ..: the times (a depth without a tier of its own keeps the caps
    # of the one before)
    T = [t0]
    if not gpipe and j < L:
        k_tier = 0
        for a in range(1, min(M - 1, L - j) + 1):
            if k_tier + 1 < len(tier_depth) and tier_depth[k_tier + 1] == a:
                k_tier += 1
                T.append(tier_times[k_tier][rows])
            else:
                T.append(T[-1])
    T = np.stack(T, axis=1)
    # A vector's columns: one per depth range of equal time, each as deep as that time
    # holds (amax); it ends where the time no longer fits (no further column) or at the
    # last depth (a column of any depth, amax = L).
    later, now = T[:, 1:], T[:, :-1]
    over = ~np.isfinite(later) | (later > t_cap)
    past = (np.cumsum(over, axis=1) - over) > 0  # beyond the first depth that does not fit
    r, a = np.nonzero(((later > now) | over) & ~past)
    ends = np.nonzero(~over.any(axis=1))[0]
    r = np.concatenate([r, ends])
    amax = np.concatenate([a, np.full(len(ends), L)])
    t_col = np.concatenate([now[r[:len(a)], a] if len(a) else np.zeros(0), T[ends, -1]])
    order = np.lexsort((amax, r))  # vector by vector, shallow to deep
    # the tail depends only on which classes are used and how many devices in all
    used = V > 0
    key = (used.astype(np.int64) @ (1 << np.arange(C, dtype=np.int64))) * (int(V.sum(axis=1).max()) + 1) + V.sum(axis=1)
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    tail_of = np.array([stage_tail(prob, R, i, j, tuple(v)) for v in V[first].tolist()])
    rows = r[order]
    return ColArrays(V[rows], t_col[order], tail_of[inv.reshape(-1)[rows]], amax[order].astype(np.int64))


def count_columns_estimate(prob: Problem, R: int, b: int) -> int:
    """Upper estimate of count vectors per range (before pruning)."""
    budget = [c.count // R for c in prob.classes]
    est = 1
    for n in budget:
        est *= min(n, b) + 1
    return est


def enumerate_columns(prob: Problem, timer: StageTimer, R: int, M: int, t_cap: float,
                      max_columns: int = 60000) -> list[Column] | None:
    """All useful columns, or None if there would be more than max_columns."""
    budget = [c.count // R for c in prob.classes]
    L = prob.L
    cols: list[Column] = []
    per_range = count_columns_estimate(prob, R, timer.b)
    if per_range > max(8, max_columns // 8):
        return None
    for i in range(L):
        for j in range(i + 1, L + 1):
            cols.extend(range_columns(prob, timer, R, M, i, j, t_cap, budget))
            if len(cols) > max_columns:
                return None
    return cols


def full_budget_times(prob: Problem, timer: StageTimer, M: int, t_cap: float) -> dict[tuple[int, int], float]:
    """For every range, its time if the whole budget served it (a lower bound on any
    column's time; the "at least one sample per device" rule is dropped), the least over
    the recomputation choices."""
    budget = [c.count for c in prob.classes]
    out = {}
    for i in range(prob.L):
        for j in range(i + 1, prob.L + 1):
            t = whole_budget_time(prob, timer, M, i, j, t_cap, budget)
            if math.isfinite(t):
                out[(i, j)] = t
    return out


def whole_budget_time(prob: Problem, timer: StageTimer, M: int, i: int, j: int, t_cap: float,
                      budget: list[int]) -> float:
    """Least time of range [i, j) served by the whole budget, over its recomputation
    choices (inf if none can take the micro-batch): the smallest device time at which the
    devices' shares reach b. Found by binary searches over the shares (times grow with
    the share), so a micro-batch of millions costs a few hundred time evaluations."""
    gpipe = prob.schedule == "gpipe"
    infl = M if gpipe else 1
    b = timer.b
    best = math.inf
    for rc in prob.recompute_options:
        dp = prob.most_units(budget) if prob.zero1 else 1
        caps = {}
        for c in prob.classes:
            if budget[c.index] > 0:
                km = min(b, prob.kmem(c, i, j, infl, rc, dp))
                if km >= 1:
                    caps[c.index] = km

        if caps and max(caps.values()) <= VECTOR_SHARES:
            t = _least_time_tabled({ci: timer.share_times(prob.classes[ci], i, j, cap, rc) for ci, cap in caps.items()},
                                   budget, b, min(t_cap, best))
        else:
            def time_of(ci: int, k: int, rc: str = rc) -> float:
                return timer.time(prob.classes[ci], i, j, k, rc)

            t = least_time(time_of, {ci: (1, cap, budget[ci]) for ci, cap in caps.items()}, b, min(t_cap, best))
        best = min(best, t)
    return best


def whole_budget_times(prob: Problem, timer: StageTimer, M: int, ranges: list[tuple[int, int]],
                       budget: list[int]) -> np.ndarray:
    """``whole_budget_time`` of many ranges at once (no time cap): per recomputation
    choice, every class's share times of every range as one matrix, and per range the
    least time at which the shares running within it reach b (the entries sorted, their
    class budgets summed up to each). Ranges with shares beyond VECTOR_SHARES are left to
    ``whole_budget_time``."""
    I = np.array([i for i, _ in ranges], dtype=np.int64)
    J = np.array([j for _, j in ranges], dtype=np.int64)
    S, b = len(ranges), timer.b
    infl = M if prob.schedule == "gpipe" else 1
    best = np.full(S, np.inf)
    for rc in prob.recompute_options:
        dp = prob.most_units(budget) if prob.zero1 else 1
        kms = {c.index: np.array([min(b, prob.kmem(c, i, j, infl, rc, dp)) for i, j in ranges], dtype=np.int64)
               for c in prob.classes if budget[c.index] > 0}
        kms = {ci: km for ci, km in kms.items() if km.max() >= 1}
        if not kms:
            continue
        if max(int(km.max()) for km in kms.values()) > VECTOR_SHARES:
            for s, (i, j) in enumerate(ranges):
                best[s] = min(best[s], whole_budget_time(prob, timer, M, i, j, math.inf, budget))
            return best
        vals, wts = [], []
        for ci, km in kms.items():
            kmax = int(km.max())
            T = timer.share_matrix(prob.classes[ci], I, J, kmax, rc)
            ok = np.arange(1, kmax + 1)[:, None] <= km[None, :]
            vals.append(np.where(ok, T, np.inf))
            wts.append(np.where(ok, float(budget[ci]), 0.0))
        V, W = np.concatenate(vals), np.concatenate(wts)
        order = np.argsort(V, axis=0, kind="stable")
        V, W = np.take_along_axis(V, order, axis=0), np.cumsum(np.take_along_axis(W, order, axis=0), axis=0)
        reach = W >= b
        first = np.argmax(reach, axis=0)
        t = np.where(reach[-1], V[first, np.arange(S)], np.inf)
        best = np.minimum(best, t)
    return best


VECTOR_SHARES = 4096
"""Largest share whose times whole_budget_time tables at once (beyond: binary searches)."""


def _least_time_tabled(ts: dict[int, np.ndarray], budget: list[int], need: int, limit: float) -> float:
    """allocator.problem.least_time on tabled times (ts[ci][k - 1]: share k, not falling
    with k): the least time t among the entries at which the units' shares running within
    t reach ``need`` (inf if none is at most ``limit``)."""
    levels = np.unique(np.concatenate(list(ts.values())))
    cap = np.zeros(len(levels))
    for ci, t in ts.items():
        cap += budget[ci] * np.searchsorted(t, levels, side="right")
    ok = np.nonzero(cap >= need)[0]
    if not len(ok) or levels[ok[0]] > limit:
        return math.inf
    return float(levels[ok[0]])
