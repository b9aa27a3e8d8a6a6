"""The search around the integer program: which (replicas, micro-batches) to solve, in
what order, with which incumbent, and what bound is proven at the end.

Replicas do not enlarge the plan space: R identical replicas of a count-level plan are
the same computation as one pipeline whose stages have R times the devices and R times
the micro-batch (same stage times, same gradient groups, same memory). So for each M
the R = 1 program is the whole plan space, and programs with R > 1 are smaller
restrictions of it that find good plans fast. The proven bound is the minimum over M of
what the R = 1 program proved (its optimum, its dual bound at the time limit, or "no
better than the incumbent" when it was cut off).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from .heuristic import heuristic_plan
from .ilp import IlpResult, build_and_solve
from .problem import CountPlan, Problem, StageTimer, evaluate_counts


@dataclass
class SearchResult:
    best: CountPlan | None
    bound: float
    status: str  # optimal | time_limit | infeasible
    seconds: float
    solves: list[dict] = field(default_factory=list)
    gap_tolerance: float = 0.0

    @property
    def gap(self) -> float:
        if self.best is None or not math.isfinite(self.best.objective_s):
            return math.inf
        if not math.isfinite(self.bound):
            return math.inf
        return max(0.0, (self.best.objective_s - self.bound) / self.best.objective_s)


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
    say(f"heuristics: best {best.objective_s:.4f} s" if best else "heuristics found no feasible plan")
    solves: list[dict] = []
    bound_m: dict[int, float] = {}
    ms = sorted({M for _, M in cands}, key=lambda m: per_m.get(m, math.inf))
    for mi, M in enumerate(ms):
        rs = sorted((R for R, MM in cands if MM == M), reverse=True)
        for R in rs:
            left = deadline - time.perf_counter()
            if left <= 0.05:
                break
            # share the remaining time over the M values still to prove
            budget = left / max(1, len(ms) - mi) if R == 1 else min(left, max(0.5, left / (4 * len(ms))))
            inc = best.objective_s if best else math.inf
            res = build_and_solve(prob, R, M, incumbent=inc * (1 + 1e-12) if math.isfinite(inc) else inc,
                                  time_limit=budget, gap=gap, backend=backend, msg=msg, timer=timer_for(R, M))
            rec = {"R": R, "M": M, "status": res.status, "vars": res.num_vars, "rows": res.num_rows,
                   "seconds": res.milp.seconds if res.milp else 0.0, "bound": res.bound,
                   "objective": math.inf}
            if res.plan is not None:
                ev = evaluate_counts(prob, res.plan, timer_for(R, M))
                rec["objective"] = ev.objective_s
                if math.isfinite(ev.objective_s) and (best is None or ev.objective_s < best.objective_s):
                    best = ev
            solves.append(rec)
            if R == 1:
                if res.status == "optimal":
                    bound_m[M] = min(rec["objective"], res.bound if math.isfinite(res.bound) else rec["objective"])
                elif res.status == "infeasible":
                    bound_m[M] = inc if res.milp else math.inf  # nothing better than the incumbent
                else:
                    bound_m[M] = res.bound
            say(f"R={R:<3} M={M:<4} {res.status:<11} vars={res.num_vars:<6} "
                f"{rec['seconds']:6.2f}s best={best.objective_s if best else math.inf:.4f}")
    bound = min((bound_m.get(M, -math.inf) for M in ms), default=math.inf)
    if best is not None and math.isfinite(bound):
        bound = min(bound, best.objective_s)
    elapsed = time.perf_counter() - t0
    if best is None:
        status = "infeasible" if all(M in bound_m for M in ms) else "time_limit"
    else:
        g = (best.objective_s - bound) / best.objective_s if math.isfinite(bound) else math.inf
        status = "optimal" if g <= gap + 1e-12 else "time_limit"
    return SearchResult(best, bound, status, elapsed, solves, gap)
