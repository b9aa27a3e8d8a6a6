"""A small mixed-integer program builder with two back ends.

The model is written once as sparse rows. ``solve`` hands it to HiGHS directly through
highspy (the default: loading a large model column by column through PuLP costs more
than solving it) or builds a PuLP ``LpProblem`` and solves it with PuLP's CBC or HiGHS
interfaces (``backend="pulp-cbc"`` / ``"pulp-highs"``), the fallback when highspy is
missing. Every solve reports status, objective, proven bound, gap and seconds.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

INF = math.inf


@dataclass
class MilpResult:
    status: str
    """'optimal', 'feasible' (time limit with a solution), 'infeasible' (also: nothing
    better than the cutoff exists), 'no_solution' (time limit without a solution)."""
    x: np.ndarray | None
    objective: float
    bound: float
    seconds: float
    backend: str
    time_hit: bool = False
    """The solver stopped at its time limit (the result depends on the machine's speed)."""
    checks: int = 0
    """The solver's interrupt checks while it ran (HiGHS's MIP: the points where a callback
    may stop it; as many on any machine, as the solver is deterministic)."""
    nonzeros: int = 0
    """The program's nonzeros (HiGHS back end)."""

    @property
    def work(self) -> int:
        """Counted work: interrupt checks x the program's nonzeros (the time between two
        checks grows with the program: ~0.001 s on 1,500 nonzeros, ~0.1 s on 40,000, here)."""
        return self.checks * max(1, self.nonzeros)

    @property
    def gap(self) -> float:
        if self.x is None or not math.isfinite(self.objective):
            return INF
        if self.objective <= 0:
            return 0.0
        return max(0.0, (self.objective - self.bound) / abs(self.objective))


def highs_available() -> bool:
    try:
        import highspy  # noqa: F401
        return True
    except ImportError:
        return False


def available_backends() -> list[str]:
    out = ["highs"] if highs_available() else []
    import pulp
    names = pulp.listSolvers(onlyAvailable=True)
    if "PULP_CBC_CMD" in names:
        out.append("pulp-cbc")
    if "HiGHS" in names:
        out.append("pulp-highs")
    return out


def _new_highs(msg: bool):
    """A Highs instance on one thread; its copyright banner (printed on the C side at
    construction) is kept off stdout unless solver output was asked for. Every instance
    is made single-threaded: HiGHS's thread scheduler is global to the process, set up by
    the first instance that runs, and a later instance asking for another thread count
    fails to run (an LP of the Lagrangian bound's on the default two threads had made
    every later integer program return no solution: mix-64 x Llama-2 70B no longer
    proven infeasible after a GPT-2 XL search in the same process)."""
    import highspy
    if msg:
        h = highspy.Highs()
        h.setOptionValue("threads", 1)
        return h
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    return h


class Milp:
    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.obj: list[float] = []
        self.integer: list[bool] = []
        self.names: list[str] = []
        self.rows_lo: list[float] = []
        self.rows_hi: list[float] = []
        self.rows_idx: list[list[int]] = []
        self.rows_val: list[list[float]] = []

    @property
    def num_vars(self) -> int:
        return len(self.lb)

    @property
    def num_rows(self) -> int:
        return len(self.rows_lo)

    @property
    def num_integer(self) -> int:
        return sum(self.integer)

    def var(self, name: str, lb: float = 0.0, ub: float = INF, integer: bool = False, obj: float = 0.0) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(integer)
        self.obj.append(obj)
        self.names.append(name)
        return len(self.lb) - 1

    def binary(self, name: str, obj: float = 0.0) -> int:
        return self.var(name, 0.0, 1.0, True, obj)

    def row(self, terms: dict[int, float] | list[tuple[int, float]], lo: float = -INF, hi: float = INF) -> None:
        items = terms.items() if isinstance(terms, dict) else terms
        merged: dict[int, float] = {}
        for i, v in items:
            merged[i] = merged.get(i, 0.0) + v
        idx = [i for i, v in merged.items() if v != 0.0]
        self.rows_idx.append(idx)
        self.rows_val.append([merged[i] for i in idx])
        self.rows_lo.append(lo)
        self.rows_hi.append(hi)

    def le(self, terms, rhs: float) -> None:
        self.row(terms, -INF, rhs)

    def ge(self, terms, rhs: float) -> None:
        self.row(terms, rhs, INF)

    def eq(self, terms, rhs: float) -> None:
        self.row(terms, rhs, rhs)

    # ---- solving ------------------------------------------------------------------------
    def solve(self, backend: str = "highs", time_limit: float = 60.0, gap: float = 1e-9,
              cutoff: float | None = None, msg: bool = False, node_limit: int | None = None,
              work_limit: int | None = None) -> MilpResult:
        """Solve; ``node_limit`` caps branch-and-bound nodes and ``work_limit`` the counted
        work (``MilpResult.work``: the root's cuts and heuristics, where no node is counted,
        included): work limits, so deterministic; ``time_limit`` is a last-resort stop."""
        if backend == "highs":
            return self._solve_highs(time_limit, gap, cutoff, msg, node_limit, work_limit)
        if backend in ("pulp-cbc", "pulp-highs"):
            return self._solve_pulp(backend, time_limit, gap, cutoff, msg)
        raise ValueError(f"unknown solver back end '{backend}'; available: {', '.join(available_backends())}")

    def _solve_highs(self, time_limit, gap, cutoff, msg, node_limit=None, work_limit=None) -> MilpResult:
        t0 = time.perf_counter()
        import highspy
        h = _new_highs(msg)
        h.setOptionValue("output_flag", bool(msg))
        h.setOptionValue("time_limit", float(time_limit))
        h.setOptionValue("mip_rel_gap", float(gap))
        h.setOptionValue("mip_abs_gap", 1e-12)
        h.setOptionValue("random_seed", 0)
        h.setOptionValue("threads", 1)
        if node_limit is not None:
            h.setOptionValue("mip_max_nodes", int(node_limit))
        # Light presolve: full presolve probes every binary of a large column program and
        # ignores the time limit while doing so (minutes on 10k columns).
        h.setOptionValue("presolve_mode", 2)
        if cutoff is not None and math.isfinite(cutoff):
            h.setOptionValue("objective_bound", float(cutoff))
        inf = highspy.kHighsInf
        n = self.num_vars
        lb = np.array([(-inf if v == -INF else v) for v in self.lb], dtype=np.float64)
        ub = np.array([(inf if v == INF else v) for v in self.ub], dtype=np.float64)
        h.addVars(n, lb, ub)
        h.changeColsCost(n, np.arange(n, dtype=np.int32), np.array(self.obj, dtype=np.float64))
        ints = np.array([i for i, f in enumerate(self.integer) if f], dtype=np.int32)
        if len(ints):
            h.changeColsIntegrality(len(ints), ints, np.full(len(ints), highspy.HighsVarType.kInteger))
        starts = np.zeros(self.num_rows, dtype=np.int32)
        pos = 0
        for r, idx in enumerate(self.rows_idx):
            starts[r] = pos
            pos += len(idx)
        index = np.fromiter((i for idx in self.rows_idx for i in idx), dtype=np.int32, count=pos)
        value = np.fromiter((v for vals in self.rows_val for v in vals), dtype=np.float64, count=pos)
        lo = np.array([(-inf if v == -INF else v) for v in self.rows_lo], dtype=np.float64)
        hi = np.array([(inf if v == INF else v) for v in self.rows_hi], dtype=np.float64)
        h.addRows(self.num_rows, lo, hi, pos, starts, index, value)
        checks = [0]
        most = None if work_limit is None else max(1, int(work_limit) // max(1, pos))

        def check(event) -> None:
            checks[0] += 1
            if most is not None and checks[0] >= most:
                event.data_in.user_interrupt = True
        if self.num_integer:
            h.cbMipInterrupt.subscribe(check)
        if h.run() == highspy.HighsStatus.kError:  # (a scheduler another library set up: ours, once)
            highspy.Highs.resetGlobalScheduler(True)
            h.run()
        st = h.getModelStatus()
        info = h.getInfo()
        S = highspy.HighsModelStatus
        has_sol = info.primal_solution_status == 2  # kSolutionStatusFeasible
        x = np.array(h.getSolution().col_value) if has_sol else None
        obj = info.objective_function_value if has_sol else INF
        bound = info.mip_dual_bound if self.num_integer else obj
        if st == S.kOptimal:
            status = "optimal"
            if not self.num_integer:
                bound = obj
        elif st in (S.kInfeasible, S.kObjectiveBound):
            status, x, obj = "infeasible", None, INF
            bound = cutoff if cutoff is not None else INF
        elif has_sol:
            status = "feasible"
        else:
            status = "no_solution"
        if bound is None or (isinstance(bound, float) and math.isnan(bound)):
            bound = -INF
        return MilpResult(status, x, obj, bound, time.perf_counter() - t0, "highs", st == S.kTimeLimit, checks[0], pos)

    def to_pulp(self):
        import pulp
        prob = pulp.LpProblem("hetalloc", pulp.LpMinimize)
        xs = [prob.add_variable(f"x{i}", None if self.lb[i] == -INF else self.lb[i],
                                None if self.ub[i] == INF else self.ub[i],
                                pulp.LpInteger if self.integer[i] else pulp.LpContinuous)
              for i in range(self.num_vars)]
        prob += pulp.lpSum(c * xs[i] for i, c in enumerate(self.obj) if c)
        for r in range(self.num_rows):
            expr = pulp.LpAffineExpression([(xs[i], v) for i, v in zip(self.rows_idx[r], self.rows_val[r])])
            lo, hi = self.rows_lo[r], self.rows_hi[r]
            if lo == hi:
                prob += expr == lo
            else:
                if lo != -INF:
                    prob += expr >= lo
                if hi != INF:
                    prob += expr <= hi
        return prob, xs

    def _solve_pulp(self, backend, time_limit, gap, cutoff, msg) -> MilpResult:
        import pulp
        t0 = time.perf_counter()
        prob, xs = self.to_pulp()
        if cutoff is not None and math.isfinite(cutoff):
            prob += pulp.lpSum(c * xs[i] for i, c in enumerate(self.obj) if c) <= cutoff
        if backend == "pulp-cbc":
            import warnings
            with warnings.catch_warnings():  # the CBC bundled with PuLP 3.x warns about PuLP 4
                warnings.simplefilter("ignore", DeprecationWarning)
                solver = pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit, gapRel=gap, threads=1)
        else:
            solver = pulp.HiGHS(msg=msg, timeLimit=time_limit, gapRel=gap)
        prob.solve(solver)
        status = pulp.LpStatus[prob.status]
        has_sol = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        x = np.array([v.value() or 0.0 for v in xs]) if has_sol else None
        val = pulp.value(prob.objective) if has_sol else None
        obj = (float(val) if val is not None else 0.0) if has_sol else INF
        if status == "Optimal" and prob.sol_status == pulp.LpSolutionOptimal:
            st, bound = "optimal", obj
        elif status == "Infeasible":
            st, bound, x, obj = "infeasible", (cutoff if cutoff is not None else INF), None, INF
        elif has_sol:
            st, bound = "feasible", -INF  # CBC's bound is not exposed through PuLP
            if backend == "pulp-highs":
                bound = prob.solverModel.getInfo().mip_dual_bound
        else:
            st, bound = "no_solution", -INF
        return MilpResult(st, x, obj, bound, time.perf_counter() - t0, backend)
