"""Fast count-level plans that seed the integer program with an incumbent.

For each number of stages S, the per-replica devices are dealt to S stages in cluster
order (node group by node group, so a stage stays inside as few node groups as
possible) with about equal total peak FLOP/s per stage; then the layer split that
minimises the slowest stage for those device groups is found by dynamic programming
and the result is scored with the model's exact objective.
"""

from __future__ import annotations

import math

from .problem import CountPlan, CountStage, Problem, StageTimer, best_shares, evaluate_counts, in_flight


def deal_devices(prob: Problem, R: int, S: int) -> list[tuple[int, ...]] | None:
    """Split the per-replica budget into S groups of roughly equal speed, in class order."""
    budget = [c.count // R for c in prob.classes]
    units = [(c.index, c.dtype.peak_flops) for c in prob.classes for _ in range(budget[c.index])]
    if len(units) < S:
        return None
    total = sum(f for _, f in units)
    groups: list[list[int]] = [[0] * len(prob.classes) for _ in range(S)]
    acc, s = 0.0, 0
    for k, (ci, f) in enumerate(units):
        left_units = len(units) - k
        left_stages = S - s
        # move to the next stage when this one has its share of speed, keeping >= 1 device each
        if s < S - 1 and sum(groups[s]) > 0 and (acc + f / 2 > total * (s + 1) / S or left_units <= left_stages - 1):
            s += 1
        groups[s][ci] += 1
        acc += f
    if any(sum(g) == 0 for g in groups):
        return None
    return [tuple(g) for g in groups]


class Work:
    """A budget of stage-time evaluations (counted, so the result does not depend on the
    machine's speed)."""

    def __init__(self, left: int):
        self.left = left


def split_layers(prob: Problem, timer: StageTimer, groups: list[tuple[int, ...]], M: int,
                 work: Work | None = None) -> list[CountStage] | None:
    """Layer split minimising the slowest stage for fixed device groups (DP, O(S L^2));
    None when it has none or ``work`` runs out."""
    L, S = prob.L, len(groups)
    if S > L:
        return None
    INF = math.inf
    best = [[INF] * (L + 1) for _ in range(S + 1)]
    arg = [[-1] * (L + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    memo: dict = {}

    def stage_time(s, i, j):
        key = (s, i, j)
        if key not in memo:
            if work is not None:
                work.left -= 1
            r = best_shares(prob, timer, i, j, groups[s], in_flight(prob, s, S, M))
            memo[key] = INF if r is None else r[0]
        return memo[key]

    for s in range(S):
        if work is not None and work.left <= 0:
            return None
        for j in range(s + 1, L - (S - s - 1) + 1):
            for i in range(s, j):
                if best[s][i] == INF:
                    continue
                v = max(best[s][i], stage_time(s, i, j))
                if v < best[s + 1][j]:
                    best[s + 1][j], arg[s + 1][j] = v, i
    if best[S][L] == INF:
        return None
    stages, j = [], L
    for s in range(S, 0, -1):
        i = arg[s][j]
        stages.append(CountStage(i, j, groups[s - 1]))
        j = i
    return stages[::-1]


def heuristic_plan(prob: Problem, R: int, M: int, max_stages: int = 16, work: Work | None = None
                   ) -> CountPlan | None:
    b = prob.global_batch // (R * M)
    timer = StageTimer(prob, b)
    best: CountPlan | None = None
    for S in range(1, min(max_stages, prob.L) + 1):
        if work is not None and work.left <= 0:
            break
        groups = deal_devices(prob, R, S)
        if groups is None:
            break
        # a stage cannot use more devices than samples in a micro-batch
        groups = [tuple(min(n, b) for n in g) for g in groups]
        stages = split_layers(prob, timer, groups, M, work)
        if stages is None:
            continue
        plan = evaluate_counts(prob, CountPlan(R, M, stages), timer)
        if math.isfinite(plan.objective_s) and (best is None or plan.objective_s < best.objective_s):
            best = plan
    return best
