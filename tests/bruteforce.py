"""Brute-force enumeration of the planner's plan space (reference for the optimality test).

Enumerates every tensor-parallel unit size the request allows (one Problem per degree,
``Problem.tp``), every (R, M), every split of the layers into contiguous stages, and every
assignment of device counts per class to the stages (depth-first, abandoning a branch
as soon as a stage cannot hold its layers); scores each complete plan with the model's
own objective (allocator.problem). Only for tiny instances.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

from allocator.problem import CountPlan, CountStage, Problem, StageTimer, best_shares, in_flight, stage_tail


def count_vectors(budget: tuple[int, ...], b: int):
    for v in itertools.product(*[range(n + 1) for n in budget]):
        if 0 < sum(v) <= b:
            yield v


def brute_force(prob: Problem) -> CountPlan | None:
    best: list = [None]
    L = prob.L
    for R, M in prob.candidates():
        b = prob.global_batch // (R * M)
        timer = StageTimer(prob, b)
        budget0 = tuple(c.count // R for c in prob.classes)

        @lru_cache(maxsize=None)
        def stage(i, j, counts, infl):
            # each stage's recomputation choice changes only its own time and memory, and
            # the objective grows with every stage time: the fastest choice that fits
            got = [r for rc in prob.recompute_options
                   if (r := best_shares(prob, timer, i, j, counts, infl, rc, R)) is not None]
            return min(got, key=lambda r: r[0]) if got else None

        @lru_cache(maxsize=None)
        def tail(i, j, counts):
            return stage_tail(prob, R, i, j, counts)

        def finish(stages):
            S = len(stages)
            times = []
            for s, (i, j, counts) in enumerate(stages):
                r = stage(i, j, counts, in_flight(prob, s, S, M))
                if r is None:
                    return
                times.append(r[0])
            obj = sum(times) + (M - 1) * max(times) + max(tail(i, j, c) for i, j, c in stages)
            if best[0] is None or obj < best[0].objective_s - 1e-15:
                best[0] = CountPlan(R, M, [CountStage(i, j, c) for i, j, c in stages], obj)

        def dfs(i, budget, stages):
            if i == L:
                finish(stages)
                return
            for j in range(i + 1, L + 1):
                for counts in count_vectors(budget, b):
                    if prob.zero1_mixes(counts):  # zero1 stages have one tensor-parallel size
                        continue
                    # in-flight >= 1 everywhere: a stage that cannot take b samples even
                    # then can never be part of a plan
                    if stage(i, j, counts, 1 if prob.schedule == "1f1b" else M) is None:
                        continue
                    dfs(j, tuple(x - y for x, y in zip(budget, counts)), stages + [(i, j, counts)])

        dfs(0, budget0, [])
    return best[0]
