"""The ``simulate`` subcommand: parse, call the simulator, print.

``register(subparsers)`` adds it to an argparse subparsers object; the handler takes the
parsed arguments and returns an exit code. Errors are raised as SpecError /
InfeasibleError for the CLI to print as one line. ``context_args``, ``load_context``,
``sim_options`` and ``console`` also serve ``hetalloc whatif`` (workflows.commands).

Never: compute anything here that a user could not also get from the library API.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hetalloc.cluster import Cluster, load_cluster
from hetalloc.costgraph import CostGraph, load_cost_graph
from hetalloc.plan import Plan, load_plan, plan_context, validate_plan
from hetalloc.plan_view import compact_ranges

from .api import simulate
from .engine import DDP_BUCKET_BYTES, prediction_iterations
from .report import SimReport


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate training iterations of a plan (time, throughput, bubbles, links, memory)",
        description="Discrete-event simulation of a plan: each device has a compute stream and communication "
                    "lanes, links are shared fairly, gradients are all-reduced step by step. Times in seconds, "
                    "bandwidths in bytes/s, memory in bytes (GiB in tables).")
    p.add_argument("plan", help="plan.json written by 'hetalloc plan' (carries its cluster and cost graph)")
    context_args(p)
    p.add_argument("--iterations", type=int, default=None,
                   help="iterations to simulate back to back (default 1; 30 where the cluster's device types carry "
                        "measured compute noise from 'hetalloc profile': the report gives the median iteration)")
    p.add_argument("--trace", metavar="OUT.json", help="write a Chrome trace (open in ui.perfetto.dev)")
    p.add_argument("--gantt", metavar="OUT.png", help="write a Gantt chart of the schedule")
    p.add_argument("--utilisation", metavar="OUT.png", help="write a per-device utilisation bar chart")
    p.add_argument("--report", metavar="OUT.json", help="write the full report as JSON")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.set_defaults(func=cmd_simulate)


def context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", help="cluster YAML (default: the one embedded in the plan)")
    p.add_argument("--cost-graph", help="cost graph JSON (default: the one embedded in the plan)")
    p.add_argument("--no-contention", action="store_true", help="every transfer at formula speed (no link sharing)")
    p.add_argument("--no-overlap", action="store_true", help="blocking sends; all-reduce after the pipeline phase")
    p.add_argument("--bucket-mb", type=float, default=DDP_BUCKET_BYTES / 2**20,
                   help="gradient bucket size in MiB with overlap (default 25, as DDP)")


def load_context(args) -> tuple[Plan, Cluster, CostGraph]:
    """The plan, and its cluster and cost graph (embedded unless overridden), checked
    against each other by the validator every verb uses (SpecError naming the plan's file;
    memory is the simulation's to report, not a reason to refuse)."""
    plan = load_plan(args.plan)
    cluster = load_cluster(args.cluster) if args.cluster else None
    cg = load_cost_graph(args.cost_graph) if args.cost_graph else None
    cluster, cg = plan_context(plan, args.plan, cluster=cluster, cg=cg)
    validate_plan(plan, cluster, cg, source=args.plan, check_memory=False)
    return plan, cluster, cg


def sim_options(args) -> dict[str, Any]:
    return {"contention": not args.no_contention, "overlap": not args.no_overlap,
            "bucket_bytes": args.bucket_mb * 2**20}


def cmd_simulate(args) -> int:
    plan, cluster, cg = load_context(args)
    iterations = args.iterations if args.iterations is not None else prediction_iterations(cluster)
    rep = simulate(plan, cluster, cg, iterations=iterations, explain=True, **sim_options(args))
    for path, write in ((args.trace, rep.write_trace), (args.gantt, rep.write_gantt),
                        (args.utilisation, rep.write_utilisation), (args.report, rep.save)):
        if path:
            write(path)
    if args.json:
        json.dump(rep.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    print_report(rep)
    for label, path in (("trace", args.trace), ("gantt", args.gantt), ("utilisation", args.utilisation),
                        ("report", args.report)):
        if path:
            print(f"wrote {label}: {path}")
    return 0


def console():
    """The terminal's console, or 140 columns when output goes to a file or pipe."""
    from rich.console import Console
    con = Console()
    return con if con.is_terminal else Console(width=140)


def print_report(rep: SimReport) -> None:
    from rich.table import Table
    con = console()
    res = rep.result
    t = Table(title=f"Simulated {res.plan.model} on {res.cluster.name} ({res.plan.schedule}, {res.plan.grad_sync}, "
                    f"contention {'on' if res.options.contention else 'off'}, "
                    f"overlap {'on' if res.options.overlap else 'off'})", show_header=False)
    p = rep.predicted
    rows = [("iteration time", f"{rep.iteration_time_s:.4g} s"),
            ("predicted (formulas)", f"{p['iteration_time_s']:.4g} s ({100 * p['difference']:+.1f}%)"),
            ("throughput", f"{rep.throughput_samples_per_s:,.2f} samples/s, {rep.tokens_per_s:,.0f} tokens/s"),
            ("MFU", f"{100 * rep.mfu:.1f}%"),
            ("pipeline bubble", f"{100 * rep.bubble_fraction:.1f}%"),
            ("exposed communication", f"{rep.exposed_comm_s:.4g} s (worst device)"),
            ("critical path", f"{rep.critical_path['bound_by']}; {rep.critical_path['made_of']}"),
            ("simulated", f"{rep.folding['simulated_devices']} of {rep.folding['devices']} devices "
                          f"({rep.folding['simulated_pipelines']} of {rep.folding['pipelines']} independent pipelines; "
                          f"identical ones folded), {rep.performance['events']:,} events in "
                          f"{rep.performance['wall_s']:.2f} s")]
    for k, v in rows:
        t.add_row(k, v)
    con.print(t)
    con.print(stage_table(rep))
    if rep.links:
        lt = Table(title="Busiest links")
        for c in ("link", "GiB moved", "busy s", "utilisation"):
            lt.add_column(c, justify="right")
        for l in rep.links[:8]:
            lt.add_row(l["link"], f"{l['bytes'] / 2**30:.3f}", f"{l['busy_s']:.4g}", f"{100 * l['utilisation']:.1f}%")
        con.print(lt)
    for n in rep.notes:
        con.print(n, highlight=False)


def stage_table(rep: SimReport, max_rows: int = 40):
    """One row per stage, where the stages of replicas that the simulation folded into one
    (the same representative devices) share a row that names every replica it stands for
    and counts all their devices."""
    from rich.table import Table
    res = rep.result
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in rep.stages:
        devs = res.plan.replicas[s["replica"]].stages[s["stage"]].device_ids()
        key = (s["stage"], tuple(sorted({res.rep_of[d] for d in devs})))
        groups.setdefault(key, []).append(s)
    st = Table(title="Stages (replicas simulated as one share a row)")
    for c in ("replicas", "stage", "layers", "devices", "busy s", "busy %", "peak mem GiB", "of usable"):
        st.add_column(c, justify="right")
    for members in list(groups.values())[:max_rows]:
        s = members[0]
        devs = [d for m in members for d in res.plan.replicas[m["replica"]].stages[m["stage"]].device_ids()]
        mem = [rep.devices[d] for d in devs]
        st.add_row(compact_ranges([m["replica"] for m in members]), str(s["stage"]),
                   f"{s['layers'][0]}-{s['layers'][1] - 1}", str(len(devs)),
                   f"{max(m['busy_s'] for m in members):.4g}",
                   f"{100 * max(m['busy_fraction'] for m in members):.0f}%",
                   f"{max(m['peak_memory_bytes'] for m in mem) / 2**30:.2f}",
                   f"{100 * max(m['memory_fraction'] for m in mem):.0f}%")
    if len(groups) > max_rows:
        st.caption = f"{len(groups) - max_rows} more rows; every stage is in --json"
    return st
