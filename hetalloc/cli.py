"""`hetalloc` command line: profile | plan | simulate | whatif | run | demo | catalog.

A thin face: it parses, calls a subsystem, prints. It is the only code in hetalloc/ that
imports the subsystems (allocator, simulator, runtime, workflows). Their commands are
imported explicitly, so a broken import is an error with its traceback, never a missing
command; none of them imports torch (training and profiling run as torchrun
subprocesses). User errors (HetallocError) are printed here, and only here, as one line.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from allocator import BASELINES, make_plan
from runtime import commands as run_commands
from runtime.profile import command as profile_commands
from simulator import commands as simulator_commands
from workflows import commands as workflow_commands
from workflows.demo import demo

from .calibrate import load_efficiency
from .checks import check_args
from .catalog import DEVICE_TYPES, LINK_TYPES
from .cluster import load_cluster
from .costgraph import analytic_cost_graph, load_cost_graph
from .errors import HetallocError, SpecError
from .models import MODELS, resolve_model
from .plan_view import print_plan, wide_console

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
    if args.cost_graph:
        return load_cost_graph(args.cost_graph)
    cg = analytic_cost_graph(resolve_model(args.model), args.seq, args.precision)
    if args.efficiency:
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
        raise SpecError("--efficiency-as", "", "needs --efficiency FILE", "pass the efficiency.json to map from")
    return cg


def cmd_catalog(args) -> int:
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
    cluster = load_cluster(args.cluster)
    cg = load_cost_graph_arg(args)
    con = wide_console(stderr=args.json)
    say = None if args.json or args.quiet else (lambda s: con.print(f"[dim]{s}[/dim]", highlight=False))
    plan = make_plan(cluster, cg, args.global_batch, schedule=args.schedule, optimizer=args.optimizer,
                     grad_sync=args.grad_sync, time_limit=args.time_limit, gap=args.gap, backend=args.solver,
                     baseline=args.baseline, compare_baselines=not args.no_compare,
                     group_identical_nodes=not args.exact_nodes, msg=args.verbose, progress=say, tp=args.tp,
                     recompute=args.recompute, optimizer_sharding=args.optimizer_sharding)
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
    demo(args.out, wide_console(), model=args.model, global_batch=args.global_batch, time_limit=args.time_limit,
         run=args.run)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors (unknown flag, invalid choice, not a number) as one line
    on stderr, exit code 2, like every other bad input; subcommands inherit it."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="hetalloc", description=__doc__.splitlines()[0])
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
    pl.add_argument("--time-limit", type=float, default=30.0,
                    help="wall time of the whole command in seconds (default 30); the best plan and its proven "
                         "bound are returned when it runs out")
    pl.add_argument("--gap", type=float, default=0.0,
                    help="stop as soon as the plan is proven within this relative gap (default 0: prove it optimal)")
    pl.add_argument("--solver", default="highs", choices=["highs", "pulp-highs", "pulp-cbc"],
                    help="MILP back end: HiGHS via highspy (default), or PuLP with HiGHS or CBC")
    pl.add_argument("--baseline", default=None, choices=list(BASELINES),
                    help="return a baseline plan instead of solving")
    pl.add_argument("--tp", default="auto", choices=["auto", "1", "2", "4", "8"],
                    help="largest tensor-parallel group: devices of one type in one node (auto: search each size "
                         "that splits the nodes differently; 1: none)")
    pl.add_argument("--recompute", default="auto", choices=["auto", "none", "full"],
                    help="activation recomputation per stage (auto: each stage chooses)")
    pl.add_argument("--optimizer-sharding", default="auto", choices=["auto", "none", "zero1"],
                    help="optimizer state sharded over the devices that hold the same layers (auto: where it helps)")
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

    simulator_commands.register(sub)
    workflow_commands.register(sub)
    workflow_commands.add_adaptive(run_commands.register(sub))
    workflow_commands.add_shared_fit(profile_commands.register(sub))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a parse error already printed as one line
        return e.code if isinstance(e.code, int) else 2
    try:
        check_args(args)
        return int(args.func(args) or 0)
    except HetallocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
