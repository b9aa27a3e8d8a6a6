"""Running what-if scenarios: for the base and every scenario (simulator.scenarios), the
simulated iteration time of the old plan (where still valid) and of a re-plan, with
prices.

Why this is here and not in the simulator: a what-if run needs two subsystems, the
allocator (re-planning) and the simulator (playing both plans out). The subsystems never
import each other, so that each can change without breaking the other and the simulator
never pulls in the solvers; what needs several lives in workflows/. The simulator keeps
what needs only the vocabulary: the scenarios themselves.

Never: build or change a cluster here (simulator.scenarios does), or print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from allocator import make_plan
from hetalloc.errors import InfeasibleError, SpecError
from hetalloc.plan import Plan
from simulator import simulate
from simulator.scenarios import Case, Scenario, apply_scenario, cost_per_hour


@dataclass
class WhatIfOptions:
    planner: str = "ilp"
    """'ilp' (hetalloc's planner) or a baseline name for the re-plans."""
    time_limit_s: float = 10.0
    replan: bool = True
    sim: dict[str, Any] = field(default_factory=dict)
    """Options for simulator.simulate (contention, overlap, ...)."""


def replan(case: Case, like: Plan, opts: WhatIfOptions) -> Plan:
    """A new plan for the scenario's cluster, with the old plan's schedule and optimizer."""
    baseline = None if opts.planner == "ilp" else opts.planner
    return make_plan(case.cluster, case.cg, case.global_batch, schedule=like.schedule, optimizer=like.optimizer,
                     time_limit=opts.time_limit_s, baseline=baseline, compare_baselines=baseline is None)


def scenario_row(name: str, case: Case, like: Plan, opts: WhatIfOptions, *, do_replan: bool = True) -> dict[str, Any]:
    """One row: simulated iteration time of the old plan and of a re-plan, and prices."""
    row: dict[str, Any] = {"scenario": name, "devices": case.cluster.num_devices,
                           "cost_per_hour_usd": cost_per_hour(case.cluster), "global_batch": case.global_batch,
                           "old_plan_s": None, "old_plan_note": case.old_invalid, "replan_s": None,
                           "replan_note": "", "replan_predicted_s": None, "replan_devices_used": None}
    if case.old_plan is not None:
        row["old_plan_s"] = simulate(case.old_plan, case.cluster, case.cg, **opts.sim).iteration_time_s
    if do_replan:
        try:
            p = replan(case, like, opts)
            row["replan_s"] = simulate(p, case.cluster, case.cg, **opts.sim).iteration_time_s
            row["replan_predicted_s"] = p.predicted.get("iteration_time_s")
            row["replan_devices_used"] = len(p.device_ids())
            row["replan_planner"] = p.planner
        except (InfeasibleError, SpecError) as e:
            row["replan_note"] = str(e)
    best = min((t for t in (row["old_plan_s"], row["replan_s"]) if t), default=None)
    row["best_s"] = best
    row["usd_per_iteration"] = row["cost_per_hour_usd"] * best / 3600 if best else None
    usd = row["usd_per_iteration"]
    row["samples_per_usd"] = case.global_batch / usd if usd else None
    return row


def check_scenarios(base: Case, scenarios: list[Scenario]) -> None:
    """Build every scenario once before any is simulated: one that cannot be built (no
    such device, more devices removed than there are, nothing left) is the user's mistake,
    raised here (SpecError naming the flag, or InfeasibleError) rather than a row."""
    for sc in scenarios:
        try:
            apply_scenario(sc, base)
        except InfeasibleError as e:
            raise SpecError(f"scenario '{sc.name}'", "", str(e), "change the scenario") from None


def run_scenarios(base: Case, scenarios: list[Scenario], opts: WhatIfOptions, *, replan_base: bool = False,
                  progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows for the base and every scenario (a scenario that cannot be built gets a note)."""
    like = base.old_plan
    rows = [scenario_row("base", base, like, opts, do_replan=replan_base)]
    if progress:
        progress("base")
    base_s = rows[0]["best_s"]
    for sc in scenarios:
        try:
            case = apply_scenario(sc, base)
            row = scenario_row(sc.name, case, like, opts, do_replan=opts.replan)
        except (InfeasibleError, SpecError) as e:
            row = {"scenario": sc.name, "error": str(e), "old_plan_s": None, "replan_s": None, "best_s": None,
                   "usd_per_iteration": None, "devices": None, "cost_per_hour_usd": None}
        row["speedup_vs_base"] = base_s / row["best_s"] if row.get("best_s") and base_s else None
        rows.append(row)
        if progress:
            progress(sc.name)
    return rows


def cheapest_meeting(rows: list[dict[str, Any]], steps: int, deadline_h: float) -> dict[str, Any] | None:
    """The row with the least total price whose `steps` iterations finish within the deadline."""
    ok = [r for r in rows if r.get("best_s") and r["best_s"] * steps / 3600 <= deadline_h]
    return min(ok, key=lambda r: (r["usd_per_iteration"], r["best_s"])) if ok else None
