"""The search around the integer programs: which (replicas R, micro-batches M) to solve,
in what order, with which incumbent, and what bound is proven at the end.

Replicas do not enlarge the plan space: R identical replicas of a count-level plan are
the same computation as one pipeline whose stages have R times the devices and R times
the micro-batch (same stage times, gradient groups and memory). So for each M the R = 1
program covers the whole plan space; programs with R > 1 are smaller restrictions, used
to find plans when the R = 1 column set is too large to build.

1. Incumbent from fast heuristics (allocator.heuristic), cheapest first, within a third
   of the time limit.
2. For every M: enumerate the useful stage columns (allocator.columns), find the
   smallest feasible bottleneck tau* (bisection on feasibility programs when the set is
   small, a per-layer bound otherwise) and a cheap lower bound (allocator.bounds);
   M values whose bound reaches the incumbent are done.
3. Solve the column programs, most promising (lowest bound) first, each with a share of
   the remaining time and the incumbent as cutoff; M values left unproven get the rest
   of the time in a second round.
The proven bound is the minimum over M of what was proved for that M.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from .bounds import fluid_bottleneck, partition_bound
from .columns import Column, enumerate_columns, full_budget_times
from .heuristic import heuristic_plan
from .ilp import build_and_solve
from .ilp_columns import cheap_bottleneck, min_bottleneck, solve_columns
from .problem import CountPlan, Problem, StageTimer, evaluate_counts

MAX_COLUMNS = 40000
BISECT_COLUMNS = 3000
"""Column sets up to this size get the exact bottleneck by bisection (each feasibility
program is quick); larger ones use the cheap per-layer bound."""


HEURISTIC_SHARE = 1 / 3
"""Fraction of the time limit the incumbent heuristics may use at most."""


@dataclass
class MState:
    """What is known about one value of M."""

    M: int
    cols: list[Column] | None = None
    tau_lb: float = 0.0
    bound: float = -math.inf
    done: bool = False
    status: str = "open"  # open | optimal | pruned | infeasible | time_limit | bounded
    seconds: float = 0.0
    tries: int = 0


@dataclass
class SearchResult:
    best: CountPlan | None
    bound: float
    status: str  # optimal | time_limit | infeasible
    seconds: float
    solves: list[dict] = field(default_factory=list)

    @property
    def gap(self) -> float:
        if self.best is None or not math.isfinite(self.best.objective_s) or not math.isfinite(self.bound):
            return math.inf
        return max(0.0, (self.best.objective_s - self.bound) / self.best.objective_s)


class Search:
    def __init__(self, prob: Problem, time_limit: float, gap: float, backend: str, msg: bool,
                 progress: Callable[[str], None] | None):
        self.prob, self.gap, self.backend, self.msg = prob, gap, backend, msg
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + time_limit
        self.say = progress or (lambda s: None)
        self.timers: dict[int, StageTimer] = {}
        self.best: CountPlan | None = None
        self.log: list[dict] = []

    # ---- helpers --------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def timer(self, R: int, M: int) -> StageTimer:
        b = self.prob.global_batch // (R * M)
        if b not in self.timers:
            self.timers[b] = StageTimer(self.prob, b)
        return self.timers[b]

    @property
    def incumbent(self) -> float:
        return self.best.objective_s if self.best else math.inf

    def offer(self, plan: CountPlan | None, R: int, M: int) -> None:
        if plan is None:
            return
        plan = evaluate_counts(self.prob, plan, self.timer(R, M))
        if math.isfinite(plan.objective_s) and plan.objective_s < self.incumbent:
            self.best = plan

    def record(self, st: MState, what: str, **kw) -> None:
        self.log.append({"M": st.M, "step": what, "status": st.status, "bound": st.bound,
                         "seconds": round(st.seconds, 4), **kw})
        self.say(f"M={st.M:<4} {what:<10} {st.status:<10} bound={st.bound:.5g} "
                 f"best={self.incumbent:.5g} ({st.seconds:.2f}s)")

    # ---- steps --------------------------------------------------------------------------
    def prepare(self, st: MState) -> None:
        """Columns, bottleneck bound and the cheap bound; prune if it reaches the incumbent."""
        t0 = time.perf_counter()
        prob, M, inc = self.prob, st.M, self.incumbent
        t_cap = inc / M if math.isfinite(inc) else math.inf
        # Devices shared among stages, fractionally: a bound on the bottleneck.
        fluid = fluid_bottleneck(prob, self.timer(1, M), M, t_cap, self.backend, deadline=self.deadline)
        st.cols = enumerate_columns(prob, self.timer(1, M), 1, M, t_cap, MAX_COLUMNS)
        if not math.isfinite(fluid) or (math.isfinite(inc) and M * fluid >= inc):
            st.done, st.bound = True, (inc if math.isfinite(inc) else math.inf)
            st.status = "pruned" if math.isfinite(inc) else "infeasible"
        elif st.cols is None:
            # Too many columns to build: bound with every range given the whole budget.
            st.tau_lb = fluid
            tmin = full_budget_times(prob, self.timer(1, M), M, t_cap)
            st.bound = partition_bound(prob.L, tmin, M, fluid, stop_at=inc)
            if st.bound >= inc:
                st.done, st.status = True, "pruned"
        elif not st.cols:
            st.done, st.bound = True, (inc if math.isfinite(inc) else math.inf)
            st.status = "pruned" if math.isfinite(inc) else "infeasible"
        else:
            if len(st.cols) <= BISECT_COLUMNS:
                st.tau_lb = min_bottleneck(prob, st.cols, 1, self.backend, max(1.0, self.left()))
            else:
                st.tau_lb = max(fluid, cheap_bottleneck(prob, st.cols))
            if not math.isfinite(st.tau_lb):
                st.done, st.bound = True, (inc if math.isfinite(inc) else math.inf)
                st.status = "pruned" if math.isfinite(inc) else "infeasible"
            else:
                tmin: dict[tuple[int, int], float] = {}
                for c in st.cols:
                    if c.t < tmin.get((c.i, c.j), math.inf):
                        tmin[(c.i, c.j)] = c.t
                st.bound = partition_bound(prob.L, tmin, M, st.tau_lb, stop_at=inc)
                if st.bound >= inc:
                    st.done, st.status = True, "pruned"
        st.seconds += time.perf_counter() - t0
        self.record(st, "bound", columns=None if st.cols is None else len(st.cols))

    def solve(self, st: MState, budget: float) -> None:
        t0 = time.perf_counter()
        st.tries += 1
        prob, M, inc = self.prob, st.M, self.incumbent
        if st.cols is not None:
            res, plan, nv, _ = solve_columns(prob, st.cols, 1, M, tau_lb=st.tau_lb, incumbent=inc,
                                             time_limit=budget, gap=min(self.gap, 1e-6), backend=self.backend,
                                             msg=self.msg)
            self.offer(plan, 1, M)
            if res is None or res.status == "infeasible":
                st.done, st.status = True, ("pruned" if math.isfinite(inc) else "infeasible")
                st.bound = max(st.bound, inc)
            elif res.status == "optimal":
                st.done, st.status = True, "optimal"
                st.bound = max(st.bound, min(res.objective, self.incumbent))
            else:
                st.status = "time_limit"
                if math.isfinite(res.bound):
                    st.bound = max(st.bound, res.bound)
            st.seconds += time.perf_counter() - t0
            self.record(st, "solve", vars=nv)
            return
        # Too many columns for R = 1: plans from restricted programs (R > 1), and the
        # count program's LP relaxation as the bound for this M.
        for R in sorted((R for R, MM in prob.candidates() if MM == M and R > 1), reverse=True):
            if self.left() <= 0.05 or time.perf_counter() - t0 > budget / 2:
                break
            cols = enumerate_columns(prob, self.timer(R, M), R, M,
                                     self.incumbent / M if math.isfinite(self.incumbent) else math.inf, MAX_COLUMNS)
            if not cols:
                continue
            tl = cheap_bottleneck(prob, cols)
            if not math.isfinite(tl):
                continue
            _, plan, _, _ = solve_columns(prob, cols, R, M, tau_lb=tl, incumbent=self.incumbent,
                                          time_limit=max(0.5, budget / 4), gap=self.gap, backend=self.backend)
            self.offer(plan, R, M)
        if self.left() < 1.0:  # building the count program alone can take that long
            st.seconds += time.perf_counter() - t0
            return
        r = build_and_solve(prob, 1, M, incumbent=self.incumbent, time_limit=min(max(1.0, budget / 2), self.left()),
                            gap=self.gap, backend=self.backend, timer=self.timer(1, M), relax=True)
        if r.milp is not None and r.milp.status == "infeasible":
            st.done, st.status, st.bound = True, "pruned", max(st.bound, self.incumbent)
        elif r.milp is not None and r.milp.status == "optimal":
            # Bounded; while no plan is known at all, left open so that the second round
            # gives its restricted programs the rest of the time.
            st.done, st.status = self.best is not None, "bounded"
            st.bound = max(st.bound, r.milp.objective)
        st.seconds += time.perf_counter() - t0
        self.record(st, "lp-bound", vars=r.num_vars)

    def run(self) -> SearchResult:
        prob = self.prob
        cands = prob.candidates()
        per_m: dict[int, float] = {}
        # Heuristics, cheapest first (their cost grows with the micro-batch size B / (R M)),
        # within a third of the time limit: on 1000-GPU clusters all of them take minutes.
        heur_deadline = self.t0 + HEURISTIC_SHARE * (self.deadline - self.t0)
        for R, M in sorted(cands, key=lambda rm: (prob.global_batch // (rm[0] * rm[1]), rm)):
            if time.perf_counter() >= heur_deadline:
                break
            h = heuristic_plan(prob, R, M)
            if h is not None:
                per_m[M] = min(per_m.get(M, math.inf), h.objective_s)
                if h.objective_s < self.incumbent:
                    self.best = h
        self.say(f"heuristic incumbent: {self.incumbent:.5g} s")
        states = [MState(M) for M in sorted({M for _, M in cands}, key=lambda m: (per_m.get(m, math.inf), m))]
        for st in states:
            if self.left() <= 0.05:
                break
            self.prepare(st)
        # Solve, lowest bound first; then give what is left to the unproven ones.
        for rnd in range(2):
            todo = sorted((s for s in states if not s.done and s.bound < self.incumbent),
                          key=lambda s: (s.bound, s.M))
            for k, st in enumerate(todo):
                left = self.left()
                if left <= 0.05:
                    break
                if st.bound >= self.incumbent:
                    st.done, st.status = True, "pruned"
                    continue
                budget = left / (len(todo) - k) if rnd == 0 else left
                self.solve(st, budget)
        for st in states:  # what a state proved may now reach the improved incumbent
            if not st.done and st.bound >= self.incumbent:
                st.done, st.status = True, "pruned"
        bound = min((s.bound for s in states), default=math.inf)
        if self.best is not None:
            bound = min(bound, self.best.objective_s)
        elapsed = time.perf_counter() - self.t0
        if self.best is None:
            # Infeasible only when every M was proved so; a finite bound (an LP relaxation
            # solved, no integer plan found) leaves the question open.
            status = "infeasible" if all(s.done for s in states) and not math.isfinite(bound) else "time_limit"
        else:
            g = (self.best.objective_s - bound) / self.best.objective_s if math.isfinite(bound) else math.inf
            status = "optimal" if g <= self.gap + 1e-12 else "time_limit"
        return SearchResult(self.best, bound, status, elapsed, self.log)


def search(prob: Problem, *, time_limit: float = 30.0, gap: float = 1e-4, backend: str = "highs",
           msg: bool = False, progress: Callable[[str], None] | None = None) -> SearchResult:
    return Search(prob, time_limit, gap, backend, msg, progress).run()
