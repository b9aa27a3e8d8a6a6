"""Brute-force enumeration of the planner's plan space (reference for the optimality test).

Enumerates every (R, M), every split of the layers into contiguous stages, and every
assignment of device counts per class to the stages; evaluates each with the model's
own objective (allocator.problem.evaluate_counts). Only for tiny instances.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

from allocator.problem import (CountPlan, CountStage, Problem, StageTimer, best_shares, in_flight,
                               stage_tail)


def compositions(total: int, parts: int):
    """All ways to put at most `total` identical items into `parts` ordered bins."""
    if parts == 0:
        yield ()
        return
    for first in range(total + 1):
        for rest in compositions(total - first, parts - 1):
            yield (first,) + rest


def partitions(L: int):
    for mask in range(1 << (L - 1)):
        cuts = [0] + [k + 1 for k in range(L - 1) if mask >> k & 1] + [L]
        yield list(zip(cuts[:-1], cuts[1:]))


def brute_force(prob: Problem) -> CountPlan | None:
    best: CountPlan | None = None
    C = len(prob.classes)
    for R, M in prob.candidates():
        b = prob.global_batch // (R * M)
        timer = StageTimer(prob, b)
        budget = [c.count // R for c in prob.classes]

        @lru_cache(maxsize=None)
        def stage(i, j, counts, infl):
            return best_shares(prob, timer, i, j, counts, infl)

        @lru_cache(maxsize=None)
        def tail(i, j, counts):
            return stage_tail(prob, R, i, j, counts)

        for part in partitions(prob.L):
            S = len(part)
            if S > sum(budget):
                continue
            per_class = [list(compositions(budget[c], S)) for c in range(C)]
            for combo in itertools.product(*per_class):
                counts = [tuple(combo[c][s] for c in range(C)) for s in range(S)]
                if any(sum(cs) == 0 or sum(cs) > b for cs in counts):
                    continue
                times, worst_tail, ok = [], 0.0, True
                for s, (i, j) in enumerate(part):
                    r = stage(i, j, counts[s], in_flight(prob, s, S, M))
                    if r is None:
                        ok = False
                        break
                    times.append(r[0])
                if not ok:
                    continue
                for s, (i, j) in enumerate(part):
                    worst_tail = max(worst_tail, tail(i, j, counts[s]))
                obj = sum(times) + (M - 1) * max(times) + worst_tail
                if best is None or obj < best.objective_s - 1e-15:
                    best = CountPlan(R, M, [CountStage(i, j, counts[s]) for s, (i, j) in enumerate(part)], obj)
    return best
