"""The integer program for one (replicas R, micro-batches M) pair.

Variables, per contiguous layer range r = [i, j) that some class can serve:
- y_r (binary): r is a stage. Every layer lies in exactly one chosen range.
- n_rc (integer): devices of class c serving r in each replica; sum_r n_rc <= N_c / R.
- q_rc (continuous): samples of each micro-batch served by class c; sum_c q_rc = b y_r,
  n_rc <= q_rc (every device gets a sample).
- w_rj (binary, cumulative levels): w_rj = 1 means the stage finishes within theta_rj.
  The levels theta_r are every distinct device time f_c(r, k) (k samples on class c),
  so the stage time t_r = min{theta : sum_c n_rc K_c(theta) >= b} is represented
  exactly: t_r = theta_last y_r - sum_j (theta_{j+1} - theta_j) w_rj, and for each class
  q_rc <= K_c(theta_j) n_rc + b (1 - w_rj) where K_c(theta) is the largest share class c
  can run within theta (and within its memory). This is the exact linearisation of the
  "work / speed" ratio: no term is dropped or rounded.
- e_ja (binary, 1F1B only): "at least a stages follow the stage that ends at layer j",
  so a device's in-flight activations (1 + a micro-batches) cap its share exactly.
- u_rc, g_rG, multi_r, delta_rk (binary): which classes and node groups a stage uses,
  whether its gradient group crosses nodes, and thresholds of its device count for the
  ring all-reduce factor 2(n-1)/n (exact up to 16 devices per replica and stage, then on
  a x1.25 grid, rounded down so the program stays a relaxation).
- tau >= t_r, sigma >= AR_r + opt_rc (continuous).
Objective: (M - 1) tau + sum_r t_r + sigma (allocator.problem documents the model).

Only ranges and levels that can beat the incumbent are built: a stage of an iteration
no slower than the incumbent T runs within T / M.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from .milp import Milp, MilpResult
from .problem import CountPlan, CountStage, Problem, StageTimer

EXACT_THRESHOLDS = 16
THRESHOLD_GROWTH = 1.25


@dataclass
class IlpResult:
    R: int
    M: int
    milp: MilpResult | None
    plan: CountPlan | None
    num_vars: int
    num_rows: int
    note: str = ""

    @property
    def status(self) -> str:
        return self.milp.status if self.milp else "infeasible"

    @property
    def bound(self) -> float:
        return self.milp.bound if self.milp else math.inf


def thresholds(nmax: int) -> list[int]:
    ts = list(range(1, min(nmax, EXACT_THRESHOLDS) + 1))
    while ts[-1] < nmax:
        ts.append(min(nmax, max(ts[-1] + 1, int(math.ceil(ts[-1] * THRESHOLD_GROWTH)))))
    return ts


def cap_at(ts: list[float], theta: float) -> int:
    """Largest share k whose time ts[k-1] fits within theta (ts is non-decreasing)."""
    return bisect.bisect_right(ts, theta * (1 + 1e-12))


def build_and_solve(prob: Problem, R: int, M: int, *, incumbent: float = math.inf, time_limit: float = 60.0,
                    gap: float = 1e-9, backend: str = "highs", msg: bool = False,
                    timer: StageTimer | None = None, relax: bool = False) -> IlpResult:
    """Build the count program for (R, M) and solve it (relax: only its LP relaxation,
    a valid lower bound on every plan at this M when R = 1)."""
    B = prob.global_batch
    b = B // (R * M)
    L = prob.L
    classes = [c for c in prob.classes if c.count // R >= 1]
    N = {c.index: c.count // R for c in classes}
    timer = timer or StageTimer(prob, b)
    tau_cap = incumbent / M if math.isfinite(incumbent) else math.inf
    gpipe = prob.schedule == "gpipe"
    multi_node_cluster = len(prob.cluster.nodes) > 1

    m = Milp()
    tau = m.var("tau", obj=M - 1)
    sigma = m.var("sigma", obj=1.0)
    cover: list[list[int]] = [[] for _ in range(L)]
    t_exprs: dict[tuple[int, int], dict[int, float]] = {}
    starts_at: list[list[int]] = [[] for _ in range(L + 1)]
    info = {}  # range -> dict of variable indices
    mem_rows = []  # (j, a, q, n, kmem) deferred until e_ja exists

    for i in range(L):
        for j in range(i + 1, L + 1):
            usable = []
            for c in classes:
                infl = M if gpipe else 1
                km = min(b, prob.kmem(c, i, j, infl))
                if km < 1:
                    continue
                ts = []
                for k in range(1, km + 1):
                    t = timer.time(c, i, j, k)
                    if t > tau_cap:
                        break
                    ts.append(t)
                if ts:
                    usable.append((c, ts))
            if not usable:
                continue
            levels = sorted({t for _, ts in usable for t in ts})

            # Drop levels at which even the whole budget cannot take the micro-batch.
            first = 0
            while first < len(levels) and sum(N[c.index] * cap_at(ts, levels[first]) for c, ts in usable) < b:
                first += 1
            levels = levels[first:]
            if not levels:
                continue
            J = len(levels)
            y = m.binary(f"y[{i},{j}]")
            for l in range(i, j):
                cover[l].append(y)
            starts_at[i].append(y)
            w = [m.binary(f"w[{i},{j},{k}]") for k in range(J - 1)]
            for k in range(J - 2):
                m.le({w[k]: 1, w[k + 1]: -1}, 0)
            if J >= 2:
                m.le({w[J - 2]: 1, y: -1}, 0)
            # t_r as an expression: coefficients on y and w
            t_expr = {y: levels[-1]}
            for k in range(J - 1):
                t_expr[w[k]] = -(levels[k + 1] - levels[k])
            for v, coef in t_expr.items():
                m.obj[v] += coef
            t_exprs[(i, j)] = t_expr
            n_vars, q_vars, u_vars = {}, {}, {}
            for c, ts in usable:
                n = m.var(f"n[{i},{j},{c.index}]", 0, min(N[c.index], b), integer=True)
                q = m.var(f"q[{i},{j},{c.index}]", 0, b)
                n_vars[c.index], q_vars[c.index] = n, q
                m.le({n: 1, q: -1}, 0)
                caps = [cap_at(ts, th) for th in levels]
                for k in range(J):
                    if k == J - 1:
                        m.le({q: 1, n: -caps[k]}, 0)
                    elif caps[k] < caps[k + 1]:
                        m.le({q: 1, n: -caps[k], w[k]: b}, b)
                if not gpipe and j < L:
                    kprev = min(b, len(ts))
                    for a in range(1, M):
                        km = max(0, min(b, prob.kmem(c, i, j, 1 + a)))
                        if km < kprev:
                            mem_rows.append((j, a, q, n, km))
                            kprev = km
                        if km == 0:
                            break
            m.eq({**{q: 1 for q in q_vars.values()}, y: -b}, 0)
            # Aggregated cover at every level (implied by the per-class rows for integral
            # w, much tighter for fractional w): the chosen devices can take b samples.
            for k in range(J - 1):
                terms = {n_vars[c.index]: cap_at(ts, levels[k]) for c, ts in usable}
                terms[w[k]] = -b
                m.ge(terms, 0)
            m.ge({**{n_vars[c.index]: cap_at(ts, levels[-1]) for c, ts in usable}, y: -b}, 0)
            tail = m.var(f"tail[{i},{j}]")
            info[(i, j)] = dict(y=y, n=n_vars, q=q_vars, usable=[c for c, _ in usable], tail=tail)
            _tail_rows(m, prob, R, b, i, j, y, n_vars, [c for c, _ in usable], N, tail, multi_node_cluster)

    for l in range(L):
        if not cover[l]:
            return IlpResult(R, M, None, None, m.num_vars, m.num_rows, note=f"no stage can hold layer {l}")
        m.eq({y: 1 for y in cover[l]}, 1)
        # tau >= time of the stage holding layer l: exactly one range through l is chosen,
        # so the sum is that stage's time; far tighter than tau >= t_r for fractional y.
        terms = {tau: -1.0}
        sig = {sigma: -1.0}
        for (i, j), t_expr in t_exprs.items():
            if i <= l < j:
                for v, coef in t_expr.items():
                    terms[v] = terms.get(v, 0.0) + coef
                sig[info[(i, j)]["tail"]] = 1.0
        m.le(terms, 0)
        m.le(sig, 0)

    # 1F1B: A_j = stages that start at or after boundary j (A_j = A_{j+1} + stages starting
    # at j). A device of class c at share q/n on a stage ending at j holds 1 + A_j
    # micro-batches; e_ja = 1 when A_j >= a switches on the memory cap for depth 1 + a.
    if mem_rows:
        A = [m.var(f"A[{j}]", 0, L) for j in range(L + 1)]
        for j in range(L):
            m.eq({A[j]: 1, A[j + 1]: -1, **{y: -1 for y in starts_at[j]}}, 0)
        need: dict[int, int] = {}
        for j, a, *_ in mem_rows:
            need[j] = max(need.get(j, 0), a)
        e = {}
        for j, amax in need.items():
            ev = [m.binary(f"e[{j},{a}]") for a in range(1, amax + 1)]
            for a in range(amax - 1):
                m.ge({ev[a]: 1, ev[a + 1]: -1}, 0)
            # sum_a e_ja + (L - j) e_j,amax >= A_j: e_ja = 1 whenever A_j >= a
            terms = {v: 1.0 for v in ev}
            terms[ev[-1]] += L - j
            terms[A[j]] = -1.0
            m.ge(terms, 0)
            for a, v in enumerate(ev, start=1):
                e[(j, a)] = v
        for j, a, q, n, km in mem_rows:
            m.le({q: 1, n: -km, e[(j, a)]: b}, b)

    for c in classes:
        vs = [d["n"][c.index] for d in info.values() if c.index in d["n"]]
        if vs:
            m.le({v: 1 for v in vs}, N[c.index])

    if relax:
        m.integer = [False] * m.num_vars
    res = m.solve(backend, time_limit=time_limit, gap=gap, cutoff=incumbent if math.isfinite(incumbent) else None,
                  msg=msg)
    plan = None
    if res.x is not None and not relax:
        stages = []
        for (i, j), d in sorted(info.items()):
            if res.x[d["y"]] > 0.5:
                counts = [0] * len(prob.classes)
                for ci, v in d["n"].items():
                    counts[ci] = int(round(res.x[v]))
                stages.append(CountStage(i, j, tuple(counts)))
        plan = CountPlan(R, M, stages)
    return IlpResult(R, M, res, plan, m.num_vars, m.num_rows)


def _tail_rows(m: Milp, prob: Problem, R: int, b: int, i: int, j: int, y: int, n_vars: dict[int, int],
               usable, N: dict[int, int], sigma: int, multi_node_cluster: bool) -> None:
    """tail_r (passed as `sigma`) >= ring all-reduce of the stage's group + optimizer step of each used class."""
    opt = {c.index: prob.opt_time(c, i, j) for c in usable}
    nmax = min(b, sum(N[c.index] for c in usable))
    u = {}
    for c in usable:
        u[c.index] = m.binary(f"u[{i},{j},{c.index}]")
        m.le({n_vars[c.index]: 1, u[c.index]: -N[c.index]}, 0)
    if R * nmax <= 1:
        for ci, uv in u.items():
            m.ge({sigma: 1, uv: -opt[ci]}, 0)
        return
    nbytes = prob.grad_bytes(i, j)
    ts = thresholds(nmax)
    h = lambda n: 2.0 * (R * n - 1) / (R * n)  # noqa: E731
    # delta_1 = y; delta_k for the other thresholds
    deltas = [y] + [m.binary(f"d[{i},{j},{t}]") for t in ts[1:]]
    for k in range(1, len(deltas)):
        m.le({deltas[k]: 1, deltas[k - 1]: -1}, 0)
    nxt = ts[1:] + [nmax + 1]
    cap = {deltas[k]: -(nxt[k] - ts[k]) for k in range(len(ts))}
    for v in n_vars.values():
        cap[v] = cap.get(v, 0) + 1
    m.le(cap, 0)  # n_r <= sum_k (t_{k+1} - t_k) delta_k
    H = {deltas[0]: h(ts[0])}
    for k in range(1, len(ts)):
        H[deltas[k]] = h(ts[k]) - h(ts[k - 1])
    Lam = {v: 2.0 * R for v in n_vars.values()}
    Lam[y] = Lam.get(y, 0) - 2.0

    groups = sorted({c.group for c in usable})
    # Cases: (bandwidth, latency, [(want, indicator)], group the case is limited to).
    # A case's row applies when every indicator equals its `want`.
    cases = []
    g: dict[int, int] = {}
    mv = None
    if not multi_node_cluster:
        grp = prob.groups[groups[0]]
        cases.append((grp.intra_bw, grp.intra_lat, [], None))
    else:
        if len(groups) > 1 or any(not prob.groups[G].single_node for G in groups):
            mv = m.binary(f"multi[{i},{j}]")
        if len(groups) > 1:
            for G in groups:
                g[G] = m.binary(f"g[{i},{j},{G}]")
                for c in usable:
                    if c.group == G:
                        m.le({u[c.index]: 1, g[G]: -1}, 0)
            m.le({**{g[G]: 1 for G in groups}, mv: -(len(groups) - 1)}, 1)
        for G in groups:
            grp = prob.groups[G]
            if not grp.single_node:
                m.le({(g[G] if G in g else y): 1, mv: -1}, 0)
            if grp.single_node:
                off = ([(0, mv)] if mv is not None else []) + ([(1, g[G])] if G in g else [])
                cases.append((grp.intra_bw, grp.intra_lat, off, G))
            if mv is not None:
                off = [(1, mv)] + ([(1, g[G])] if G in g else [])
                cases.append((grp.inter_bw, grp.inter_lat, off, None))
    worst_ar = nbytes / min(cs[0] for cs in cases) * 2.0 + max(cs[1] for cs in cases) * 2.0 * R * nmax
    bigm = worst_ar + max(opt.values()) + 1.0
    for bw, lat, off, G in cases:
        for c in usable:
            if G is not None and c.group != G:
                continue
            # sigma >= (nbytes/bw) H + lat Lam + opt_c - bigM (switch-offs)
            terms = {sigma: 1.0}
            for v, coef in H.items():
                terms[v] = terms.get(v, 0) - coef * nbytes / bw
            for v, coef in Lam.items():
                terms[v] = terms.get(v, 0) - coef * lat
            terms[u[c.index]] = terms.get(u[c.index], 0) - opt[c.index] - bigm
            rhs = -bigm
            for want, v in off:
                # want=1: case applies when v == 1 -> subtract bigm (1 - v); want=0: applies when v == 0 -> bigm v
                if want == 1:
                    terms[v] = terms.get(v, 0) - bigm
                    rhs -= bigm
                else:
                    terms[v] = terms.get(v, 0) + bigm
            m.ge(terms, rhs)
