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

import bisect
import math
from dataclasses import dataclass

from .problem import Problem, StageTimer, stage_tail


@dataclass(frozen=True, slots=True)
class Column:
    i: int
    j: int
    counts: tuple[int, ...]
    t: float
    tail: float
    amax: int
    """Most stages that may follow (memory); >= L means unlimited."""


class RangeTimes:
    """Per class: device times f_c(r, k) for k = 1..cap (cap from memory at in-flight q)."""

    def __init__(self, prob: Problem, timer: StageTimer, i: int, j: int, t_cap: float, budget: list[int],
                 in_flight: int):
        self.prob, self.i, self.j, self.b = prob, i, j, timer.b
        self.ts: dict[int, list[float]] = {}
        for c in prob.classes:
            if budget[c.index] < 1:
                continue
            km = min(self.b, prob.kmem(c, i, j, in_flight))
            if km < 1:
                continue
            ts = []
            for k in range(1, km + 1):
                t = timer.time(c, i, j, k)
                if t > t_cap:
                    break
                ts.append(t)
            if ts:
                self.ts[c.index] = ts

    def time_of(self, counts: tuple[int, ...], caps: dict[int, int] | None = None) -> float:
        """Smallest stage time for these counts (inf if they cannot take b samples)."""
        b = self.b
        used = [ci for ci, n in enumerate(counts) if n]
        if not used or sum(counts) > b:
            return math.inf
        lists = {}
        for ci in used:
            ts = self.ts.get(ci)
            if not ts:
                return math.inf
            k = len(ts) if caps is None else min(len(ts), caps.get(ci, len(ts)))
            if k < 1:
                return math.inf
            lists[ci] = ts[:k]
        if sum(counts[ci] * len(lists[ci]) for ci in used) < b:
            return math.inf
        floor = max(lists[ci][0] for ci in used)  # every device takes one sample
        levels = sorted({t for ci in used for t in lists[ci] if t >= floor})
        lo, hi = 0, len(levels) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            th = levels[mid] * (1 + 1e-12)
            if sum(counts[ci] * bisect.bisect_right(lists[ci], th) for ci in used) >= b:
                hi = mid
            else:
                lo = mid + 1
        return levels[lo]


def _count_vectors(budget: list[int], b: int, order: list[int]):
    """Count vectors over the classes in `order` with total between 1 and b."""
    C = len(budget)
    vec = [0] * C

    def rec(k, left):
        if k == len(order):
            if sum(vec):
                yield tuple(vec)
            return
        ci = order[k]
        for n in range(0, min(budget[ci], left) + 1):
            vec[ci] = n
            yield from rec(k + 1, left - n)
        vec[ci] = 0

    yield from rec(0, b)


def range_columns(prob: Problem, timer: StageTimer, R: int, M: int, i: int, j: int, t_cap: float,
                  budget: list[int]) -> list[Column]:
    gpipe = prob.schedule == "gpipe"
    rt = RangeTimes(prob, timer, i, j, t_cap, budget, M if gpipe else 1)
    if not rt.ts:
        return []
    b = timer.b
    L = prob.L
    order = sorted(rt.ts)
    out: list[Column] = []
    # Largest capacity each class can give: skip count vectors that cannot reach b.
    for counts in _count_vectors([budget[c] if c in rt.ts else 0 for c in range(len(budget))], b, order):
        if sum(counts[ci] * len(rt.ts[ci]) for ci in order if counts[ci]) < b:
            continue
        t = rt.time_of(counts)
        if t > t_cap:
            continue
        # every device must matter
        dominated = False
        for ci in order:
            if counts[ci]:
                fewer = tuple(n - (1 if k == ci else 0) for k, n in enumerate(counts))
                if sum(fewer) and rt.time_of(fewer) <= t:
                    dominated = True
                    break
        if dominated:
            continue
        tail = stage_tail(prob, R, i, j, counts)
        if gpipe or j == L:  # in-flight does not depend on the position
            out.append(Column(i, j, counts, t, tail, L))
            continue
        # 1F1B: the time may grow (or become infeasible) deeper in the pipeline.
        amax_total = min(M - 1, L - j)
        prev_t, a = None, 0
        while a <= amax_total:
            caps = {ci: prob.kmem(prob.classes[ci], i, j, min(M, 1 + a)) for ci in order if counts[ci]}
            ta = rt.time_of(counts, caps)
            if not math.isfinite(ta) or ta > t_cap:
                if prev_t is not None:
                    out.append(Column(i, j, counts, prev_t, tail, a - 1))
                prev_t = None
                break
            if prev_t is not None and ta > prev_t:
                out.append(Column(i, j, counts, prev_t, tail, a - 1))
            prev_t = ta
            a += 1
        if prev_t is not None:
            out.append(Column(i, j, counts, prev_t, tail, L))
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
