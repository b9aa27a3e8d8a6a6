"""The integer program over stage shapes (allocator.shapes) for one micro-batch count M.

    min (M - 1) tau + sum_k t_k z_k + sigma
    s.t. one first-kind shape, one last-kind shape (an ``only`` shape is both)
         blocks:        sum_k blocks_k z_k = K
         every class c: sum_k counts_kc z_k <= N_c
         1F1B memory:   for every depth a, sum_{inner k: amax_k <= a} z_k <= a    (Hall)
                        inner stages + 1 <= amax of the chosen first shape
         tau >= t_k and sigma >= tail_k for every shape used (z_k <= U_k y_k)
         tau >= tau_lb, sigma >= sigma_lb
z_k counts the stages of shape k (binary for the first/last kinds). Its solutions are
exactly the count-level plans of allocator.problem up to the order of identical inner
stages, with the same objective.
"""

from __future__ import annotations

import math

from .milp import Milp, MilpResult
from .problem import Problem
from .shapes import FIRST, INNER, LAST, ONLY, Shape


def build(prob: Problem, shapes: list[Shape], M: int, *, tau_lb: float = 0.0, sigma_lb: float = 0.0,
          relax: bool = False, budgets: list[int] | None = None) -> tuple[Milp, list[int]] | None:
    """The program (or its LP relaxation); None when some kind has no shape at all.
    ``budgets``: devices per class (default the cluster's; one replica's for replica plans)."""
    K, L = prob.L - 2, prob.L
    N = list(budgets) if budgets is not None else [c.count for c in prob.classes]
    m = Milp()
    tau = m.var("tau", tau_lb, math.inf, obj=M - 1)
    sigma = m.var("sigma", sigma_lb, math.inf, obj=1.0)
    z: list[int] = []
    for s in shapes:
        if s.kind == INNER:
            ub = K // s.blocks
            for c, n in enumerate(s.counts):
                if n:
                    ub = min(ub, N[c] // n)
        else:
            ub = 1
        x = m.var("z", 0, ub, not relax, obj=s.t)
        z.append(x)
        y = x
        if ub > 1:
            y = m.var("y", 0, 1, not relax)
            m.le({x: 1, y: -ub}, 0)
        if s.t > tau_lb:
            m.le({tau: -1.0, y: s.t}, 0)
        if s.tail > sigma_lb:
            m.le({sigma: -1.0, y: s.tail}, 0)
    firsts = [x for x, s in zip(z, shapes) if s.kind in (FIRST, ONLY)]
    lasts = [x for x, s in zip(z, shapes) if s.kind in (LAST, ONLY)]
    if not firsts or not lasts:
        return None
    m.eq({x: 1 for x in firsts}, 1)
    m.eq({x: 1 for x in lasts}, 1)
    m.eq({x: s.blocks for x, s in zip(z, shapes) if s.blocks}, K)
    for c in range(len(N)):
        terms = {x: s.counts[c] for x, s in zip(z, shapes) if s.counts[c]}
        if terms:
            m.le(terms, N[c])
    inner = [(x, s.amax) for x, s in zip(z, shapes) if s.kind == INNER]
    for a in sorted({am for _, am in inner if am < L}):
        m.le({x: 1 for x, am in inner if am <= a}, a)
    # The first stage sits under every other one: inner + 1 <= its amax.
    depth = {x: 1.0 for x, _ in inner}
    for x, s in zip(z, shapes):
        if s.kind == FIRST:
            depth[x] = -(min(s.amax, L) - 1)
        elif s.kind == ONLY:
            depth[x] = float(L)  # no other stage
    m.le(depth, 0)
    return m, z


def solve(prob: Problem, shapes: list[Shape], M: int, *, tau_lb: float = 0.0, sigma_lb: float = 0.0,
          incumbent: float = math.inf, time_limit: float = 60.0, gap: float = 1e-9, backend: str = "highs",
          relax: bool = False, msg: bool = False, node_limit: int | None = None, budgets: list[int] | None = None,
          work_limit: int | None = None) -> tuple[MilpResult | None, list[Shape] | None]:
    shapes = list(shapes)  # (an allocator.shapes.ShapeSet: its Shape objects, once)
    built = build(prob, shapes, M, tau_lb=tau_lb, sigma_lb=sigma_lb, relax=relax, budgets=budgets)
    if built is None:
        return None, None
    m, z = built
    res = m.solve(backend, time_limit=time_limit, gap=gap, cutoff=incumbent if not relax else None, msg=msg,
                  node_limit=node_limit, work_limit=work_limit)
    chosen = None
    if res.x is not None and not relax:
        chosen = []
        for x, s in zip(z, shapes):
            chosen.extend([s] * int(round(res.x[x])))
    return res, chosen
