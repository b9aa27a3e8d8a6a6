"""The ``simulate`` and ``whatif`` subcommands: parse, call the simulator, print.

``register(subparsers)`` adds both to an argparse subparsers object; each handler takes
the parsed arguments and returns an exit code. Errors are raised as SpecError /
InfeasibleError for the CLI to print as one line.

Never: compute anything here that a user could not also get from the library API.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hetalloc.cluster import Cluster, cluster_from_dict, load_cluster
from hetalloc.costgraph import CostGraph, analytic_cost_graph, cost_graph_from_dict, load_cost_graph
from hetalloc.errors import SpecError
from hetalloc.models import get_model
from hetalloc.plan import Plan, load_plan

from . import whatif
from .api import simulate
from .engine import DDP_BUCKET_BYTES
from .report import SimReport


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="simulate training iterations of a plan (time, throughput, bubbles, links, memory)",
        description="Discrete-event simulation of a plan: each device has a compute stream and communication "
                    "lanes, links are shared fairly, gradients are all-reduced step by step. Times in seconds, "
                    "bandwidths in bytes/s, memory in bytes (GiB in tables).")
    p.add_argument("plan", help="plan.json written by 'hetalloc plan' (carries its cluster and cost graph)")
    _context_args(p)
    p.add_argument("--iterations", type=int, default=1, help="iterations to simulate back to back (default 1)")
    p.add_argument("--trace", metavar="OUT.json", help="write a Chrome trace (open in ui.perfetto.dev)")
    p.add_argument("--gantt", metavar="OUT.png", help="write a Gantt chart of the schedule")
    p.add_argument("--utilisation", metavar="OUT.png", help="write a per-device utilisation bar chart")
    p.add_argument("--report", metavar="OUT.json", help="write the full report as JSON")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.set_defaults(func=cmd_simulate)

    w = subparsers.add_parser(
        "whatif", help="simulate a plan under hardware/batch scenarios, old plan vs re-planned, with prices",
        description="Each --swap/--add/--remove/--link/--slow/--fail/--batch/--seq is one scenario (or one "
                    "combined scenario with --combine). For each, the old plan (where still valid) and a "
                    "re-planned one are simulated. Bandwidths: 200Gb/s (bits), 25GB/s or a bare number (GB/s).")
    w.add_argument("plan", help="the base plan.json")
    _context_args(w)
    w.add_argument("--swap", action="append", default=[], metavar="NxOLD=MxNEW", help="e.g. 8xV100-16G=4xH100-80G")
    w.add_argument("--add", action="append", default=[], metavar="NxTYPE[@INTRA/NIC]",
                   help="e.g. 8xH100-80G@NVLink4/IB-NDR")
    w.add_argument("--remove", action="append", default=[], metavar="NxTYPE", help="e.g. 8xV100-16G")
    w.add_argument("--link", action="append", default=[], metavar="[NODES.]KIND=BW[,LAT]",
                   help="KIND intra|nic (nic=200Gb/s, v100.nic=25GB/s,8us) or fabric=OVERSUBSCRIPTION")
    w.add_argument("--slow", action="append", default=[], metavar="DEVICE=FACTOR", help="straggler, e.g. a100/3=2")
    w.add_argument("--fail", action="append", default=[], metavar="DEVICE|NODE", help="e.g. a100/3 or v100")
    w.add_argument("--batch", action="append", default=[], metavar="N", help="another global batch")
    w.add_argument("--seq", action="append", default=[], metavar="N", help="another sequence length")
    w.add_argument("--combine", action="store_true", help="apply all given transformations as one scenario")
    w.add_argument("--sweep", metavar="KNOB=VALUES",
                   help="grid over one knob: nic=10..400Gb/s:6 (log-spaced), intra=..., fabric=1,2,4, "
                        "batch=256,512, seq=..., slow:DEVICE=1,2,4")
    w.add_argument("--planner", default="ilp", help="re-plan with: ilp (default), even, proportional, pipedream")
    w.add_argument("--time-limit", type=float, default=10.0, help="planner time limit per re-plan, seconds")
    w.add_argument("--no-replan", action="store_true", help="only simulate the old plan")
    w.add_argument("--replan-base", action="store_true", help="also re-plan the base cluster")
    w.add_argument("--price", action="append", default=[], metavar="TYPE=USD",
                   help="override a device type's price per hour (catalog prices otherwise)")
    w.add_argument("--steps", type=int, help="training steps: report total hours and dollars")
    w.add_argument("--deadline", type=float, metavar="HOURS", help="with --steps: cheapest scenario finishing in time")
    w.add_argument("--chart", metavar="OUT.png", help="bar chart of the scenarios")
    w.add_argument("--plot", metavar="OUT.png", help="line plot of a --sweep")
    w.add_argument("--json", action="store_true", help="print the rows as JSON")
    w.set_defaults(func=cmd_whatif)


def _context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", help="cluster YAML (default: the one embedded in the plan)")
    p.add_argument("--cost-graph", help="cost graph JSON (default: the one embedded in the plan)")
    p.add_argument("--no-contention", action="store_true", help="every transfer at formula speed (no link sharing)")
    p.add_argument("--no-overlap", action="store_true", help="blocking sends; all-reduce after the pipeline phase")
    p.add_argument("--bucket-mb", type=float, default=DDP_BUCKET_BYTES / 2**20,
                   help="gradient bucket size in MiB with overlap (default 25, as DDP)")


def load_context(args) -> tuple[Plan, Cluster, CostGraph]:
    """The plan, and its cluster and cost graph (embedded unless overridden)."""
    plan = load_plan(args.plan)
    if args.cluster:
        cluster = load_cluster(args.cluster)
    elif plan.cluster_spec:
        cluster = cluster_from_dict(plan.cluster_spec, f"{args.plan}#cluster")
    else:
        raise SpecError(args.plan, "cluster.spec", "the plan does not carry its cluster", "pass --cluster")
    if args.cost_graph:
        cg = load_cost_graph(args.cost_graph)
    elif plan.cost_graph_spec:
        cg = cost_graph_from_dict(plan.cost_graph_spec, f"{args.plan}#cost_graph")
    else:
        cg = analytic_cost_graph(get_model(plan.model), plan.seq_len, plan.precision)
    return plan, cluster, cg


def _sim_options(args) -> dict[str, Any]:
    return {"contention": not args.no_contention, "overlap": not args.no_overlap,
            "bucket_bytes": args.bucket_mb * 2**20}


def cmd_simulate(args) -> int:
    plan, cluster, cg = load_context(args)
    if args.iterations < 1:
        raise SpecError("--iterations", "", f"must be >= 1, got {args.iterations}", "simulate at least one")
    rep = simulate(plan, cluster, cg, iterations=args.iterations, explain=True, **_sim_options(args))
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


def _console():
    from rich.console import Console
    con = Console()
    return con if con.is_terminal else Console(width=140)


def print_report(rep: SimReport) -> None:
    from rich.table import Table
    con = _console()
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
    st = Table(title="Stages (identical ones shown once)")
    for c in ("replica", "stage", "layers", "devices", "stands for", "busy s", "busy %", "peak mem GiB", "of usable"):
        st.add_column(c, justify="right")
    shown = [s for s in rep.stages if any(d in res.work
                                          for d in res.plan.replicas[s["replica"]].stages[s["stage"]].device_ids())]
    for s in shown[:40]:
        devs = res.plan.replicas[s["replica"]].stages[s["stage"]].device_ids()
        mem = [rep.devices[d] for d in devs]
        stands = sum(len(res.work[d].mates) for d in devs if d in res.work)
        st.add_row(str(s["replica"]), str(s["stage"]), f"{s['layers'][0]}-{s['layers'][1] - 1}", str(len(devs)),
                   f"{stands} devices", f"{s['busy_s']:.4g}",
                   f"{100 * s['busy_fraction']:.0f}%", f"{max(m['peak_memory_bytes'] for m in mem) / 2**30:.2f}",
                   f"{100 * max(m['memory_fraction'] for m in mem):.0f}%")
    if len(shown) > 40:
        st.caption = f"{len(shown) - 40} more stages in --json"
    con.print(st)
    if rep.links:
        lt = Table(title="Busiest links")
        for c in ("link", "GiB moved", "busy s", "utilisation"):
            lt.add_column(c, justify="right")
        for l in rep.links[:8]:
            lt.add_row(l["link"], f"{l['bytes'] / 2**30:.3f}", f"{l['busy_s']:.4g}", f"{100 * l['utilisation']:.1f}%")
        con.print(lt)
    for n in rep.notes:
        con.print(n, highlight=False)


# ---- whatif ----------------------------------------------------------------------------

def _scenarios(args) -> list[whatif.Scenario]:
    out = [whatif.scenario(kind, spec) for kind in whatif.KINDS for spec in getattr(args, kind)]
    if args.combine and len(out) > 1:
        out = [whatif.Scenario(" + ".join(s.name for s in out), [t for s in out for t in s.transforms])]
    return out


def cmd_whatif(args) -> int:
    plan, cluster, cg = load_context(args)
    prices = {}
    for item in args.price:
        t, sep, usd = item.partition("=")
        try:
            prices[t] = float(usd)
        except ValueError:
            sep = ""
        if not sep or prices[t] < 0:
            raise SpecError("--price", item, "expected TYPE=USD_PER_HOUR", "e.g. --price H100-80G=2.49")
    if prices:
        cluster = whatif.with_prices(cluster, prices)
    if args.deadline is not None and not args.steps:
        raise SpecError("--deadline", "", "needs --steps", "say how many training steps must finish")
    scenarios = _scenarios(args)
    sweep = whatif.sweep_scenarios(args.sweep) if args.sweep else None
    if sweep:
        scenarios += sweep[3]
    if not scenarios:
        raise SpecError("whatif", "", "no scenario given",
                        "add e.g. --swap 8xV100-16G=4xH100-80G or --sweep nic=10..400Gb/s:6")
    opts = whatif.WhatIfOptions(planner=args.planner, time_limit_s=args.time_limit, replan=not args.no_replan,
                                sim=_sim_options(args))
    base = whatif.Case(cluster, cg, plan.global_batch, plan)
    rows = _run_with_progress(base, scenarios, opts, args)
    if args.steps:
        for r in rows:
            if r.get("best_s"):
                r["total_hours"] = r["best_s"] * args.steps / 3600
                r["total_usd"] = r["usd_per_iteration"] * args.steps
    best = whatif.cheapest_meeting(rows, args.steps, args.deadline) if args.deadline is not None else None
    if args.chart:
        from .plots import scenario_bars
        scenario_bars(rows, args.chart, f"What-if: {plan.model} on {cluster.name}")
    if args.plot and sweep:
        from .plots import sweep_lines
        knob, values, unit, scs = sweep
        by = {r["scenario"]: r for r in rows}
        sweep_lines(knob, values, {"old plan": [by[s.name]["old_plan_s"] for s in scs],
                                   "re-planned": [by[s.name]["replan_s"] for s in scs]}, args.plot, unit)
    if args.json:
        json.dump({"schema_version": 1, "kind": "whatif", "rows": rows,
                   "cheapest_meeting_deadline": best["scenario"] if best else None}, sys.stdout, indent=2)
        print()
        return 0
    _print_rows(rows, args, best)
    for label, path in (("chart", args.chart), ("plot", args.plot if sweep else None)):
        if path:
            print(f"wrote {label}: {path}")
    return 0


def _run_with_progress(base, scenarios, opts, args) -> list[dict[str, Any]]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    quiet = args.json or not sys.stderr.isatty()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), disable=quiet, transient=True) as prog:
        task = prog.add_task("what-if", total=len(scenarios) + 1)
        return whatif.run(base, scenarios, opts, replan_base=args.replan_base,
                          progress=lambda name: prog.update(task, advance=1, description=f"what-if: {name}"))


def _fmt(x, spec: str = ".4g", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def _print_rows(rows: list[dict[str, Any]], args, best) -> None:
    from rich.table import Table
    con = _console()
    t = Table(title="What-if (simulated seconds per iteration)")
    cols = ["scenario", "devices", "old plan s", "re-plan s", "vs base", "$/h", "$/iteration", "samples/$"]
    if args.steps:
        cols += ["hours", "$ total"]
    for c in cols:
        t.add_column(c, justify="left" if c == "scenario" else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["scenario"], *["—"] * (len(cols) - 1))
            continue
        old = _fmt(r["old_plan_s"], ".4g", "invalid" if r["old_plan_note"] else "—")
        cells = [r["scenario"], str(r["devices"]), old,
                 _fmt(r["replan_s"]), _fmt(r.get("speedup_vs_base"), ".2f") + ("x" if r.get("speedup_vs_base") else ""),
                 _fmt(r["cost_per_hour_usd"], ",.2f"), _fmt(r["usd_per_iteration"], ".4f"),
                 _fmt(r.get("samples_per_usd"), ",.0f")]
        if args.steps:
            cells += [_fmt(r.get("total_hours"), ",.1f"), _fmt(r.get("total_usd"), ",.0f")]
        t.add_row(*cells)
    con.print(t)
    for r in rows:
        for key in ("error", "old_plan_note", "replan_note"):
            if r.get(key):
                label = {"error": "scenario", "old_plan_note": "old plan", "replan_note": "re-plan"}[key]
                con.print(f"{r['scenario']}: {label}: {r[key]}", highlight=False)
    if args.deadline is not None:
        con.print(f"cheapest meeting {args.steps:,} steps in {args.deadline:g} h: "
                  + (f"{best['scenario']} ({best['total_hours']:.1f} h, ${best['total_usd']:,.0f})" if best
                     else "none of the scenarios"), highlight=False)
