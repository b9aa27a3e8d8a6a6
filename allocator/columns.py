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

from .column_kernels import columns_kernel
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


def _grid(prob: Problem, timer: StageTimer, dims: tuple[int, ...], unit: int, zero1: bool) -> tuple:
    """Every count vector of the grid ``dims`` (in ``unit``s) and what the columns need of
    it: (vectors in mixed radix order, strides, devices of each, the distinct device counts
    1..b, which vectors use units of one tensor-parallel size), remembered per timer (every
    range of a build shares them)."""
    key = ("grid", dims, unit, zero1)
    hit = timer.memo.get(key)
    if hit is None:
        C = len(dims)
        grid = np.indices(dims).reshape(C, -1).T * unit  # every count vector, mixed radix order
        strides = np.array([int(np.prod(dims[c + 1:])) for c in range(C)])
        n_dev = grid.sum(axis=1)
        b = timer.b
        sizes = np.unique(n_dev[(n_dev > 0) & (n_dev <= b)]) if zero1 else np.zeros(1, dtype=np.int64)
        if zero1:  # a zero1 stage's units have one tensor-parallel size
            tps = np.array([prob.classes[c].tp for c in range(C)])
            sizes_used = sum((grid[:, tps == v] > 0).any(axis=1).astype(np.int64) for v in np.unique(tps))
            one_size = sizes_used <= 1
        else:
            one_size = np.ones(len(grid), dtype=bool)
        hit = timer.memo[key] = (grid, strides, n_dev, sizes, one_size)
    return hit


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


def prefetch(prob: Problem, timer: StageTimer, M: int, R: int, ranges: list[tuple[int, int]],
             budget: list[int]) -> None:
    """Tabulate at once, for every class and recomputation choice, what a build of these
    ranges will ask of each range: its share times (RangeTimes: up to the class's memory
    cap at the first tier) and its memory caps at every depth and unit count
    (``_memory_caps``)."""
    gpipe = prob.schedule == "gpipe"
    infl = M if gpipe else 1
    dp = prob.most_units(budget, R) if prob.zero1 else 1
    depths = 1 if gpipe else min(M - 1, prob.L - 1) + 1
    units = min(timer.b, sum(min(n, timer.b) for n in budget)) if prob.zero1 else 1
    fits = len(ranges) * depths * units <= PREFETCH_CELLS
    for rc in prob.recompute_options:
        for c in prob.classes:
            if budget[c.index] >= 1:
                kmax = [min(timer.b, prob.kmem(c, i, j, infl, rc, dp)) for i, j in ranges]
                timer.fetch_shares(c, ranges, kmax, rc)
                if fits and units >= 1:
                    caps = prob.kmem_grid(c, ranges, _in_flight(prob, M, depths), R * np.arange(1, units + 1), rc)
                    for s, (i, j) in enumerate(ranges):
                        timer.memo[("kmem", c.index, i, j, rc, M, R)] = caps[s]


PREFETCH_CELLS = 1_000_000
"""Most ranges x depths x unit counts whose memory caps ``prefetch`` tabulates at once."""


def _in_flight(prob: Problem, M: int, depths: int) -> np.ndarray:
    """Micro-batches in flight at depth a = 0, 1, .. (a stages after it) of an M-micro-batch
    pipeline."""
    return np.full(depths, M) if prob.schedule == "gpipe" else np.minimum(M, 1 + np.arange(depths))


def _memory_caps(prob: Problem, timer: StageTimer, ci: int, i: int, j: int, rc: str, M: int, R: int, depths: int,
                 sizes: np.ndarray | None) -> np.ndarray:
    """Class ci's largest share on range [i, j) at each depth (axis 0) and, under zero1, at
    each unit count in ``sizes`` (axis 1; one column without zero1): ``prefetch``'s table
    or, where it has none, computed here."""
    hit = timer.memo.get(("kmem", ci, i, j, rc, M, R))
    if hit is not None and len(hit) >= depths and (sizes is None or hit.shape[1] >= sizes[-1]):
        return hit[:depths] if sizes is None else hit[:depths, sizes - 1]
    dps = np.ones(1, dtype=np.int64) if sizes is None else R * sizes
    return prob.kmem_grid(prob.classes[ci], [(i, j)], _in_flight(prob, M, depths), dps, rc)[0]


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
    grid, strides, n_dev, sizes, one_size = _grid(prob, timer, tuple(dims), unit, zero1)
    # Memory caps per depth. 1F1B: deeper in the pipeline more micro-batches are in flight,
    # so memory may cap the shares and the time may grow (caps only fall with depth).
    # zero1: the caps also depend on how many units hold the stage (n per replica: R n
    # shard the optimizer state; caps only grow with n). A tier is a depth at which some
    # cap falls; a tier's caps are steps over the sorted unit counts (one step without
    # zero1): the grid's vectors whose unit count is in [bounds[s], bounds[s + 1]) take
    # step s's caps.
    if zero1 and not len(sizes):
        return ColArrays.empty(C)
    cis = sorted(rt.ts)
    D = 1 if gpipe or j == L else min(M - 1, L - j) + 1
    caps = np.stack([np.clip(_memory_caps(prob, timer, ci, i, j, rc, M, R, D, sizes if zero1 else None), 0,
                             len(rt.ts[ci])) for ci in cis], axis=-1)  # (depth, unit count, class)
    tier_depth = np.concatenate([[0], np.nonzero((caps[1:] != caps[:-1]).any(axis=(1, 2)))[0] + 1])
    starts = [np.concatenate([[0], np.nonzero((caps[a, 1:] != caps[a, :-1]).any(axis=1))[0] + 1]) for a in tier_depth]
    n_steps = max(len(st) for st in starts)
    caps_arr = np.zeros((len(tier_depth), n_steps, C), dtype=np.int64)
    bounds = np.full((len(tier_depth), n_steps + 1), -1, dtype=np.int64)
    for q, (a, st) in enumerate(zip(tier_depth, starts)):
        caps_arr[q, :len(st)][:, cis] = caps[a, st]
        if zero1:
            bounds[q, :len(st)] = sizes[st]
            bounds[q, len(st)] = sizes[-1] + 1
        else:
            bounds[q, 1] = b + 1
    tier_of = np.searchsorted(tier_depth, np.arange(D), side="right") - 1  # each depth's tier
    ts = np.full((C, int(caps.max(initial=0)) or 1), np.inf)  # the shares' times, one row per class
    for ci in cis:
        ts[ci, :min(ts.shape[1], len(rt.ts[ci]))] = rt.ts[ci][:ts.shape[1]]
    rows, t_col, amax = columns_kernel(ts, caps_arr, bounds, grid, strides, n_dev, one_size, b, t_cap, tier_of, L)
    if not len(rows):
        return ColArrays.empty(C)
    V = grid[rows]
    # the tail depends only on which classes are used and how many devices in all
    used = V > 0
    n = V.sum(axis=1)
    key = (used.astype(np.int64) @ (1 << np.arange(C, dtype=np.int64))) * (int(n.max()) + 1) + n
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    tail_of = np.array([stage_tail(prob, R, i, j, tuple(v)) for v in V[first].tolist()])
    return ColArrays(V, t_col, tail_of[inv.reshape(-1)], amax)


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
