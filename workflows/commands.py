"""The ``whatif`` subcommand: parse, run the scenarios (workflows.whatif), print.

``register(subparsers)`` adds it to an argparse subparsers object; the handler returns an
exit code and raises SpecError / InfeasibleError for the CLI to print as one line. The
plan-loading and simulation flags are the ``simulate`` command's (simulator.commands).

Never: compute anything here that a user could not also get from the library API.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from allocator.baselines import BASELINES
from hetalloc.errors import SpecError
from simulator.commands import console, context_args, load_context, sim_options
from simulator.plots import scenario_bars, sweep_lines
from simulator.scenarios import KINDS, Case, Scenario, scenario, sweep_scenarios, with_prices

from simulator.episode import IterationCache, SpeedTrace, parse_failure, parse_straggler

from .adaptive import POLICIES, AdaptOptions, run_adaptive
from .episode import EpisodeOptions, run_episode
from .hostfit import fit_efficiency
from .whatif import WhatIfOptions, check_scenarios, cheapest_meeting, run_scenarios

ADAPTIVE_HELP = ("watch the run and move the work when a rank slows down or is lost: re-balance shares between "
                 "two steps, re-plan (checkpoint, restart, resume) when the simulator predicts that it pays, and "
                 "go on without a lost rank from the last checkpoint; every decision is a log line and a record "
                 "in OUT/metrics.jsonl")


def add_adaptive(run: argparse.ArgumentParser) -> None:
    """``hetalloc run --adaptive`` and its options, on the runtime's ``run`` parser: the
    run is then driven by workflows.adaptive (the runtime alone cannot re-plan)."""
    g = run.add_argument_group("adaptive runs (--adaptive)")
    g.add_argument("--adaptive", action="store_true", help=ADAPTIVE_HELP)
    g.add_argument("--policy", default="replan", choices=POLICIES,
                   help="none: report only; shares: re-balance micro-batch shares; replan: also re-plan when the "
                        "predicted gain over the horizon exceeds the switch cost (default)")
    g.add_argument("--horizon", type=int, default=200, metavar="STEPS",
                   help="steps over which a re-plan must pay for its switch (default 200; at most the steps left)")
    g.add_argument("--switch-cost", type=float, metavar="SECONDS",
                   help="cost of a restart under another plan, seconds (default: measured: start-up, warm-up, "
                        "checkpoint save and load)")
    g.add_argument("--min-gain", type=float, default=0.05, metavar="F",
                   help="re-balance shares when predicted to shorten the step by this fraction (default 0.05)")
    g.add_argument("--straggler-threshold", type=float, default=0.10, metavar="F",
                   help="a rank departing from its predicted compute time by this fraction (or by twice the "
                        "measured step-to-step scatter, if larger) is a straggler (default 0.10)")
    g.add_argument("--straggler-steps", type=int, default=3, metavar="K",
                   help="consecutive departing steps before a rank is reported (default 3)")
    g.add_argument("--replan-time-limit", type=float, default=10.0, metavar="SECONDS",
                   help="planner time limit per re-plan (default 10)")
    g.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                   help="no step for this long is a stall: a rank whose process is stopped or gone is lost "
                        "(default: 30 median steps, at least 60 s)")
    plain = run.get_default("func")
    run.set_defaults(func=lambda args: cmd_run_adaptive(args) if args.adaptive else plain(args))


def add_shared_fit(profile: argparse.ArgumentParser) -> None:
    """``hetalloc profile``: after the runtime's profile, a host with more ranks than
    cores gets its share efficiency fitted to the profile's run of every rank at once
    (workflows.hostfit: the simulator, which the runtime does not import)."""
    plain = profile.get_default("func")
    profile.add_argument("--fit-share-efficiency", action="store_true",
                         help="where ranks outnumber cores, apply the share efficiency fitted to the run of every "
                              "rank at once (default: reported only; one figure over-corrects other plans)")

    def run(args) -> int:
        rc = plain(args)
        if rc == 0 and not args.no_runtime_overhead:
            fit = fit_efficiency(args.out, apply=args.fit_share_efficiency)
            if fit is not None and not args.json:
                where = f"written into {args.out}/cluster.yaml" if fit["applied"] else \
                    "not applied (--fit-share-efficiency applies it)"
                print(f"shared cores: the ranks ran at {fit['fitted']:.3g} of a core's speed while "
                      f"sharing them (fitted to all ranks at once: {1e3 * fit['measured_step_s']:.1f} ms/step "
                      f"measured, {1e3 * fit['simulated_full_speed_s']:.1f} simulated at full speed); {where}")
        return rc
    profile.set_defaults(func=run)


def cmd_run_adaptive(args) -> int:
    from runtime.commands import launch_extra
    from runtime.launch import load_checked
    plan, rm = load_checked(args.plan)  # run_adaptive checks the rest as check_run does
    if args.nodes_print or len(rm.nodes) > 1:
        raise SpecError("--adaptive", "", "an adaptive run starts every rank on this machine",
                        "run a single-node plan, or drop --adaptive to print per-node commands")
    if args.max_restarts:
        raise SpecError("--max-restarts", "", "does not go with --adaptive (a lost rank is re-planned around)",
                        "drop --max-restarts")
    try:
        opts = AdaptOptions(policy=args.policy, horizon_steps=args.horizon, min_gain=args.min_gain,
                            switch_cost_s=args.switch_cost, time_limit_s=args.replan_time_limit,
                            straggler_threshold=args.straggler_threshold, straggler_steps=args.straggler_steps,
                            stall_timeout_s=args.stall_timeout)
    except ValueError as e:
        raise SpecError("hetalloc run --adaptive", "", str(e)) from None
    summary = run_adaptive(args.plan, steps=args.steps, out_dir=args.out, checkpoint_dir=args.checkpoint_dir,
                           checkpoint_every=args.checkpoint_every, resume=args.resume, slowdown=args.slowdown,
                           model=args.model, extra=launch_extra(args, plan), opts=opts)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "output"}, indent=2))
    return 0


def register(subparsers) -> None:
    w = subparsers.add_parser(
        "whatif", help="simulate a plan under hardware/batch scenarios, old plan vs re-planned, with prices",
        description="Each --swap/--add/--remove/--link/--slow/--fail/--batch/--seq/--tp/--recompute/"
                    "--optimizer-sharding is one scenario (or one combined scenario with --combine). For each, the "
                    "old plan (where still valid; --tp/--recompute/--optimizer-sharding change it) and a "
                    "re-planned one are simulated. Bandwidths: 200Gb/s (bits), 25GB/s or a bare number (GB/s).")
    w.add_argument("plan", help="the base plan.json")
    context_args(w)
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
    w.add_argument("--tp", action="append", default=[], metavar="N",
                   help="the old plan with tensor-parallel groups of N (1, 2, 4, 8) on each stage's devices")
    w.add_argument("--recompute", action="append", default=[], metavar="none|full",
                   help="the old plan with activation recomputation off or on in every stage")
    w.add_argument("--optimizer-sharding", action="append", default=[], metavar="none|zero1",
                   help="the old plan with its optimizer state sharded (zero1) or not")
    w.add_argument("--straggler", action="append", default=[], metavar="DEV=FACTOR@T",
                   help="an episode of --steps steps in which DEV computes FACTOR times as long from T on (T: a "
                        "step, @300, or a time, @90s/@15m/@2h; FACTOR 1 ends it), played with each --policy")
    w.add_argument("--lose", action="append", default=[], metavar="DEV@T",
                   help="an episode in which DEV is lost at T (a step or a time, as for --straggler)")
    w.add_argument("--policy", action="append", default=[], choices=POLICIES,
                   help="episode policy: none (no reaction; a lost device ends the run), shares (re-balance "
                        "shares), replan (also re-plan when it pays); repeatable (default: all three)")
    w.add_argument("--switch-cost", type=float, default=60.0, metavar="SECONDS",
                   help="episodes: seconds a restart under another plan costs (checkpoint, restart, warm-up; "
                        "default 60)")
    w.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                   help="episodes: steps between checkpoints; a lost device sends the run back to the last "
                        "(default 100)")
    w.add_argument("--horizon", type=int, default=200, metavar="STEPS",
                   help="episodes: steps over which a re-plan must pay for its switch (default 200)")
    w.add_argument("--combine", action="store_true", help="apply all given transformations as one scenario")
    w.add_argument("--sweep", metavar="KNOB=VALUES",
                   help="grid over one knob: nic=10..400Gb/s:6 (log-spaced), intra=..., fabric=1,2,4, "
                        "batch=256,512, seq=..., slow:DEVICE=1,2,4")
    w.add_argument("--planner", default="ilp", choices=["ilp", *BASELINES],
                   help=f"re-plan with: ilp (default), {', '.join(BASELINES)}")
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


def _scenarios(args) -> list[Scenario]:
    out = [scenario(kind, spec) for kind in KINDS for spec in getattr(args, kind)]
    if args.combine and len(out) > 1:
        out = [Scenario(" + ".join(s.name for s in out), [t for s in out for t in s.transforms])]
    return out


def cmd_whatif(args) -> int:
    plan, cluster, cg = load_context(args)
    if args.straggler or args.lose:
        return cmd_episodes(args, plan, cluster, cg)
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
        cluster = with_prices(cluster, prices)
    if args.plot and not args.sweep:
        raise SpecError("--plot", "", "needs --sweep", "the line plot is of a sweep; use --chart for scenarios")
    if args.deadline is not None and not args.steps:
        raise SpecError("--deadline", "", "needs --steps", "say how many training steps must finish")
    scenarios = _scenarios(args)
    sweep = sweep_scenarios(args.sweep) if args.sweep else None
    if sweep:
        scenarios += sweep[3]
    if not scenarios:
        raise SpecError("whatif", "", "no scenario given",
                        "add e.g. --swap 8xV100-16G=4xH100-80G or --sweep nic=10..400Gb/s:6")
    opts = WhatIfOptions(planner=args.planner, time_limit_s=args.time_limit, replan=not args.no_replan,
                         sim=sim_options(args))
    base = Case(cluster, cg, plan.global_batch, plan)
    check_scenarios(base, scenarios)
    rows = _run_with_progress(base, scenarios, opts, args)
    if args.steps:
        for r in rows:
            if r.get("best_s"):
                r["total_hours"] = r["best_s"] * args.steps / 3600
                r["total_usd"] = r["usd_per_iteration"] * args.steps
    best = cheapest_meeting(rows, args.steps, args.deadline) if args.deadline is not None else None
    if args.chart:
        scenario_bars(rows, args.chart, f"What-if: {plan.model} on {cluster.name}")
    if args.plot and sweep:
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


def cmd_episodes(args, plan, cluster, cg) -> int:
    """``whatif --straggler/--lose``: one simulated episode per policy (workflows.episode)."""
    trace = SpeedTrace([parse_straggler(s) for s in args.straggler] + [parse_failure(s) for s in args.lose])
    trace.check(cluster)
    steps = args.steps or 1000
    try:
        opts = EpisodeOptions(steps=steps, switch_cost_s=args.switch_cost, checkpoint_every=args.checkpoint_every)
        adapt = AdaptOptions(horizon_steps=args.horizon, time_limit_s=args.time_limit,
                             planner=args.planner)
    except ValueError as e:
        raise SpecError("whatif", "", str(e)) from None
    cache = IterationCache(cluster, cg, sim_options(args))
    rows = [run_episode(plan, cluster, cg, trace, pol, opts, adapt, cache) for pol in (args.policy or POLICIES)]
    base = next((r for r in rows if r["policy"] == "none"), None)
    for r in rows:
        r["speedup_vs_none"] = (r["samples_per_s"] / base["samples_per_s"]  # a run that ended is not a base
                                if base and not base["ended"] and base["samples_per_s"] and r["samples_per_s"]
                                else None)
    if args.json:
        json.dump({"schema_version": 1, "kind": "whatif_episodes", "steps": steps,
                   "trace": [c.label() for c in trace.changes], "rows": rows}, sys.stdout, indent=2)
        print()
        return 0
    from rich.table import Table
    con = console()
    t = Table(title=f"Episodes of {steps:,} steps: {', '.join(c.label() for c in trace.changes)} "
                    f"(simulated; restart {args.switch_cost:g} s)")
    for c in ("policy", "steps done", "time s", "samples/s", "vs none", "share switches", "restarts",
              "steps redone", "ended"):
        t.add_column(c, justify="left" if c in ("policy", "ended") else "right")
    for r in rows:
        t.add_row(r["policy"], f"{r['steps_done']:,}", f"{r['total_s']:,.4g}", f"{r['samples_per_s']:,.4g}",
                  _fmt(r["speedup_vs_none"], ".2f") + ("x" if r["speedup_vs_none"] else ""),
                  str(r["shares_switches"]), str(r["restarts"]), str(r["steps_redone"]), r["ended"] or "—")
    con.print(t)
    for r in rows:
        for d in r["decisions"]:
            con.print(f"{r['policy']}: step {d['step']}: {d['trigger']} -> {d['action']}: {d['why']}",
                      highlight=False)
    return 0


def _run_with_progress(base, scenarios, opts, args) -> list[dict[str, Any]]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    quiet = args.json or not sys.stderr.isatty()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), disable=quiet, transient=True) as prog:
        task = prog.add_task("what-if", total=len(scenarios) + 1)
        return run_scenarios(base, scenarios, opts, replan_base=args.replan_base,
                             progress=lambda name: prog.update(task, advance=1, description=f"what-if: {name}"))


def _fmt(x, spec: str = ".4g", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def _print_rows(rows: list[dict[str, Any]], args, best) -> None:
    from rich.table import Table
    con = console()
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
