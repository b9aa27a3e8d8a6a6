"""Branch and bound over the bottleneck and tail caps of one micro-batch count M.

The objective of a plan is (M - 1) tau + sigma + sum of stage times, where tau is its
slowest stage and sigma its largest tail (allocator.problem). Take a box of caps: tau in
[tau_a, tau_b] and sigma in [sigma_c, sigma_d] (levels: the distinct stage times and
tails of M's shapes). Every plan whose bottleneck and tail fall in the box costs at least

    LB = (M - 1) tau_a + sigma_c + g(tau_b, sigma_d),

where g is the smallest sum of stage times of a plan within the caps (allocator.dp). The
plan that attains g is itself a plan, and its true cost is at most (M - 1) tau_b +
sigma_d + g: every evaluation is also a candidate. A box whose LB reaches the incumbent is
closed; a box of one level in each cap is exact (its plans cost at least LB and a plan
costing at most LB was offered). Since g only grows as the caps shrink, an evaluation can
be told to give up once the stage-time sum cannot get below the incumbent (``limit``).

The plan that attains g(tau_b, sigma_d) has its own levels (t, s) <= (b, d); within every
caps (b', d') with t <= b' <= b and s <= d' <= d it is still the least sum (g only grows
as the caps shrink), so a later box whose caps fall in that corner reuses g without a
program, and a box lying wholly in it is resolved (its cheapest plan is that one, at its
lowest levels, offered). Any other box is split in two along the cap that spans more of
the objective, each half bounded at its own lower caps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import numpy as np

from .dp import StageTable, min_bottleneck, min_stage_sum


WORK_PER_EVALUATION = 2_400_000
"""Counted work of the dynamic program (allocator.dp: states, options and pairs tried, the
cells of its passes over rows in allocator.dp.CELL_WEIGHT's units, and the set-up per
option) that counts as one evaluation of the search's budget, so that a program over a
large table costs the budget what it costs in time, at the pace of the budget's other
work: measured on a 2-core machine where the Lagrangian bounds ran at ~33 evaluations a
second (fleet-1024 x GPT-3 1.3B v2), the kernel ran ~83 million units a second (~12 ns
each, six instances): ~35 evaluations a second at this figure. (It was 4 million,
fitted on a faster machine, where the kernel ran ~240 million units a second and the
rest at ~60 evaluations a second, allocator.search.EVALS_PER_SECOND: the kernel is
memory-bound and lost more than the rest on the slower machine.)"""


@dataclass(frozen=True, order=True)
class Box:
    lb: float
    M: int
    a: int
    b: int
    c: int
    d: int
    t: int = field(default=-1, compare=False)
    s: int = field(default=-1, compare=False)
    """The levels of the plan attaining g(b, d) once evaluated (-1: none below the limit)."""

    @property
    def single(self) -> bool:
        return self.a == self.b and self.c == self.d


class CapSearch:
    """The cap boxes of one M and the memo of its dynamic-program evaluations."""

    def __init__(self, M: int, table: StageTable):
        self.M = M
        self.table = table
        self.taus = np.unique(table.t)
        self.sigs = np.unique(table.tail)
        self.memo: dict[tuple[int, int], tuple[float, float]] = {}
        self.corners: list[tuple[int, int, int, int, float]] = []
        """(t, b, s, d, g): caps [t, b] x [s, d] whose least stage-time sum is g, attained
        by a plan of levels (t, s)."""
        self.evaluations = 0
        """Its programs, in evaluations: one each, and one more per WORK_PER_EVALUATION of
        counted work."""

    def g(self, bt: int, bs: int, limit: float, max_work: int | None = None) -> tuple[float, list | None]:
        """(a lower bound on the stage-time sum of plans within caps (bt, bs), plan or None):
        the exact minimum when it is below ``limit``, else ``limit``; -inf (and nothing
        remembered) if the program gave up past ``max_work``. The levels of the plan
        attaining it are in ``last_levels`` ((-1, -1): none)."""
        self.last_levels = (-1, -1)
        for t, b, s, d, v in self.corners:  # within a resolved corner: the same least sum
            if t <= bt <= b and s <= bs <= d:
                self.last_levels = (t, s)
                return v, None
        key = (bt, bs)
        old = self.memo.get(key)
        if old is not None and (math.isfinite(old[0]) or limit <= old[1]):
            return (old[0] if math.isfinite(old[0]) else old[1]), None
        tab = self.table
        use = (tab.t <= self.taus[bt]) & (tab.tail <= self.sigs[bs])
        meter = [0]
        v, seq = min_stage_sum(tab, use, limit, meter, max_work)
        self.evaluations += 1 + meter[0] // WORK_PER_EVALUATION
        if v == -math.inf:
            return v, None
        self.memo[key] = (v, limit)
        if seq is not None:
            t = int(np.searchsorted(self.taus, max(o.t for o in seq)))
            s = int(np.searchsorted(self.sigs, max(o.tail for o in seq)))
            self.last_levels = (t, s)
            self.corners.append((t, bt, s, bs, v))
        return (v if math.isfinite(v) else limit), seq

    def root(self, incumbent: float = math.inf, max_work: int | None = None,
             first_work: int | None = None, tau_known: float = math.inf) -> tuple[Box | None, list | None]:
        """The box of caps that any plan better than ``incumbent`` can have, and a plan
        found on the way: the box runs from the smallest bottleneck at which some plan
        exists to the largest levels that can still beat the incumbent (M tau <
        incumbent); (None, None) if no plan can.

        First the least stage-time sum within the largest caps (none below the limit: no
        plan beats the incumbent; its plan bounds the bottleneck from above), then the
        least bottleneck below that plan's (allocator.dp.min_bottleneck): two programs in
        place of a bisection of feasibility tests. The first is the first box's own
        evaluation (memo). The second may take at most ``max_work``: beyond, the box starts
        at the lowest level (valid: the boxes split it). The first may take at most
        ``first_work`` (for restricted spaces, searched for plans only): beyond, (None,
        None) with ``gave_up`` set (not a proof that no plan beats the incumbent).
        ``tau_known``: the bottleneck of some plan of this count known beforehand (the least
        bottleneck is at most it: the second program looks below it only). The least
        bottleneck found is kept in ``tau_min``."""
        self.gave_up = False
        self.tau_min = math.nan
        nt, ns = len(self.taus) - 1, len(self.sigs) - 1
        if math.isfinite(incumbent):
            nt = int(np.searchsorted(self.taus, incumbent / self.M, side="left")) - 1
            if nt < 0:
                return None, None
        tab = self.table
        # every plan has a first and a last stage (or one stage): its largest tail is at
        # least the smaller of "one stage" and "the larger of the cheapest first and last"
        def cheapest(kind):
            m = tab.kind == kind
            return float(tab.tail[m].min()) if m.any() else math.inf
        sig_lb = min(cheapest(3), max(cheapest(1), cheapest(2)))
        c = min(int(np.searchsorted(self.sigs, sig_lb * (1 - 1e-12))), ns)
        base = (self.M - 1) * float(self.taus[0]) + float(self.sigs[c])
        v, seq = self.g(nt, ns, incumbent - base, first_work)
        if v == -math.inf:
            self.gave_up = True
            return None, None
        if base + v >= incumbent or seq is None:
            return None, None
        lo = 0  # (one micro-batch: the bottleneck does not count)
        if self.M > 1:
            if math.isfinite(incumbent):  # no plan costs less than (M - 1) tau + sigma_c + v
                nt = min(nt, int(np.searchsorted(self.taus, (incumbent - float(self.sigs[c]) - v) / (self.M - 1),
                                                 side="left")) - 1)
                if nt < 0:
                    return None, seq
            top = min(max(o.t for o in seq), tau_known)  # (a plan has it: the least is at most it)
            meter = [0]
            tau = min_bottleneck(tab, (tab.t < top) & (tab.t <= self.taus[nt]) & (tab.tail <= self.sigs[ns]),
                                 meter=meter, max_work=max_work)
            self.evaluations += 1 + meter[0] // WORK_PER_EVALUATION
            if tau == math.inf:  # none below that plan's bottleneck: that is the least, if within the box
                if top > self.taus[nt]:
                    return None, seq
                tau = top
            if math.isfinite(tau):
                self.tau_min = tau
            lo = int(np.searchsorted(self.taus, tau)) if math.isfinite(tau) else 0
        return Box(-math.inf, self.M, lo, nt, c, ns), seq

    def evaluate(self, box: Box, incumbent: float) -> tuple[Box, list | None]:
        """The box with its lower bound computed, and the plan found on the way."""
        base = (self.M - 1) * float(self.taus[box.a]) + float(self.sigs[box.c])
        v, seq = self.g(box.b, box.d, incumbent - base)
        t, s = self.last_levels
        return Box(base + v, box.M, box.a, box.b, box.c, box.d, t, s), seq

    def corner_cost(self, box: Box) -> float:
        """What the resolved corner of an evaluated box costs at least (its plan's cost in
        the caps' terms: at its own levels); inf if it has none."""
        if box.t < 0:
            return math.inf
        return box.lb + (self.M - 1) * float(self.taus[max(box.t, box.a)] - self.taus[box.a]) + \
            float(self.sigs[max(box.s, box.c)] - self.sigs[box.c])

    def split(self, box: Box) -> list[Box]:
        """The halves of an evaluated box along the cap that spans more of the objective,
        each with its own bound (its lower caps, the parent's g: g only grows as the caps
        shrink); none if the box lies in its plan's resolved corner."""
        if 0 <= box.t <= box.a and 0 <= box.s <= box.c:
            return []
        a, b, c, d = box.a, box.b, box.c, box.d
        g = box.lb - (self.M - 1) * float(self.taus[a]) - float(self.sigs[c])
        lb = lambda a, c: max(box.lb, (self.M - 1) * float(self.taus[a]) + float(self.sigs[c]) + g)  # noqa: E731
        span_t = (self.M - 1) * float(self.taus[b] - self.taus[a])
        span_s = float(self.sigs[d] - self.sigs[c])
        if a < b and (span_t >= span_s or c == d):
            m = (a + b) // 2
            return [Box(lb(a, c), box.M, a, m, c, d), Box(lb(m + 1, c), box.M, m + 1, b, c, d)]
        m = (c + d) // 2
        return [Box(lb(a, c), box.M, a, b, c, m), Box(lb(a, m + 1), box.M, a, b, m + 1, d)]
