"""The closed loop: profile this machine, plan from the profile, simulate the plan, run it,
and put predicted next to measured, per stage and overall.

``closed_loop`` is what ``hetalloc demo --run`` calls: 2 CPU ranks, rank 1 slowed down
2x (``--slowdown 1=2``, the same mechanism in the profile and in the run), GPT-2 tiny.
``measure`` does one configuration (a plan on a profiled cluster): simulate, run, compare;
benchmarks/sim_accuracy.py runs it over many. The recipe by hand:

    hetalloc profile --nproc 2 --slowdown 1=2 --seq 64 --out prof
    hetalloc plan --cluster prof/cluster.yaml --cost-graph prof/cost_graph.json \\
        --model gpt2-tiny --global-batch 32 -o plan.json
    hetalloc simulate plan.json
    hetalloc run plan.json --slowdown 1=2 --steps 12

It sits above the subsystems it drives (allocator, simulator, runtime) so that none of them
depends on another. Never imports torch (the profile and the run are torchrun subprocesses).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allocator import make_plan
from hetalloc.cluster import Cluster, load_cluster
from hetalloc.costgraph import CostGraph, load_cost_graph
from hetalloc.fileio import atomic_write_json
from hetalloc.models import resolve_model
from hetalloc.plan import Plan
from runtime.config import slowdown_for_plan
from runtime.launch import run_local
from runtime.plans import describe
from runtime.profile.command import run_profile
from runtime.profile.files import report_lines
from simulator import simulate
from simulator.engine import prediction_iterations

from .hostfit import FIT_FILE, fit_efficiency
from .hostload import ForeignCpu

RUN_WARMUP_STEPS = 2
"""Leading steps of a run left out (shape inference, allocator and gloo warm-up)."""
MEASURED_KIND = {"compute": "compute_s", "p2p": "p2p_wait_s", "allreduce": "grad_sync_s", "optimizer": "optimizer_s",
                 "loss": "loss_sync_s", "other": "other_s"}
"""The runtime's measured category (runtime.metrics.StepTimes) of each kind of simulated
work (simulator.report.WORK_KINDS)."""


@dataclass
class Profiled:
    """A profile directory, loaded."""

    out_dir: Path
    cost_graph: CostGraph
    cluster: Cluster
    report: dict[str, Any]
    slowdown: dict[int, float] = field(default_factory=dict)

    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.cluster.devices]


def profile_batch_sizes(largest: int) -> str:
    """The micro-batch sizes (``--batch-sizes``) a profile times for plans of up to
    `largest` samples per micro-batch on one device (a plan's global batch, when one
    device may take all of it): powers of two up to it, and it. A cost graph read beyond
    its largest timed size extrapolates the last segment's slope, and on CPUs a size
    whose activations outgrow the caches costs more per sample than that (measured on the
    quiet host: a micro-batch of 32 took 11 % more than extrapolated from 8 and 16)."""
    if largest < 1:
        raise ValueError("largest must be at least 1.")
    sizes = {1 << k for k in range(largest.bit_length()) if 1 << k <= largest} | {largest}
    return ",".join(str(b) for b in sorted(sizes))


def profile_machine(out_dir: str | Path, *, nproc: int = 2, model: str = "gpt2-tiny", seq: int = 64,
                    batch_sizes: str = "1,2,4,8,16", slowdown: dict[int, float] | None = None,
                    repeats: int = 15, reuse: bool = False) -> Profiled:
    """Profile (or, with reuse, load an existing profile of the same request)."""
    out = Path(out_dir)
    slowdown = dict(slowdown or {})
    # The model is compared by what it is (its recorded shape and config), not by how it
    # was named: a config file's path never equals the name the profile records.
    want = {"model_spec": resolve_model(model).to_dict(), "seq_len": seq, "world_size": nproc,
            "batch_sizes": [int(b) for b in batch_sizes.split(",")],
            "slowdown": {str(k): v for k, v in sorted(slowdown.items())}, "repeats": repeats}
    report = None
    if reuse and (out / "report.json").exists():
        old = json.loads((out / "report.json").read_text())
        if all(old.get(k) == v for k, v in want.items()):
            report = old
            if (out / FIT_FILE).exists():
                report["share_efficiency_fit"] = json.loads((out / FIT_FILE).read_text())
    if report is None:
        with ForeignCpu() as host:
            report = run_profile(out, nproc=nproc, model=model, seq=seq, batch_sizes=batch_sizes, repeats=repeats,
                                 slowdown=[f"{k}={v:g}" for k, v in sorted(slowdown.items())])
        report = {**report, "foreign_cpu_share": host.share}
        shared = fit_efficiency(out, foreign_share=host.share)  # more ranks than cores (workflows.hostfit)
        if shared is not None:
            report["share_efficiency_fit"] = shared
        else:
            (out / FIT_FILE).unlink(missing_ok=True)  # an earlier profile's
    return Profiled(out, load_cost_graph(out / "cost_graph.json"), load_cluster(out / "cluster.yaml"), report,
                    slowdown)


def slowdown_args(prof: Profiled, plan: Plan) -> list[str]:
    """--slowdown arguments for a run of `plan`: by device id, so they follow the device
    whatever rank the plan gives it."""
    return slowdown_for_plan(prof.device_ids, prof.slowdown, set(plan.device_ids()))


def measure(plan: Plan, prof: Profiled, out_dir: str | Path, *, steps: int = 12, name: str = "") -> dict[str, Any]:
    """Simulate and run one plan made for a profiled cluster; predicted vs measured."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    # where the profile measured how a rank's compute varies from step to step, the
    # prediction is the median iteration of a noisy simulation, as the measurement is the median step
    sim = simulate(plan, prof.cluster, prof.cost_graph, iterations=prediction_iterations(prof.cluster))
    with ForeignCpu() as host:
        summary = run_local(out / "plan.json", steps=steps, slowdown=slowdown_args(prof, plan), out_dir=out / "run",
                            capture=True, extra=["--warmup-steps", str(RUN_WARMUP_STEPS)],
                            threads=profiled_threads(prof))
    summary.pop("output", None)
    measured = summary["measured"]["step_time_median_s"]
    predicted = sim.iteration_time_s
    work = sim.result.work
    stages = []
    for r in summary["ranks"]:
        d = r["device"]
        sd = sim.devices[d]
        rep = sd.get("represented_by", d)
        m = r["measured"]
        dt = prof.cluster.device(d)
        dtype = prof.cluster.device_types[dt.type]
        stages.append({
            "rank": r["rank"], "device": d, "type": prof.cluster.device(d).type, "replica": r["replica"],
            "stage": r["stage"], "layers": r["layers"], "share": r["share"], "slowdown": r["slowdown"],
            "predicted": {"compute_s": sd["compute_fb_s"], "optimizer_s": work[rep].optimizer_s,
                          "grad_sync_s": r["predicted"]["grad_sync_s"], "p2p_s": r["predicted"]["p2p_s"],
                          "busy_s": sd["busy_s"],
                          # the runtime's own time the formulas add (in compute_s and optimizer_s)
                          "op_overhead_s": 2 * plan.num_microbatches * dtype.op_runtime_s,
                          "step_overhead_s": dtype.step_overhead_s},
            "measured": {k: m[k] for k in ("compute_s", "optimizer_s", "grad_sync_s", "p2p_wait_s", "loss_sync_s",
                                           "other_s", "step_s")},
            "work_simulated_s": dict(sd["work_s"]),
            "work_measured_s": {k: m[v] for k, v in MEASURED_KIND.items()},
        })
    kinds = list(MEASURED_KIND)
    work_sim = {k: sum(s["work_simulated_s"][k] for s in stages) for k in kinds}
    work_meas = {k: sum(s["work_measured_s"][k] for s in stages) for k in kinds}
    row = {
        "name": name or describe(plan), "layout": describe(plan), "model": plan.model, "seq_len": plan.seq_len,
        "global_batch": plan.global_batch, "num_microbatches": plan.num_microbatches, "schedule": plan.schedule,
        "replicas": len(plan.replicas), "stages": plan.num_stages, "ranks": len(plan.device_ids()),
        "grad_sync": plan.grad_sync, "slowdown": {d: f for d, f in (a.split("=") for a in slowdown_args(prof, plan))},
        "formula_s": plan.predicted["iteration_time_s"], "predicted_s": predicted, "measured_s": measured,
        "measured_mean_s": summary["measured"]["step_time_s"],
        "measured_step_times_s": _step_times(out / "run"),
        "error": (predicted - measured) / measured, "per_stage": stages, "steps": steps,
        "warmup_steps": RUN_WARMUP_STEPS, "run_dir": str(out), "profile_dir": str(prof.out_dir),
        "work_simulated_s": work_sim, "work_measured_s": work_meas,
        "cluster_shares_compute": any(n.shares_compute for n in prof.cluster.nodes),
        "profile_trusted": (prof.report.get("noise_check") or {}).get("trusted"),
        # what other processes took of the host's CPU during the run (workflows.hostload)
        "foreign_cpu_share": host.share, "disturbed": host.disturbed,
    }
    atomic_write_json(out / "comparison.json", row)
    return row


def profiled_threads(prof: Profiled) -> int | None:
    """The intra-op threads per rank the profile measured with: a run of a plan that uses
    fewer devices than were profiled would otherwise get more threads per rank (another
    device than the one profiled). None when the profile does not say."""
    threads = {r.get("threads") for r in prof.report.get("ranks", [])}
    return threads.pop() if len(threads) == 1 and None not in threads else None


def _step_times(run_dir: Path) -> list[float]:
    recs = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
    return [r["step_time_s"] for r in recs[RUN_WARMUP_STEPS:]]


def comparison_table(rows: list[dict[str, Any]], title: str = "predicted (simulated) vs measured"):
    """A rich table: per stage (device) compute, optimizer and step time, then overall."""
    from rich.table import Table

    t = Table(title=title)
    for col, just in [("plan", "left"), ("stage", "right"), ("device", "left"), ("share", "right"),
                      ("compute ms pred/meas", "right"), ("optim ms pred/meas", "right"),
                      ("sync ms pred/meas", "right"), ("step ms pred/meas", "right"), ("error", "right")]:
        t.add_column(col, justify=just)
    for row in rows:
        for s in row["per_stage"]:
            p, m = s["predicted"], s["measured"]
            t.add_row(row["name"], f"{s['replica']}.{s['stage']}", f"{s['device']} ({s['type']})", str(s["share"]),
                      f"{p['compute_s'] * 1e3:.1f} / {m['compute_s'] * 1e3:.1f}",
                      f"{p['optimizer_s'] * 1e3:.1f} / {m['optimizer_s'] * 1e3:.1f}",
                      f"{p['grad_sync_s'] * 1e3:.1f} / {m['grad_sync_s'] * 1e3:.1f}", "", "")
        t.add_row(f"[bold]{row['name']}[/bold]", "all", row["layout"], "", "", "", "",
                  f"[bold]{row['predicted_s'] * 1e3:.1f} / {row['measured_s'] * 1e3:.1f}[/bold]",
                  f"[bold]{100 * row['error']:+.1f}%[/bold]", end_section=True)
    return t


def closed_loop(out_dir: str | Path, console=None, *, model: str = "gpt2-tiny", seq: int = 64, global_batch: int = 32,
                slowdown: float = 2.0, steps: int = 12, time_limit: float = 10.0, compare_even: bool = True,
                reuse_profile: bool = False) -> dict[str, Any]:
    """Profile 2 CPU ranks (rank 1 slowed down), plan, simulate, run; print predicted vs
    measured per stage and overall; returns (and writes out_dir/loop.json) the figures."""
    out = Path(out_dir)
    def say(line: str) -> None:
        if console is not None:
            console.print(line, highlight=False)
        else:
            print(line)

    say(f"closed loop: profiling 2 CPU ranks (rank 1 slowed {slowdown:g}x) with {model}, seq {seq} ...")
    prof = profile_machine(out / "profile", nproc=2, model=model, seq=seq, slowdown={1: slowdown},
                           batch_sizes=profile_batch_sizes(max(16, global_batch)), reuse=reuse_profile)
    for line in report_lines(prof.report, prof.cost_graph):
        say(line)
    plans = {"planner": make_plan(prof.cluster, prof.cost_graph, global_batch, time_limit=time_limit)}
    if compare_even:
        plans["even"] = make_plan(prof.cluster, prof.cost_graph, global_batch, baseline="even")
    rows = []
    for name, plan in plans.items():
        say(f"{name} plan: {describe(plan)}; simulating and running {steps} steps ...")
        rows.append(measure(plan, prof, out / name, steps=steps, name=name))
    table = comparison_table(rows, title=f"{model} on this machine (2 CPU ranks, one {slowdown:g}x slower): "
                                         "predicted (simulated) vs measured")
    if console is not None:
        console.print(table)
    else:
        from rich.console import Console
        Console(width=140).print(table)
    result = {"profile": str(prof.out_dir), "rows": rows}
    if compare_even:
        by = {r["name"]: r for r in rows}
        speedup = by["even"]["measured_s"] / by["planner"]["measured_s"]
        result["planner_speedup_measured"] = speedup
        result["planner_speedup_predicted"] = by["even"]["predicted_s"] / by["planner"]["predicted_s"]
        say(f"measured: the planner's plan takes {by['planner']['measured_s'] * 1e3:.1f} ms/step, the even split "
            f"{by['even']['measured_s'] * 1e3:.1f} ms/step ({speedup:.2f}x faster; predicted "
            f"{result['planner_speedup_predicted']:.2f}x)")
    errs = [abs(r["error"]) for r in rows]
    result["mean_abs_error"] = statistics.fmean(errs)
    say(f"mean absolute error of the simulated step time: {100 * result['mean_abs_error']:.1f}%")
    atomic_write_json(out / "loop.json", result)
    return result
