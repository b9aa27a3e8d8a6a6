"""Library entry points: simulate a plan, and explain how the simulation differs from the
cost prediction.

Never: print; callers (the CLI, the demo, benchmarks) decide what to show.
"""

from __future__ import annotations

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.evaluate import predict
from hetalloc.plan import Plan

from .engine import SimOptions, Simulation
from .report import SimReport, build_report

EXPLAIN_THRESHOLD = 0.05
"""Relative difference from the prediction above which ``simulate(explain=True)`` says why."""


def simulate(plan: Plan, cluster: Cluster, cg: CostGraph, *, contention: bool = True, overlap: bool = True,
             iterations: int = 1, compare: bool = True, explain: bool = False, **options) -> SimReport:
    """Simulate `iterations` training iterations of `plan`; options as in SimOptions.

    compare: also compute ``hetalloc.evaluate.predict`` for report.predicted.
    explain: if the simulated iteration time differs from the prediction by more than
    5 %, simulate the switched-off variants too and say which effect accounts for the
    difference (report.notes)."""
    opts = SimOptions(contention=contention, overlap=overlap, iterations=iterations, **options)
    prediction = predict(plan, cluster, cg) if compare or explain else None
    rep = build_report(Simulation(plan, cluster, cg, opts).run(), prediction)
    if explain and abs(rep.predicted["difference"]) > EXPLAIN_THRESHOLD:
        rep.notes.extend(explain_difference(plan, cluster, cg, rep, options))
    return rep


def explain_difference(plan: Plan, cluster: Cluster, cg: CostGraph, rep: SimReport, options: dict) -> list[str]:
    """Attribute the gap between prediction and simulation to the model's parts by
    switching them on one at a time (reference -> + contention -> + overlap)."""
    pred = rep.predicted["iteration_time_s"]
    base = {k: v for k, v in options.items() if k not in ("iterations",)}
    variants = [("reference (no contention, no overlap)", False, False),
                ("+ link contention", True, False),
                ("+ overlap (async sends, bucketed all-reduce)", True, True)]
    times = []
    for _label, c, o in variants:
        if (c, o) == (rep.result.options.contention, rep.result.options.overlap) and rep.result.options.iterations == 1:
            times.append(rep.iteration_time_s)
        else:
            res = Simulation(plan, cluster, cg, SimOptions(contention=c, overlap=o, record=False, **base)).run()
            times.append(res.iteration_ends_s[-1])
    notes = [f"simulation {rep.iteration_time_s:.4g} s vs predicted {pred:.4g} s "
             f"({100 * rep.predicted['difference']:+.1f}%); step by step:"]
    prev = pred
    why = {
        0: "collectives wait for all their members: a device that holds several gradient groups "
           "serialises them with the other holders, which the formula (a sum per device) does not",
        1: "transfers that run at the same time share links (NICs, fabric core, a device's link)",
        2: "sends overlap compute and gradients are all-reduced in buckets during the backward pass",
    }
    for k, ((label, c, o), t) in enumerate(zip(variants, times)):
        if not c and not o:
            delta = (t - pred) / pred
            line = f"  {label}: {t:.4g} s ({100 * delta:+.1f}% vs predicted)"
            if abs(delta) > 0.01:
                line += f" — {why[0]}"
        else:
            delta = (t - prev) / prev
            line = f"  {label}: {t:.4g} s ({100 * delta:+.1f}%)"
            if abs(delta) > 0.01:
                line += f" — {why[k]}"
        notes.append(line)
        prev = t
        if (c, o) == (rep.result.options.contention, rep.result.options.overlap):
            break
    links = [l for l in rep.links if l["utilisation"] > 0.5][:3]
    if links and rep.result.options.contention:
        notes.append("  busiest links: " + ", ".join(f"{l['link']} {100 * l['utilisation']:.0f}%" for l in links))
    return notes
