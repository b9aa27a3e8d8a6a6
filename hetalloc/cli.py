"""`hetalloc` command line: profile | plan | simulate | whatif | run | demo | catalog.

A thin face: it parses, calls a subsystem, prints. It is the only code in hetalloc/ that
imports the subsystems (allocator, simulator, runtime), and imports each lazily so that
`hetalloc plan` never loads torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import HetallocError

BUILTIN_CLUSTER = Path(__file__).parent / "data" / "lab-16.yaml"


def _add_cost_graph_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="built-in model name (gpt2-small … gpt3-175b, llama2-7b …, see 'hetalloc catalog') "
                        "or a Hugging Face config.json")
    p.add_argument("--seq", type=int, default=None, help="sequence length in tokens (default: the model's context)")
    p.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32"],
                   help="training precision: activation/gradient bytes (default bf16-mixed)")
    p.add_argument("--cost-graph", default=None,
                   help="measured cost graph JSON from 'hetalloc profile' (default: analytic estimates)")
    p.add_argument("--efficiency", default=None, metavar="FILE",
                   help="efficiency factors fitted by 'hetalloc profile --calibrate' (efficiency.json), applied "
                        "to the analytic estimates of the device types they name")
    p.add_argument("--efficiency-as", action="append", default=[], metavar="FITTED=TYPE",
                   help="also apply the factors fitted for device type FITTED to TYPE (e.g. a profiled GPU's "
                        "detected name to its catalog name); repeatable")


def load_cost_graph_arg(args):
    from .costgraph import analytic_cost_graph, load_cost_graph
    from .models import resolve_model
    if args.cost_graph:
        return load_cost_graph(args.cost_graph)
    cg = analytic_cost_graph(resolve_model(args.model), args.seq, args.precision)
    if args.efficiency:
        from .calibrate import load_efficiency
        from .errors import SpecError

        eff = load_efficiency(args.efficiency)
        for item in args.efficiency_as:
            fitted, _, target = item.partition("=")
            if fitted not in eff or not target:
                raise SpecError("--efficiency-as", item, f"'{fitted}' is not a device type of {args.efficiency}"
                                if target else "expected FITTED=TYPE",
                                f"fitted types: {', '.join(sorted(eff)) or 'none'}")
            eff[target] = dict(eff[fitted])
        cg = cg.with_efficiency(eff)
    elif args.efficiency_as:
        from .errors import SpecError
        raise SpecError("--efficiency-as", "", "needs --efficiency FILE", "pass the efficiency.json to map from")
    return cg


def cmd_catalog(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .catalog import DEVICE_TYPES, LINK_TYPES
    from .models import MODELS
    if args.json:
        print(json.dumps({
            "devices": {k: {"vendor": d.vendor, "peak_tflops": d.peak_tflops, "memory_gib": d.memory_gib,
                            "mem_bandwidth_gbps": d.mem_bandwidth_gbps, "cost_per_hour_usd": d.cost_per_hour_usd,
                            "source": d.source} for k, d in DEVICE_TYPES.items()},
            "links": {k: {"bandwidth_gbps": l.bandwidth_gbps, "latency_us": l.latency_us, "source": l.source}
                      for k, l in LINK_TYPES.items()},
            "models": sorted(MODELS),
        }, indent=2))
        return 0
    con = Console()
    t = Table(title="devices (peak dense 16-bit TFLOP/s, memory GiB, memory GB/s, USD/hour)")
    for c in ("name", "vendor", "TFLOP/s", "GiB", "GB/s", "$/h", "source"):
        t.add_column(c)
    for d in DEVICE_TYPES.values():
        t.add_row(d.name, d.vendor, f"{d.peak_tflops:g}", f"{d.memory_gib:g}", f"{d.mem_bandwidth_gbps:g}",
                  f"{d.cost_per_hour_usd:.2f}", d.source)
    con.print(t)
    t = Table(title="links (GB/s per direction, latency µs)")
    for c in ("name", "GB/s", "µs", "source"):
        t.add_column(c)
    for l in LINK_TYPES.values():
        t.add_row(l.name, f"{l.bandwidth_gbps:g}", f"{l.latency_us:g}", l.source)
    con.print(t)
    con.print("models: " + ", ".join(sorted(MODELS)))
    return 0


def cmd_plan(args) -> int:
    from allocator import make_plan

    from .cluster import load_cluster
    from .report import print_plan, wide_console
    cluster = load_cluster(args.cluster)
    cg = load_cost_graph_arg(args)
    con = wide_console(stderr=args.json)
    say = None if args.json or args.quiet else (lambda s: con.print(f"[dim]{s}[/dim]", highlight=False))
    plan = make_plan(cluster, cg, args.global_batch, schedule=args.schedule, optimizer=args.optimizer,
                     grad_sync=args.grad_sync, time_limit=args.time_limit, gap=args.gap, backend=args.solver,
                     baseline=args.baseline, compare_baselines=not args.no_compare,
                     group_identical_nodes=not args.exact_nodes, msg=args.verbose, progress=say)
    if args.output:
        plan.save(args.output)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan, cluster, con)
        if args.output:
            con.print(f"wrote {args.output}")
    return 0


def cmd_demo(args) -> int:
    from allocator import make_plan

    from .cluster import load_cluster
    from .costgraph import analytic_cost_graph
    from .models import get_model
    from .report import print_plan, wide_console
    con = wide_console()
    out = Path(args.out)  # created by the first file written: a bad argument leaves no empty folder
    cluster = load_cluster(BUILTIN_CLUSTER)
    cg = analytic_cost_graph(get_model(args.model))
    con.print(f"[bold]hetalloc demo[/bold]: {cluster.describe()}; model {args.model}, "
              f"global batch {args.global_batch}, seq {cg.seq_len}")
    plan = make_plan(cluster, cg, args.global_batch, time_limit=args.time_limit,
                     progress=lambda s: con.print(f"[dim]{s}[/dim]", highlight=False))
    plan.save(out / "plan.json")
    print_plan(plan, cluster, con)
    con.print(f"wrote {out / 'plan.json'}")
    for extra in DEMO_STEPS:
        extra(plan, cluster, cg, out, con, args)
    if args.run:
        from runtime.loop import closed_loop  # torch is only imported for --run
        closed_loop(out / "loop", console=con)
    return 0


# Later subsystems append (plan, cluster, cg, out_dir, console, args) -> None steps here.
DEMO_STEPS: list = []


def _demo_simulate(plan, cluster, cg, out, con, args) -> None:
    try:
        import simulator
    except ImportError:
        return
    if not hasattr(simulator, "simulate"):
        return
    rep = simulator.simulate(plan, cluster, cg)
    rep.write_trace(out / "trace.json")
    rep.write_gantt(out / "gantt.png")
    d = rep.to_dict()
    con.print(f"simulated   {d['iteration_time_s']:.4f} s/iteration with link sharing and overlap "
              f"(formula: {plan.predicted['iteration_time_s']:.4f} s); trace {out / 'trace.json'} "
              f"(open in ui.perfetto.dev), Gantt chart {out / 'gantt.png'}", highlight=False)


DEMO_STEPS.append(_demo_simulate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetalloc", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("catalog", help="list built-in device types, links and models")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_catalog)

    pl = sub.add_parser(
        "plan", help="find the best way to split a model over a cluster",
        description="Solve the allocation program: layers to pipeline stages, stages and micro-batch shares "
                    "to devices. Times are seconds, memory GiB, throughput samples/s and tokens/s; the "
                    "global batch is in samples (sequences of --seq tokens).")
    pl.add_argument("--cluster", required=True, help="cluster spec YAML (see examples/)")
    _add_cost_graph_args(pl)
    pl.add_argument("--global-batch", type=int, default=512, help="samples per iteration (default 512)")
    pl.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"], help="pipeline schedule")
    pl.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer (memory, step time)")
    pl.add_argument("--grad-sync", default="auto", choices=["auto", "ring", "hierarchical", "param_server"],
                    help="gradient synchronisation (auto: fastest predicted)")
    pl.add_argument("--time-limit", type=float, default=30.0, help="solver time limit in seconds (default 30)")
    pl.add_argument("--gap", type=float, default=1e-4, help="stop when proven within this relative gap")
    pl.add_argument("--solver", default="highs", choices=["highs", "pulp-highs", "pulp-cbc"],
                    help="MILP back end: HiGHS via highspy (default), or PuLP with HiGHS or CBC")
    pl.add_argument("--baseline", default=None, choices=["even", "proportional", "pipedream"],
                    help="return a baseline plan instead of solving")
    pl.add_argument("--no-compare", action="store_true", help="do not score the baselines for comparison")
    pl.add_argument("--exact-nodes", action="store_true",
                    help="one device class per node instead of per group of identical nodes (bigger program)")
    pl.add_argument("-o", "--output", default=None, help="write the plan JSON here")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    pl.add_argument("-v", "--verbose", action="store_true", help="show the solver's log")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="plan (and simulate) GPT-2 on the built-in 16-GPU lab cluster")
    d.add_argument("--out", default="demo-out", help="directory for plan.json and other outputs")
    d.add_argument("--model", default="gpt2-xl", help="model (default gpt2-xl)")
    d.add_argument("--global-batch", type=int, default=64, help="samples per iteration (default 64)")
    d.add_argument("--time-limit", type=float, default=30.0, help="solver time limit, seconds")
    d.add_argument("--run", action="store_true",
                   help="also close the loop on this machine: profile 2 CPU ranks (one slowed down), plan, "
                        "simulate, train with torchrun, and print predicted vs measured step time")
    d.set_defaults(func=cmd_demo)

    for mod in ("simulator.commands", "runtime.commands", "runtime.profile_cli"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HetallocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
