"""The search: which micro-batch counts M to explore, in what order, and what bound is
proven at the end.

Replicas do not enlarge the plan space: R identical replicas of a count-level plan are
the same computation as one pipeline whose stages have R times the devices and R times
the micro-batch (same stage times, gradient groups and memory). So one program per M
with R = 1 covers the whole plan space.

Models whose inner layers are identical blocks (every transformer) are searched over
stage *shapes* (allocator.shapes). Where the state space of the exact dynamic program
(allocator.dp) is small enough, each M is a branch and bound over the bottleneck and
tail caps (allocator.caps); the boxes of all M share one priority queue, lowest bound
first, so work goes where the proof is still open and the first plans found are the
promising ones. Other M values (too many device vectors) and models with distinct layers
are solved as integer programs (allocator.shape_program, allocator.ilp_columns).

Several plan spaces can be searched as one (the same request with tensor-parallel units
of other sizes, allocator.problem.Problem.tp): each (space, M) pair is a state of the one
queue, so the work goes to whichever space still has the lowest bound.

Work is measured, not timed: the search stops when the proven gap is at most ``gap``,
or when it has spent its budget of dynamic-program evaluations and solver nodes (a
number derived from the time limit), so the same inputs give the same plan on any
machine. The wall clock only stops it as a last resort; the result then says so.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from .ahead import AHEAD_RANGES, Builder, enabled as ahead_enabled
from .bounds import block_bound
from .caps import WORK_PER_EVALUATION, Box, CapSearch
from .lagrange import lagrange_bound
from .columns import Column, ColumnMemo, enumerate_columns
from .dp import STATE_LIMIT, StageTable
from .ilp_columns import solve_columns
from .milp import MilpResult
from .problem import CountPlan, CountStage, Problem, StageTimer, divisors, evaluate_counts
from .shapes import FIRST, INNER, LAST, ONLY, Shape, ShapeSet, block_shapes, count_plan, order_stages
from . import shape_program

GRID_LIMIT = 400_000
"""Device-count vectors one stage range may have (per replica) for its shapes to be built."""

CHUNKS = (1, 2, 3, 4, 6, 8)
"""Blocks per stage in multiples of these, in the coarse plan spaces of very deep models."""

MAX_COLUMNS = 200_000
"""Stage columns (ranges or shapes) one M may have; beyond it that M is left unproven."""

EVALS_PER_SECOND = 60
"""Dynamic-program evaluations the search may spend per second of its time limit
(measured on the 2-core development machine: 40-200 per second on 16-64 GPUs). A work
budget, not a clock."""

BUDGET_SHARE = 0.4
"""Share of the time limit the work budget is sized to fill on the development machine (at
the rates above): the rest is the margin for work not counted and a busier or slower
machine, before the wall clock, the last resort, would decide the result. The rates were
fitted where a 60 s budget at 0.85 took 40-54 s; on another machine of the same kind
(2 cores, its neighbours' load moving a single-thread matmul between 0.47 and 0.91 ms)
the same budget took 61.6 s (mix-256 x GPT-3 1.3B) and 90.6 s (fleet-1024 x GPT-3 6.7B):
1.5-1.7x; there every kind of work, once counted in full (allocator.dp.CELL_WEIGHT,
SHAPES_PER_EVAL), ran at 21-45 evaluations a second (fleet-1024 x GPT-3 1.3B v2: 1,789
in 51 s), so a budget at 0.5 filled ~90 % of the limit and the first pass's share
(PLAIN_SHARE) ran into its clock. At 0.4 it filled 58-80 % there (the solve-time runs'
slowest rows 35.0 s v1 and 45.8 s v2; fleet-1024 x GPT-3 1.3B v2 timed alone 47.7 s)."""

BUILD_CELLS_PER_SECOND = 1_500_000
"""Count vectors x stage kinds of shapes the search may build per second of its time
limit (measured on the 2-core development machine: ~1.5 million per second building the
shapes of 100,000 A100s at 500,000 samples per micro-batch). A work bound, not a clock:
a build that alone would take more than the whole time limit is not made (its
micro-batch count keeps its cheap bound and its restricted spaces are searched instead)."""

SHAPES_PER_EVAL = 500
"""Shapes built (allocator.shapes.block_shapes) charged as one evaluation of the work budget
(measured on the 2-core development machine: 28-49 us per shape kept, the columns pruned
on the way included, ~15-20 ms per build besides). The charge is the same whichever
process built them (determinism); it was half, taking the build-ahead worker
(allocator.ahead) to make about half of them, but at 1024 GPUs it made few (0.4 of 60 CPU
seconds on fleet-1024 x GPT-3 1.3B v2, where the builds ran at 18.5 evaluations a second
against ~33 for the Lagrangian bounds): now charged in full."""

NODES_PER_SECOND = 150
"""Branch-and-bound nodes an integer program may use per second of its share of the time
limit (HiGHS explores ~150-400 nodes/s on these programs here)."""


PROGRAM_WORK_PER_SECOND = 300_000
"""An integer program's counted work (allocator.milp.MilpResult.work: the solver's interrupt
checks x the program's nonzeros) per second (measured on the 2-core development machine:
0.3-0.5 million on programs of 7,000-40,000 rows, more on small ones). A program may use
its share of the time limit in this work, which is charged to the search's budget."""


POOL = 8
"""Plans the search keeps besides its best: the placed prediction chooses among them."""


@dataclass
class MState:
    """What is known about one value of M of one plan space (``Search.probs[k]``)."""

    M: int
    k: int = 0
    prob: Problem | None = None
    bound: float = -math.inf
    status: str = "open"  # open | optimal | pruned | infeasible | limit | too_large
    seconds: float = 0.0
    caps: CapSearch | None = None
    shapes: ShapeSet | None = None
    cols: list[Column] | None = None
    built: bool = False
    R: int = 1
    """Replicas of the plans searched: 1, or more when the whole cluster's program is too
    large (then only plans of R identical replicas are searched, for plans, not bounds)."""
    coarse: bool = False
    """Only a part of the plan space is searched (replicas, device counts in units): its
    boxes give plans, not bounds."""
    root: Box | None = None
    lagged: float | None = None
    """The incumbent target its Lagrangian bound (in ``bound``) was computed for, if it was
    (allocator.lagrange)."""
    restrictions: list = field(default_factory=list)
    """(CapSearch, R, root box) of each restricted plan space searched for plans."""


@dataclass
class SearchResult:
    best: CountPlan | None
    bound: float
    status: str  # optimal | time_limit | infeasible
    seconds: float
    solves: list[dict] = field(default_factory=list)
    stopped_by_clock: bool = False
    prob: Problem | None = None
    """The plan space the best plan belongs to (its Problem: tensor-parallel units)."""
    pool: list[tuple[CountPlan, Problem]] = field(default_factory=list)
    """The best distinct plans found (at most POOL, best first, the best included), each
    with its space."""

    @property
    def gap(self) -> float:
        if self.best is None or not math.isfinite(self.best.objective_s) or not math.isfinite(self.bound):
            return math.inf
        return max(0.0, (self.best.objective_s - self.bound) / self.best.objective_s)


class Search:
    """One search over the union of the plan spaces of ``probs`` (the same request with
    other tensor-parallel units): every (space, M) pair is a state; they share one queue,
    one incumbent and one work budget."""

    def __init__(self, probs: list[Problem], time_limit: float, gap: float, backend: str, msg: bool,
                 progress: Callable[[str], None] | None, seeds: list[tuple[CountPlan, Problem]] = (),
                 deadline: float | None = None, memos: dict[int, ColumnMemo] | None = None,
                 builder: Builder | None = None, pass_id: int = 0, plans_only: bool = False):
        self.probs, self.gap, self.backend, self.msg = probs, gap, backend, msg
        self.builder, self.pass_id = builder, pass_id
        """Shapes built ahead in a second process (allocator.ahead), and this pass's number there."""
        self.tau_known: dict[tuple[int, int], float] = {}
        """Per (space, M): the bottleneck of a plan known before the search (the first pass's
        least bottleneck of the plans without recomputation, for the space they belong to)."""
        self.tau_found: dict[tuple[int, int], float] = {}
        """Per (space, M): the least bottleneck of its whole-cluster plans, where computed."""
        self.memos = memos or {}
        """Column memos by id() of a space (allocator.columns.ColumnMemo): the first pass's
        columns of its space, for the second pass's space of the same cost model."""
        self.best_prob: Problem | None = None
        self.time_limit = time_limit
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + time_limit if deadline is None else min(deadline, self.t0 + time_limit)
        """The wall clock's last-resort stop (the work budget below is what normally stops it)."""
        self.say = progress or (lambda s: None)
        self.best: CountPlan | None = None
        self.log: list[dict] = []
        self.stopped_by_clock = False
        self.evals_left = max(20, int(EVALS_PER_SECOND * BUDGET_SHARE * time_limit))
        self.plans_only = plans_only
        """A search for plans only (the first pass's: its bounds are not the answer's): no
        Lagrangian bounds but the screens that prune an M's boxes (``screen``; they only
        prune, and took 46 % of the evaluations of fleet-1024 x GPT-3 6.7B v1), no reserve
        for ``settle``, no ``deepen``, and each M's restricted spaces get a fair share of
        the budget (``restricted``); what it leaves of its budget goes to the next pass."""
        self.reserve = 0 if plans_only else int(RESERVE_SHARE * self.evals_left)
        """The budget kept for ``settle``: the builds and the boxes stop where it begins."""
        self.cells_limit = BUILD_CELLS_PER_SECOND * max(1.0, time_limit)
        """Most count vectors x stage kinds one build of shapes may take (allocator.columns)."""
        self.states: dict[tuple[int, int], MState] = {}
        self.unresolved: list[float] = []
        self.heap: list[tuple] = []
        self.use_lagrange = True
        self.pending: dict[tuple[int, int], float] = {}
        """M values not built yet, with their cheap bounds."""
        self._said = (math.inf, -math.inf)
        self.pool: list[tuple] = []
        self.pool_keys: set[tuple] = set()
        for plan, p in seeds:  # plans known before the search (of one of its spaces)
            self.offer(CountPlan(plan.R, plan.M, list(plan.stages)), p)

    # ---- bookkeeping ----------------------------------------------------------------------
    @property
    def incumbent(self) -> float:
        return self.best.objective_s if self.best else math.inf

    def offer(self, plan: CountPlan | None, prob: Problem) -> float:
        """Make plan (of prob's space) the incumbent if it is better; its objective (inf if
        infeasible)."""
        if plan is None:
            return math.inf
        plan = evaluate_counts(prob, plan)
        if math.isfinite(plan.objective_s):
            self.keep(plan, prob)
        if math.isfinite(plan.objective_s) and plan.objective_s < self.incumbent * (1 - 1e-12):
            self.best, self.best_prob = plan, prob
            self.report()
        return plan.objective_s

    def keep(self, plan: CountPlan, prob: Problem) -> None:
        """Remember the POOL best distinct plans offered (for the placed prediction to choose
        among, allocator.api)."""
        key = (id(prob), plan.M, tuple((s.start, s.stop, s.counts, s.recompute) for s in plan.stages))
        if key in self.pool_keys:
            return
        if len(self.pool) >= POOL and plan.objective_s >= self.pool[-1][0]:
            return
        self.pool.append((plan.objective_s, len(self.pool_keys), plan, prob, key))
        self.pool_keys.add(key)
        self.pool.sort(key=lambda e: (e[0], e[1]))
        if len(self.pool) > POOL:
            self.pool_keys.discard(self.pool.pop()[4])

    def bound(self) -> float:
        """The proven lower bound: the best plan, or the lowest open box or M."""
        low = self.incumbent
        if self.heap:
            low = min(low, self.heap[0][0])
        if self.unresolved:
            low = min(low, min(self.unresolved))
        if self.pending:
            low = min(low, min(self.pending.values()))
        for st in self.states.values():
            if st.status in ("limit", "too_large"):
                low = min(low, st.bound)
        return low

    def report(self) -> None:
        """One line per improvement: a better plan, or a bound that closed the gap by half a
        percent or more (or closed it)."""
        inc, low = self.incumbent, self.bound()
        said_inc, said_low = self._said
        if inc == said_inc and not (math.isfinite(inc) and low - said_low >= 5e-3 * inc) and \
                not (low == inc and said_low != low):
            return
        self._said = (inc, low)
        gap = (inc - low) / inc if math.isfinite(inc) and math.isfinite(low) else math.inf
        g = f"gap {gap:.2%}" if math.isfinite(gap) else "gap -"
        self.say(f"{time.perf_counter() - self.t0:7.2f}s  best {inc:.6g} s  bound {low:.6g} s  {g}")

    def done(self) -> bool:
        return not self.heap or self.heap[0][0] >= self.target

    # ---- per-M set-up -----------------------------------------------------------------------
    def ahead_ranges(self, st: MState) -> int:
        """The stage kinds (block counts x kinds x recomputation choices) of st's exact
        build if it may be built (as ``build`` rules), else 0."""
        prob = st.prob
        if not prob.interchangeable_blocks:
            return 0
        b, grid = prob.global_batch // st.M, 1
        for c in prob.classes:
            grid *= min(c.count, b) + 1
        ranges = (3 * (prob.L - 2) + 3) * len(prob.recompute_options)
        return ranges if grid <= GRID_LIMIT and grid * ranges <= self.cells_limit else 0

    def ahead(self, order: list, n: int, cheap: dict) -> None:
        """Keep the worker (allocator.ahead) building: the next count the search will build
        after the one at n — the one after that if the worker built n's (the search
        builds the next one itself meanwhile)."""
        if self.builder is None or self.builder.busy():
            return
        skip = 1 if self.builder.submitted((self.pass_id, *order[n])) else 0
        for key in order[n + 1:]:
            st = self.states[key]
            if st.status != "open" or st.built or cheap[key] >= self.target or \
                    self.builder.submitted((self.pass_id, *key)) or self.ahead_ranges(st) < AHEAD_RANGES:
                continue
            if skip:
                skip -= 1
                continue
            self.builder.submit((self.pass_id, *key), self.incumbent / st.M if math.isfinite(self.incumbent)
                                else math.inf)
            return

    def build(self, st: MState) -> None:
        t0 = time.perf_counter()
        prob, M = st.prob, st.M
        st.built = True
        timer = StageTimer(prob, prob.global_batch // M)
        t_cap = self.incumbent / M if math.isfinite(self.incumbent) else math.inf
        if prob.interchangeable_blocks:
            # The whole cluster (R = 1, unit 1) if its program is of a workable size, else
            # plans of R identical replicas, device counts in units of 2, 4 or 8 and blocks in
            # chunks (CHUNKS): the first such restriction whose program is workable and has
            # a plan.
            B, K = prob.global_batch, prob.L - 2
            program = None  # the smallest restriction's shapes, for an integer program
            bounded = False
            dead: list[tuple[int, int, int]] = []
            """Restrictions (R, unit, chunk) no plan of which beats the incumbent. A restriction
            whose R, unit and chunk are multiples of a dead one's is a part of its plan space
            (R identical replicas are R / r groups of r; devices in multiples of 8 are in
            multiples of 2; blocks likewise): it is not built."""

            def covered(R: int, unit: int, chunk: int) -> bool:
                return any(R % r == 0 and unit % u == 0 and chunk % c == 0 for r, u, c in dead)
            for R, unit in ((r, g) for r in divisors(B // M) for g in (1, 2, 4, 8)):
                if not (R == 1 and unit == 1) and not bounded and self.use_lagrange:
                    # no exact program for M: its bound is the Lagrangian one (allocator.lagrange),
                    # and the restricted spaces are searched only if it leaves M open
                    bounded = True
                    if st.lagged is None or self.target < st.lagged * (1 - 1e-3):  # (again: its multipliers'
                        self.lagrange(st)  # scale follows the incumbent, now better)
                    if st.bound >= self.target:
                        st.status = "pruned" if math.isfinite(self.incumbent) else "infeasible"
                        break
                if not (R == 1 and unit == 1) and (self.evals_left <= self.reserve or self.clock_stops()):
                    # the restricted spaces are for plans: not past the budget (nor the limit)
                    st.status = "too_large"  # its cheap bound stands
                    break
                b = B // (R * M)
                budgets = [c.count // R for c in prob.classes]
                if unit > 1 and (unit > b or min(budgets) < unit) or covered(R, unit, 1):
                    continue
                grid = 1
                for n in budgets:
                    grid *= min(n, b) // unit + 1
                if grid > GRID_LIMIT:
                    continue
                cells = grid * (3 * K + 3) * len(prob.recompute_options)  # count vectors x stage kinds
                if cells > self.cells_limit:
                    continue  # its shapes alone would take more than the search's work budget
                timer = StageTimer(prob, b)
                exact = R == 1 and unit == 1
                shapes = self.builder.take((self.pass_id, st.k, M), t_cap) if exact and self.builder else None
                if shapes is None:
                    shapes = block_shapes(prob, timer, M, t_cap, R, unit, memo=self.memos.get(id(prob)))
                self.evals_left -= 1 + len(shapes) // SHAPES_PER_EVAL  # (whichever process built them)
                if not shapes:
                    if exact:
                        st.status, st.bound = ("pruned" if math.isfinite(self.incumbent) else "infeasible"), math.inf
                        break
                    dead.append((R, unit, 1))
                    continue
                if program is None:
                    program = (R, unit, shapes)
                for chunk in [g for g in CHUNKS if K % g == 0] if not exact else [1]:
                    if not exact and (min_stages(shapes, K, chunk) * unit > sum(budgets) or covered(R, unit, chunk)):
                        continue  # too few units for the stages memory needs, or part of a dead restriction
                    table = StageTable.of_shapes(shapes, budgets, prob.L, STATE_LIMIT, unit, chunk)
                    if table is None:
                        continue
                    caps = CapSearch(M, table)
                    if exact:
                        st.caps = caps
                        break
                    root = self.root_of(st, caps, R, restricted=True)
                    if root is not None:
                        st.restrictions.append((caps, R, root))
                        st.caps, st.R, st.root, st.coarse, st.status = caps, R, root, True, "too_large"
                        break
                    if not caps.gave_up:
                        dead.append((R, unit, chunk))
                # the first restriction of each kind: replicas (R > 1, single units: each
                # replica's program exact) and units of several devices (R = 1)
                if st.caps is not None and (exact or {r > 1 for _, r, _ in st.restrictions} == {True, False}
                                            or len(st.restrictions) >= 2):
                    break
            else:
                # No workable dynamic program: the integer program over the shapes of the
                # least restricted plan space whose shapes could be built.
                st.status = "too_large"
                if program is not None and not covered(program[0], program[1], 1):
                    st.R, unit, st.shapes = program
                    st.coarse = st.R > 1 or unit > 1
        else:
            cols = enumerate_columns(prob, timer, 1, M, t_cap, MAX_COLUMNS)
            if cols is None:
                st.status = "too_large"
            elif not cols:
                st.status, st.bound = ("pruned" if math.isfinite(self.incumbent) else "infeasible"), math.inf
            else:
                table = StageTable.of_columns(cols, [c.count for c in prob.classes], prob.L, STATE_LIMIT)
                if table is not None:
                    st.caps = CapSearch(M, table)
                else:
                    st.cols = cols
        st.seconds += time.perf_counter() - t0

    def solve_program(self, st: MState) -> None:
        """An M without a dynamic program: its integer program, within a work budget (nodes
        and the solver's counted work, charged to the search's budget)."""
        t0 = time.perf_counter()
        prob, M, inc = st.prob, st.M, self.incumbent
        share = self.time_limit / max(1, len(self.states))
        # (the clock's limit, the last resort, is a quarter of the search's: one program had
        # taken 27 of 60 s on mix-256 x GPT-3 13B v2; its work limit is what stops it)
        limit = max(0.5, min(self.time_limit / 4, self.deadline - time.perf_counter()))
        nodes = max(50, int(NODES_PER_SECOND * share))
        work = int(min(share, max(0, self.evals_left) / EVALS_PER_SECOND) * PROGRAM_WORK_PER_SECOND)
        res: MilpResult | None
        if st.shapes is not None:
            res, chosen = shape_program.solve(prob, st.shapes, M, incumbent=inc, time_limit=limit,
                                              gap=min(self.gap, 1e-9), backend=self.backend, msg=self.msg,
                                              node_limit=nodes, budgets=[c.count // st.R for c in prob.classes],
                                              work_limit=work)
            if chosen:
                seq = order_stages(prob, chosen)
                if seq is not None:
                    self.offer(count_plan(prob, seq, M, st.R), prob)
        else:
            res, plan, _, _ = solve_columns(prob, st.cols, 1, M, incumbent=inc, time_limit=limit,
                                            gap=min(self.gap, 1e-9), backend=self.backend, msg=self.msg,
                                            node_limit=nodes, work_limit=work)
            self.offer(plan, prob)
        if res is not None:
            self.evals_left -= 1 + res.work * EVALS_PER_SECOND // PROGRAM_WORK_PER_SECOND
        inc = self.incumbent
        if st.coarse:  # a restricted plan space: plans, no bound for M
            self.stopped_by_clock |= res is not None and res.time_hit
        elif res is None or res.status == "infeasible":
            st.status, st.bound = ("pruned" if math.isfinite(inc) else "infeasible"), inc
        elif res.status == "optimal":
            st.status, st.bound = "optimal", min(res.objective, inc)
        else:
            st.status, st.bound = "limit", max(st.bound, res.bound)  # (its Lagrangian bound may be higher)
            self.stopped_by_clock |= res.time_hit
        st.seconds += time.perf_counter() - t0
        self.log.append({"M": M, "tp": prob.tp, "step": "program", "status": st.status, "bound": st.bound,
                         "seconds": round(st.seconds, 3)})

    @property
    def target(self) -> float:
        """What a plan must beat to matter: the incumbent less the gap asked for, and less
        the 1e-12 by which ``offer`` wants a plan better (a box whose bound is the
        incumbent's own cost summed in another order, an ulp below it, is closed: lab-16 x
        GPT-3 2.7B v2 spent 1.3 of 3.6 s on a Lagrangian bound for such a box)."""
        inc = self.incumbent
        return inc * (1 - self.gap) - 1e-12 * inc if math.isfinite(inc) else inc

    def lagrange(self, st: MState, quick: bool = False, deep: bool = False, share: float = 1 / 8) -> bool:
        """Raise st's bound to its Lagrangian bound (allocator.lagrange) against the current
        target, its counted work charged to the budget; is st settled by it (bound at least
        the target)? quick: the first multipliers only (also where there is no target
        yet); deep: memory told apart at every depth where it changes, and the largest
        tail; share: its ascents stop after this share of the budget left."""
        target = self.target
        t0 = time.perf_counter()
        meter = [0]
        timer = StageTimer(st.prob, st.prob.global_batch // st.M)
        full = not quick and math.isfinite(target)
        bound = lagrange_bound(st.prob, timer, st.M, stop_at=target, quick=not full, meter=meter, deep=deep,
                               work=share * max(0, self.evals_left) * LAGRANGE_WORK_PER_EVAL, deadline=self.deadline)
        self.clock_stops()
        self.evals_left -= 1 + meter[0] // LAGRANGE_WORK_PER_EVAL
        st.bound = max(st.bound, bound)
        if full:
            st.lagged = target
        st.seconds += time.perf_counter() - t0
        return st.bound >= target

    def screen(self, st: MState) -> bool:
        """Is st settled by its quick Lagrangian bound? (then pruned, and logged.) In a
        search for plans only, only where M's whole-cluster program may be built: there
        the bound also prunes the boxes of M's branch and bound (mix-64 x GPT-3 1.3B v2's
        first pass: bounds 2.12-2.38 against a target of 2.78, none settled, and without
        them a plan 2 % slower); where only restricted spaces are searched it prunes
        nothing (fleet-1024 x GPT-3 175B's first pass: 189 of its 576 evaluations)."""
        if self.plans_only and not exact_fits(st.prob, st.M):
            return False
        if not self.lagrange(st, quick=True):
            return False
        st.status = "pruned"
        self.log.append({"M": st.M, "tp": st.prob.tp, "step": "screen", "status": "pruned", "bound": st.bound,
                         "seconds": round(st.seconds, 3)})
        return True

    def root_of(self, st: MState, caps: CapSearch, R: int = 1, restricted: bool = False) -> Box | None:
        """caps.root() within the incumbent, the plan found on the way offered (plans of R
        replicas); its evaluations come from the work budget, and its bottleneck program
        may take at most an eighth of what is left of it (one uninterruptible program had
        run 24-95 s past a 60 s limit); in a restricted space (plans only) so may its
        first program (None, caps.gave_up set, when it gives up)."""
        before = caps.evaluations
        cap = max(0, self.evals_left) * WORK_PER_EVALUATION // 8
        root, seq = caps.root(self.target, cap, cap if restricted else None,
                              self.tau_known.get((st.k, st.M), math.inf) if not restricted else math.inf)
        self.evals_left -= caps.evaluations - before
        if not restricted and caps.tau_min == caps.tau_min:
            self.tau_found[(st.k, st.M)] = caps.tau_min
        if seq is not None:
            self.offer_seq(st, seq, R)
        return root

    def offer_seq(self, st: MState, seq: list, R: int | None = None) -> float:
        """Offer the count-level plan of options from the first stage to the last (of R
        replicas; default st.R)."""
        R = st.R if R is None else R
        if isinstance(seq[0], Shape):
            plan = count_plan(st.prob, seq, st.M, R)
        else:
            plan = CountPlan(R, st.M, [CountStage(c.i, c.j, c.counts, c.recompute) for c in seq])
        return self.offer(plan, st.prob)

    def restricted(self, st: MState, later: int = 0) -> None:
        """Plans of R identical replicas, or of units of several devices, for an M whose
        whole-cluster program is too large: the same branch and bound within each
        restriction (st.restrictions), for plans only (its bounds hold for the restricted
        plans, not for M). Work comes from the same budget, shared between them; in a
        search for plans only, M takes at most its fair part of what is left, shared with
        the ``later`` states still to be built (without it the first, largest M values took
        the budget, and the smaller ones, where the best plans of the largest clusters lie,
        were not reached: fleet-1024 x GPT-2 XL's first pass spent 100 of its 486
        evaluations on M = 1024 and ended before M = 16's restricted spaces, where the
        single-pass search found a plan 16 % faster)."""
        spare = max(0, self.evals_left - self.reserve)
        floor = self.evals_left - spare // (1 + later) if self.plans_only else self.evals_left - spare
        for n, (caps, R, root) in enumerate(st.restrictions):
            share = max(0, self.evals_left - floor) // (len(st.restrictions) - n)
            stop = self.evals_left - share
            heap = [(-math.inf, root)]
            while heap and self.evals_left > stop and not self.clock_stops():
                lb, box = heapq.heappop(heap)
                if lb >= self.target:
                    break
                t0 = time.perf_counter()
                before = caps.evaluations
                ev, seq = caps.evaluate(box, self.incumbent)
                self.evals_left -= max(1, caps.evaluations - before)
                if seq is not None:
                    self.offer_seq(st, seq, R)
                st.seconds += time.perf_counter() - t0
                if ev.lb < self.target:
                    for child in caps.split(ev):
                        if child.lb < self.target:
                            heapq.heappush(heap, (child.lb, child))

    def expand(self, st: MState, box: Box, first: bool = False) -> None:
        """Evaluate a box (offering its plan) and queue its halves if it is still open."""
        key = (st.k, st.M)
        if first:  # the M's cheap bound stands until its root box is in the queue
            self.pending[key] = max(self.pending.get(key, -math.inf), st.bound)
        t0 = time.perf_counter()
        before = st.caps.evaluations
        ev, seq = st.caps.evaluate(box, self.incumbent)
        self.evals_left -= max(1, st.caps.evaluations - before)  # (a remembered evaluation: one)
        # (no plan: the evaluation was remembered, its plan offered when first found)
        found = self.offer_seq(st, seq) if seq is not None else -math.inf
        st.seconds += time.perf_counter() - t0
        if ev.lb < self.target:
            corner = st.caps.corner_cost(ev)  # (its plan costs more than the caps say: still open)
            if found > corner * (1 + 1e-9) and corner < self.target:
                self.unresolved.append(corner)
            for child in st.caps.split(ev):
                lb = max(child.lb, st.bound)  # (M's own bound holds for every box of it)
                if lb < self.target:
                    heapq.heappush(self.heap, (lb, 1, child.b - child.a + child.d - child.c, key, child))
        self.report()

    def clock_stops(self) -> bool:
        """Has the wall clock (the last resort) passed the deadline? (then recorded)"""
        if time.perf_counter() <= self.deadline:
            return False
        self.stopped_by_clock = True
        return True

    def holding(self) -> dict[tuple[int, int], float]:
        """Per open state: the lowest bound it holds the proof at (its pending cheap bound,
        its lowest queued box, its own bound where it has no program)."""
        out: dict[tuple[int, int], float] = dict(self.pending)
        for lb, _, _, key, _ in self.heap:
            out[key] = min(out.get(key, math.inf), lb)
        for key, st in self.states.items():
            if st.status in ("limit", "too_large"):
                out[key] = min(out.get(key, math.inf), st.bound)
        return out

    def settle(self) -> None:
        """The reserve of the budget (and what else is left): a state the search left
        holding the bound below the target (not built, or its boxes still queued) gets its
        Lagrangian bound if it has no full one yet (each within an eighth of the budget
        left), lowest first; a state the bound settles is pruned. Without it, the states
        the budget did not reach held the proven bound at their cheap bounds (mix-256 x
        GPT-3 13B v2: 2.1 s against a plan of 6.7 s)."""
        tried: set = set()
        while self.evals_left > 0 and not self.clock_stops():
            target = self.target
            open_ = sorted((v, key) for key, v in self.holding().items()
                           if v < target and key not in tried and self.states[key].lagged is None
                           and self.states[key].prob.interchangeable_blocks)
            if not open_:
                return
            _, key = open_[0]
            tried.add(key)
            st = self.states[key]
            settled = self.lagrange(st)
            if key in self.pending:
                self.pending[key] = max(self.pending[key], st.bound)
            if settled:
                st.status = "pruned"
                self.pending.pop(key, None)
            self.heap = [(max(e[0], st.bound), *e[1:]) if e[3] == key else e for e in self.heap
                         if not (settled and e[3] == key)]
            heapq.heapify(self.heap)
            self.report()

    def deepen(self) -> None:
        """The budget left once the plans are searched goes to the bounds that hold the
        proof back: the micro-batch counts without an exact program, lowest bound first,
        get the deep Lagrangian bound (memory at every depth where it changes), until the
        gap is closed or the budget spent. Only work the plans did not need."""
        done: set = set()
        while self.evals_left > 0 and not self.clock_stops():
            target = self.target
            open_ = [(st.bound, key) for key, st in self.states.items() if key not in done and
                     st.status in ("limit", "too_large") and st.prob.interchangeable_blocks and st.bound < target]
            if not open_ or (self.heap and self.heap[0][0] < min(open_)[0]):
                return  # (a box still open below them: the proof is held back elsewhere)
            _, key = min(open_)
            done.add(key)
            st = self.states[key]
            if self.lagrange(st, deep=True, share=1 / 2):
                st.status = "pruned"
            self.report()

    # ---- the search -------------------------------------------------------------------------
    def run(self) -> SearchResult:
        # Every (space, M) gets a cheap bound (allocator.bounds); M values that cannot fit in
        # memory are done. Then, smallest micro-batches first (their programs are the
        # smallest), each (space, M) is built, its smallest feasible bottleneck found and
        # the plan with the least stage-time sum at that bottleneck offered (usually close
        # to the best of that M), states whose bound reaches the incumbent by then being
        # done; after that boxes are taken lowest bound first across all states.
        cheap: dict[tuple[int, int], float] = {}
        for k, prob in enumerate(self.probs):
            for M in sorted({M for R, M in prob.candidates() if R == 1}):
                st = self.states[(k, M)] = MState(M, k, prob)
                cheap[(k, M)] = -math.inf
                if prob.interchangeable_blocks and time.perf_counter() < self.deadline:
                    t0 = time.perf_counter()
                    timer = StageTimer(prob, prob.global_batch // M)
                    cheap[(k, M)] = st.bound = block_bound(prob, timer, M)
                    st.seconds += time.perf_counter() - t0
                    if not math.isfinite(cheap[(k, M)]):
                        st.status = "infeasible"
        # The M values without an exact program: their Lagrangian bounds now, before any
        # search spends the budget (allocator.lagrange), the fewest micro-batches first
        # (their block bounds are the weakest), within LAGRANGE_SHARE of the work budget.
        # Only where they can cover every such M (LAGRANGE_STATES): the bound is the lowest
        # over all M, so a few bounded ones do not move it, and their work is the plans'.
        floor = self.evals_left * (1 - LAGRANGE_SHARE)
        large = [key for key, st in self.states.items() if st.status != "infeasible" and
                 st.prob.interchangeable_blocks and not exact_fits(st.prob, st.M)]
        self.use_lagrange = not self.plans_only and len(large) <= LAGRANGE_STATES
        for key in sorted(large if self.use_lagrange else [], key=lambda km: (km[1], km[0])):
            st = self.states[key]
            if self.evals_left <= floor or self.clock_stops():
                break
            self.lagrange(st)
            cheap[key] = st.bound
            if not math.isfinite(cheap[key]):
                st.status = "infeasible"
        if math.isfinite(self.target) and large:
            # With a plan known beforehand (a seed: the first pass's plan) on a cluster where
            # some states have no exact program, every state first gets its quick Lagrangian
            # bound, lowest cheap bound first: many are settled by it (~0.1 s each), and the
            # search's time goes to the others (on mix-256 x GPT-3 13B v2 the states left
            # unbuilt when the time ran out held the bound at their cheap bounds, 80 % below
            # the plan).
            screen_floor = self.evals_left * (1 - LAGRANGE_SHARE)
            for key in sorted(self.states, key=lambda km: (cheap[km], km[1], km[0])):
                st = self.states[key]
                if st.status != "open" or not st.prob.interchangeable_blocks or cheap[key] >= self.target:
                    continue
                if self.evals_left <= screen_floor or self.clock_stops():
                    break
                self.screen(st)
                cheap[key] = max(cheap[key], st.bound)
        self.pending = {key: cheap[key] for key, st in self.states.items() if st.status != "infeasible"}
        B = self.probs[0].global_batch
        order = sorted(self.states, key=lambda km: (B // km[1], km[1], km[0]))
        for n, key in enumerate(order):
            st = self.states[key]
            if st.status == "infeasible":
                continue
            self.ahead(order, n, cheap)
            if cheap[key] >= self.target:
                st.status = "pruned"
                self.pending.pop(key, None)
                continue
            if self.evals_left <= self.reserve or self.clock_stops():
                # the budget spent (or, the last resort, the clock): its cheap bound stands
                cheap[key] = self.pending[key] = max(cheap[key], st.bound)
                heapq.heappush(self.heap, (cheap[key], 0, 0, key, None))
                continue
            if st.prob.interchangeable_blocks and math.isfinite(self.target) and \
                    SCREEN_VECTORS <= vectors(st.prob, st.M) and self.screen(st):
                # settled by its quick Lagrangian bound before anything is built (~0.1 s
                # against ~1 s of shapes and program on mix-64 x GPT-3 1.3B v2)
                self.pending.pop(key, None)
                continue
            self.build(st)
            if st.caps is not None and st.coarse:
                self.restricted(st, sum(self.states[km].status == "open" for km in order[n + 1:]))
            elif st.caps is not None:
                root = self.root_of(st, st.caps)
                if root is None:
                    st.status = "pruned" if math.isfinite(self.incumbent) else "infeasible"
                else:
                    _, seq = st.caps.g(root.a, root.d, math.inf)
                    if seq is not None:
                        self.offer_seq(st, seq)
                    self.expand(st, root, first=True)
            elif st.shapes is not None or st.cols is not None:
                self.solve_program(st)
            self.pending.pop(key, None)
            self.report()
        while not self.done():
            if self.clock_stops():
                break
            lb, _, _, key, box = heapq.heappop(self.heap)
            st = self.states[key]
            if box is None:  # left unbuilt (the budget or the clock)
                continue
            if self.evals_left <= self.reserve:
                heapq.heappush(self.heap, (lb, 1, 0, key, box))
                break
            self.expand(st, box)
        if not self.plans_only:
            self.settle()
            self.deepen()
        for st in self.states.values():
            if st.caps is not None and not st.coarse:
                st.status = "searched"
        bound = self.bound()
        elapsed = time.perf_counter() - self.t0
        for st in self.states.values():
            self.log.append({"M": st.M, "tp": st.prob.tp, "step": "summary", "status": st.status,
                             "bound": st.bound, "evaluations": st.caps.evaluations if st.caps else 0,
                             "seconds": round(st.seconds, 3)})
        if self.best is None:
            status = "infeasible" if not math.isfinite(bound) and not self.stopped_by_clock and self.done() \
                else "time_limit"
        else:
            g = (self.best.objective_s - bound) / self.best.objective_s if math.isfinite(bound) else math.inf
            status = "optimal" if g <= self.gap + 1e-12 else "time_limit"
        res = SearchResult(self.best, bound, status, elapsed, self.log, self.stopped_by_clock,
                           self.best_prob or self.probs[0])
        res.pool = [(e[2], e[3]) for e in self.pool]
        res.unresolved = sorted(self.unresolved)[:5]
        res.evals_left = self.evals_left
        return res


LAGRANGE_WORK_PER_EVAL = 250_000
"""Units of a Lagrangian bound's counted work (allocator.lagrange: knapsacks priced, unit
times tabled) charged as one dynamic-program evaluation (~60 per second here, as the
knapsacks run: ~15 million units per second, measured over 79 bounds on mix-256 x
GPT-3 13B v2)."""

RESERVE_SHARE = 0.1
"""Share of the work budget kept for the Lagrangian bounds of the states the search leaves
open (``Search.settle``)."""

LAGRANGE_STATES = 16
"""Most (space, M) states without an exact program for which Lagrangian bounds are used."""

LAGRANGE_SHARE = 0.3
"""Share of the work budget the up-front Lagrangian bounds (before any build) may use."""

SCREEN_VECTORS = 1_000
"""Device vectors from which an exact program's M is first screened by its quick
Lagrangian bound (~0.05-0.4 s, allocator.lagrange) before its shapes are built: below it
the shapes and the program (~0.2 s on lab-16) cost about what the bound does."""


def vectors(prob: Problem, M: int) -> int:
    """Device-count vectors of M's exact program (the whole cluster, single units)."""
    b, grid = prob.global_batch // M, 1
    for c in prob.classes:
        grid *= min(c.count, b) + 1
    return grid


def exact_fits(prob: Problem, M: int) -> bool:
    """Can M's exact program (the whole cluster, single units) be of a workable size? (its
    device-vector grid within GRID_LIMIT; the state count is only known once it is built)"""
    return vectors(prob, M) <= GRID_LIMIT


def min_stages(shapes: ShapeSet, K: int, chunk: int = 1) -> int:
    """The fewest stages a plan of these shapes can have (memory caps the blocks a stage
    holds): one stage if a single stage may hold the model, else a first, a last and
    enough inner stages for the blocks they leave."""
    ok = shapes.blocks % chunk == 0
    if (ok & (shapes.kind == ONLY)).any():
        return 1
    most = {k: int(shapes.blocks[ok & (shapes.kind == k)].max(initial=0)) for k in (INNER, FIRST, LAST)}
    rest = K - most[FIRST] - most[LAST]
    if rest <= 0:
        return 2
    return 2 + (math.ceil(rest / most[INNER]) if most[INNER] else 10 ** 9)


PLAIN_SHARE = 0.4
"""Share of the time limit (so of the work budget) for the first pass (single devices, no
recomputation) where stages may recompute (``search``)."""


def search(prob: Problem | list[Problem], *, time_limit: float = 30.0, gap: float = 0.0, backend: str = "highs",
           msg: bool = False, progress: Callable[[str], None] | None = None,
           seeds: list[tuple[CountPlan, Problem]] = (), deadline: float | None = None) -> SearchResult:
    """The best plan of prob's space (or of the union of several spaces) and its proven bound.

    seeds: count-level plans known beforehand (each with its space), the first incumbents;
    deadline: a ``time.perf_counter()`` value at which the wall clock stops it (last resort).

    Where stages may recompute, recomputation makes small micro-batch counts fit whose
    bounds are weak and whose programs are large; so a first pass searches the smallest
    space (single devices, zero1 if offered) without recomputation, for plans only
    (``Search.plans_only``), with PLAIN_SHARE of the budget, and its plan seeds the search
    of the whole union, which proves the bound."""
    probs = prob if isinstance(prob, list) else [prob]
    if not any("full" in p.recompute_options and len(p.recompute_options) > 1 for p in probs):
        builder = Builder({1: (probs, {})}) if ahead_enabled() else None
        try:
            return Search(probs, time_limit, gap, backend, msg, progress, seeds, deadline, builder=builder,
                          pass_id=1).run()
        finally:
            if builder is not None:
                builder.close()
    # the first pass: single devices (the smallest space, the fastest to search)
    k0 = min(range(len(probs)), key=lambda k: (probs[k].tp, probs[k].optimizer_sharding != "zero1"))
    plain = replace(probs[k0], recompute="none")
    end = time.perf_counter() + time_limit if deadline is None else deadline
    memo = ColumnMemo()  # (the first pass's columns are the second's without recomputation)
    builder = Builder({0: ([plain], {0: memo}), 1: (probs, {k0: memo})}) if ahead_enabled() else None
    try:
        return _two_passes(probs, k0, plain, memo, builder, time_limit, gap, backend, msg, progress, seeds, end)
    finally:
        if builder is not None:
            builder.close()


def _two_passes(probs, k0, plain, memo, builder, time_limit, gap, backend, msg, progress, seeds, end):
    first_search = Search([plain], PLAIN_SHARE * time_limit, gap, backend, msg, progress, seeds, end,
                          {id(plain): memo}, builder, 0, plans_only=True)
    first = first_search.run()
    if first.best is not None:
        seeds = list(seeds) + [(first.best, probs[k0] if first.prob is plain else first.prob)]
    # the second pass's budget: the rest of the work budget (what the first pass left
    # unspent included), counted in work, not read off the clock (determinism)
    rest = (1 - PLAIN_SHARE) * time_limit + max(0, first.evals_left) / (EVALS_PER_SECOND * BUDGET_SHARE)
    second = Search(probs, rest, gap, backend, msg, progress, seeds, end, {id(probs[k0]): memo}, builder, 1)
    # (the first pass's plans are plans of space k0: their least bottlenecks bound its own)
    second.tau_known = {(k0, M): tau for (_, M), tau in first_search.tau_found.items()}
    res = second.run()
    res.solves = first.solves + res.solves
    res.seconds += first.seconds
    key = lambda p, q: (id(q), p.M, tuple((s.start, s.stop, s.counts, s.recompute) for s in p.stages))  # noqa: E731
    pool = {key(p, q): (p, q) for p, q in [(p, probs[k0] if q is plain else q) for p, q in first.pool] + res.pool}
    res.pool = sorted(pool.values(), key=lambda e: e[0].objective_s)[:POOL]
    return res
