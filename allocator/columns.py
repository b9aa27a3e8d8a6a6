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
    W = V[live]
    cap = W @ K.T  # (vectors, levels)
    used = W > 0
    floor = np.where(used, first[None, :], 0.0).max(axis=1)  # every device takes one sample
    ok = (cap >= b) & (levels[None, :] >= floor[:, None])
    idx = ok.argmax(axis=1)
    out[live] = np.where(ok.any(axis=1), levels[idx], np.inf)
    return out


def range_columns(prob: Problem, timer: StageTimer, R: int, M: int, i: int, j: int, t_cap: float,
                  budget: list[int], unit: int = 1) -> list[Column]:
    """The useful columns of range [i, j) for one of R replicas, with each recomputation
    choice that can help (Problem.recompute_helps); with ``unit`` > 1 only device counts
    that are multiples of it (a coarser plan space, for plans only)."""
    deepest = M if prob.schedule == "gpipe" else min(M, 1 + prob.L - j)
    out: list[Column] = []
    for rc in prob.recompute_options:  # (zero1: one unit in each replica shards the least)
        if rc == "full" and "none" in prob.recompute_options and \
                not prob.recompute_helps(budget, i, j, timer.b, deepest, R):
            continue
        cols = _range_columns(prob, timer, R, M, i, j, t_cap, budget, unit, rc)
        if rc == "full" and out:  # a recomputing column no faster nor deeper than the plain one of its counts
            plain: dict[tuple[int, ...], list[Column]] = {}
            for c in out:
                plain.setdefault(c.counts, []).append(c)
            cols = [c for c in cols if not any(p.t <= c.t and p.amax >= c.amax for p in plain.get(c.counts, ()))]
        out.extend(cols)
    return out


def _range_columns(prob: Problem, timer: StageTimer, R: int, M: int, i: int, j: int, t_cap: float,
                   budget: list[int], unit: int, rc: str) -> list[Column]:
    gpipe = prob.schedule == "gpipe"
    zero1 = prob.zero1
    rt = RangeTimes(prob, timer, i, j, t_cap, budget, M if gpipe else 1, rc,
                    prob.most_units(budget, R) if zero1 else 1)
    if not rt.ts:
        return []
    b, L, C = timer.b, prob.L, len(budget)
    dims = [min(budget[c], b) // unit + 1 if c in rt.ts else 1 for c in range(C)]
    grid = np.indices(dims).reshape(C, -1).T * unit  # every count vector, mixed radix order
    strides = np.array([int(np.prod(dims[c + 1:])) for c in range(C)])
    n_dev = grid.sum(axis=1)
    # Memory caps per depth. 1F1B: deeper in the pipeline more micro-batches are in flight,
    # so memory may cap the shares and the time may grow. zero1: the caps also depend on
    # how many units hold the stage (n per replica: R n shard the optimizer state). Tiers:
    # the depths at which some cap changes; a tier's caps per n (None: any n).
    sizes = sorted({int(n) for n in n_dev if 0 < n <= b}) if zero1 else [None]

    def caps_at(infl: int, prev: dict) -> dict:
        return {n: {ci: max(0, min(prev[n][ci], prob.kmem(prob.classes[ci], i, j, infl, rc, R * (n or 1))))
                    for ci in rt.ts} for n in sizes}

    full = {n: {ci: len(rt.ts[ci]) for ci in rt.ts} for n in sizes}
    prev = caps_at(M if gpipe else 1, full) if zero1 else full
    tier_caps, tier_depth = [prev], [0]
    if not gpipe and j < L:
        # the depths at which some cap falls: caps only fall as the in-flight count grows
        # (max_share_for_memory), so equal caps at both ends of a depth interval hold
        # throughout it, and bisection finds the changes
        def scan(lo: int, c_lo: dict, hi: int, c_hi: dict) -> None:
            if c_lo == c_hi:
                return
            if hi == lo + 1:
                tier_caps.append(c_hi)
                tier_depth.append(hi)
                return
            mid = (lo + hi) // 2
            c_mid = caps_at(min(M, 1 + mid), full)
            scan(lo, c_lo, mid, c_mid)
            scan(mid, c_mid, hi, c_hi)

        A = min(M - 1, L - j)
        if A >= 1:
            scan(0, prev, A, caps_at(min(M, 1 + A), full))
    rows_of = {n: np.nonzero(n_dev == n)[0] for n in sizes} if zero1 else {}
    if zero1:  # a zero1 stage's units have one tensor-parallel size
        tps = np.array([prob.classes[c].tp for c in range(C)])
        sizes_used = sum((grid[:, tps == v] > 0).any(axis=1).astype(np.int64) for v in np.unique(tps))
        one_size = sizes_used <= 1
    else:
        one_size = np.ones(len(grid), dtype=bool)

    def times(caps: dict) -> np.ndarray:
        if not zero1:
            return _stage_times(rt.ts, caps[None], grid, b)
        out = np.full(len(grid), np.inf)
        alike: dict[tuple, list] = {}  # device counts whose caps are the same: one table
        for n, rows in rows_of.items():
            alike.setdefault(tuple(sorted(caps[n].items())), []).append(rows)
        for key, parts in alike.items():
            rows = np.concatenate(parts)
            out[rows] = _stage_times(rt.ts, dict(key), grid[rows], b)
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
        return []
    V = grid[rows]
    t0 = tier_times[0][rows]
    depth_times = []  # per depth a = 1.. : None (same caps as before) or the times
    if not gpipe and j < L:
        k_tier = 0
        for a in range(1, min(M - 1, L - j) + 1):
            if k_tier + 1 < len(tier_depth) and tier_depth[k_tier + 1] == a:
                k_tier += 1
                depth_times.append(tier_times[k_tier][rows])
            else:
                depth_times.append(None)
    out: list[Column] = []
    # the tail depends only on which classes are used and how many devices in all
    tails: dict[tuple, float] = {}
    for k, v in enumerate(V):
        counts = tuple(int(x) for x in v)
        key = (tuple(x > 0 for x in counts), sum(counts))
        if key not in tails:
            tails[key] = stage_tail(prob, R, i, j, counts)
        tail = tails[key]
        prev_t = float(t0[k])
        a = 0
        for a_, dt in enumerate(depth_times, start=1):
            ta = prev_t if dt is None else float(dt[k])
            if not math.isfinite(ta) or ta > t_cap:
                out.append(Column(i, j, counts, prev_t, tail, a_ - 1, rc))
                prev_t = None
                break
            if ta > prev_t:
                out.append(Column(i, j, counts, prev_t, tail, a_ - 1, rc))
            prev_t = ta
        if prev_t is not None:
            out.append(Column(i, j, counts, prev_t, tail, L, rc))
    return out


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
