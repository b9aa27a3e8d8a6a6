"""The search around the integer programs: which (replicas R, micro-batches M) to solve,
in what order, with which incumbent, and what bound is proven at the end.

Replicas do not enlarge the plan space: R identical replicas of a count-level plan are
the same computation as one pipeline whose stages have R times the devices and R times
the micro-batch (same stage times, gradient groups and memory). So for each M the R = 1
program covers the whole plan space; programs with R > 1 are smaller restrictions that
find good plans fast when R = 1 is large.

For each (R, M): enumerate the useful stage columns (allocator.columns); if there are
not too many, find the smallest feasible bottleneck tau* by bisection (feasibility
programs) and solve the column program with tau >= tau*; otherwise solve the count
program (allocator.ilp). Any plan at M costs at least M * tau*, which prunes M values
without a full solve. The proven bound is the minimum over M of what was proved for
R = 1 (optimum, "nothing below the incumbent", the solver's dual bound, or M * tau*).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from .columns import enumerate_columns
from .heuristic import heuristic_plan
from .ilp import build_and_solve
from .ilp_columns import cheap_bottleneck, min_bottleneck, solve_columns
from .problem import CountPlan, Problem, StageTimer, evaluate_counts

MAX_COLUMNS = 40000
BISECT_COLUMNS = 3000
"""Column sets up to this size get the exact bottleneck by bisection (each feasibility
program is quick); larger ones use the cheap per-layer bound."""


@dataclass
class PairResult:
    R: int
    M: int
    status: str  # optimal | infeasible | pruned | bounded | time_limit | no_solution
    plan: CountPlan | None
    bound: float
    formulation: str
    num_vars: int = 0
    seconds: float = 0.0


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


def solve_pair(prob: Problem, R: int, M: int, timer: StageTimer, incumbent: float, time_limit: float,
               gap: float = 1e-9, backend: str = "highs", msg: bool = False,
               formulation: str = "auto") -> PairResult:
    t0 = time.perf_counter()
    t_cap = incumbent / M if math.isfinite(incumbent) else math.inf
    cols = None
    if formulation in ("auto", "columns"):
        cols = enumerate_columns(prob, timer, R, M, t_cap, MAX_COLUMNS if formulation == "auto" else 10**9)
    if cols is not None:
        if not cols:
            return PairResult(R, M, "infeasible" if not math.isfinite(incumbent) else "pruned", None,
                              incumbent, "columns", 0, time.perf_counter() - t0)
        if len(cols) <= BISECT_COLUMNS:
            tau_lb = min_bottleneck(prob, cols, R, backend, time_limit)
        else:
            tau_lb = cheap_bottleneck(prob, cols)
        if not math.isfinite(tau_lb):
            return PairResult(R, M, "infeasible" if not math.isfinite(incumbent) else "pruned", None,
                              incumbent, "columns", 0, time.perf_counter() - t0)
        if M * tau_lb >= incumbent:
            return PairResult(R, M, "pruned", None, M * tau_lb, "columns", 0, time.perf_counter() - t0)
        left = max(0.05, time_limit - (time.perf_counter() - t0))
        res, plan, nv, _ = solve_columns(prob, cols, R, M, tau_lb=tau_lb, incumbent=incumbent, time_limit=left,
                                         gap=gap, backend=backend, msg=msg)
        lb = M * tau_lb
        form = "columns"
    else:
        # Too many columns: the count program's LP relaxation bounds this M (and often
        # proves that nothing here beats the incumbent).
        res0 = build_and_solve(prob, R, M, incumbent=incumbent, time_limit=time_limit, gap=gap, backend=backend,
                               msg=msg, timer=timer, relax=True)
        res, plan, nv, form = res0.milp, None, res0.num_vars, "lp-bound"
        lb = -math.inf
        if res is not None and res.status == "optimal":
            return PairResult(R, M, "bounded", None, res.objective, form, nv, time.perf_counter() - t0)
    secs = time.perf_counter() - t0
    if res is None:
        return PairResult(R, M, "infeasible", None, incumbent, form, nv, secs)
    if plan is not None:
        plan = evaluate_counts(prob, plan, timer)
    if res.status == "optimal":
        return PairResult(R, M, "optimal", plan, plan.objective_s if plan else res.objective, form, nv, secs)
    if res.status == "infeasible":
        return PairResult(R, M, "pruned" if math.isfinite(incumbent) else "infeasible", None,
                          incumbent, form, nv, secs)
    bound = max(lb, res.bound if math.isfinite(res.bound) else -math.inf)
    return PairResult(R, M, "time_limit" if plan else "no_solution", plan, bound, form, nv, secs)


def search(prob: Problem, *, time_limit: float = 30.0, gap: float = 1e-4, backend: str = "highs",
           msg: bool = False, progress: Callable[[str], None] | None = None) -> SearchResult:
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    say = progress or (lambda s: None)
    cands = prob.candidates()
    timers: dict[int, StageTimer] = {}

    def timer_for(R, M):
        b = prob.global_batch // (R * M)
        if b not in timers:
            timers[b] = StageTimer(prob, b)
        return timers[b]

    best: CountPlan | None = None
    per_m: dict[int, float] = {}
    for R, M in cands:
        h = heuristic_plan(prob, R, M)
        if h is not None:
            per_m[M] = min(per_m.get(M, math.inf), h.objective_s)
            if best is None or h.objective_s < best.objective_s:
                best = h
    say(f"heuristic incumbent: {best.objective_s:.4f} s" if best else "heuristics found no feasible plan")
    solves: list[dict] = []
    bound_m: dict[int, float] = {}
    ms = sorted({M for _, M in cands}, key=lambda m: (per_m.get(m, math.inf), m))
    # First pass: R = 1 for every M (the whole plan space); restrictions with R > 1 only
    # when the R = 1 program did not finish, to improve the incumbent.
    queue = [(1, M) for M in ms]
    retry: list[int] = []
    for R, M in queue:
        left = deadline - time.perf_counter()
        if left <= 0.05:
            break
        budget = left / max(1, len(ms) - len(bound_m))
        inc = best.objective_s if best else math.inf
        r = solve_pair(prob, R, M, timer_for(R, M), inc, budget, gap=min(gap, 1e-6), backend=backend, msg=msg)
        rec = {"R": R, "M": M, "status": r.status, "formulation": r.formulation, "vars": r.num_vars,
               "seconds": round(r.seconds, 4), "bound": r.bound,
               "objective": r.plan.objective_s if r.plan else math.inf}
        solves.append(rec)
        if r.plan is not None and math.isfinite(r.plan.objective_s) and (best is None or r.plan.objective_s < best.objective_s):
            best = r.plan
        bound_m[M] = r.bound if r.status != "infeasible" else math.inf
        if r.status in ("time_limit", "no_solution", "bounded"):
            retry.append(M)
        say(f"M={M:<4} R=1 {r.status:<11} {r.formulation:<7} vars={r.num_vars:<6} {r.seconds:6.2f}s "
            f"best={best.objective_s if best else math.inf:.5f}")
    for M in retry:
        for R in sorted((R for R, MM in cands if MM == M and R > 1), reverse=True):
            left = deadline - time.perf_counter()
            if left <= 0.05:
                break
            inc = best.objective_s if best else math.inf
            r = solve_pair(prob, R, M, timer_for(R, M), inc, min(left, max(1.0, left / 4)), gap=gap,
                           backend=backend, msg=msg)
            solves.append({"R": R, "M": M, "status": r.status, "formulation": r.formulation,
                           "vars": r.num_vars, "seconds": round(r.seconds, 4), "bound": r.bound,
                           "objective": r.plan.objective_s if r.plan else math.inf})
            if r.plan is not None and math.isfinite(r.plan.objective_s) and (best is None or r.plan.objective_s < best.objective_s):
                best = r.plan
    bound = min((bound_m.get(M, -math.inf) for M in ms), default=math.inf)
    if best is not None:
        bound = min(bound, best.objective_s)
    elapsed = time.perf_counter() - t0
    if best is None:
        status = "infeasible" if len(bound_m) == len(ms) and all(not math.isfinite(b) for b in bound_m.values()) \
            else "time_limit"
    else:
        g = (best.objective_s - bound) / best.objective_s if math.isfinite(bound) else math.inf
        status = "optimal" if g <= gap + 1e-12 else "time_limit"
    return SearchResult(best, bound, status, elapsed, solves)
