"""Plan quality: the planner against the baselines users would otherwise use.

For every example cluster x model: predicted throughput (samples/s, from the shared cost
formulas) of the planner's plan and of each baseline (allocator.baselines.BASELINES: even
split as Megatron-LM / DeepSpeed assume without TP, speed-proportional split, PipeDream's
DP, Megatron-LM's recipe with TP = GPUs per node and recompute when needed, Metis's
search), and each one's ratio to the ideal bound (total training FLOPs / sum of the
cluster's peak FLOP/s, no communication). Each baseline gets the work bound the planner
gives it for --time-limit (allocator.baselines.limits_for).

The planner's plan is what `hetalloc plan` returns (the search seeded by the baselines'
plans; a baseline's own plan where it predicts faster, marked in the status column).

Targets (issue 2): the planner is never worse than the best baseline; it beats the even
split by >= 1.3x geometric mean on the strongly heterogeneous clusters (mix-64, fleet-1024).
Issue 9: it beats megatron by >= 1.3x geometric mean there.

RESULTS.md's run (options: --quick for two models per cluster, --out DIR):

    python benchmarks/plan_quality.py --time-limit 60

Prints a table and writes OUT/plan_quality.json (OUT: --out, default benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from allocator import BASELINES, baseline_plan, make_plan
from allocator.baselines import limits_for
from hetalloc.cluster import load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.errors import InfeasibleError
from hetalloc.fileio import atomic_write_json
from hetalloc.models import get_model

ROOT = Path(__file__).resolve().parent.parent
HETERO = {"mix-64", "fleet-1024", "consumer-24"}

# (cluster file, global batch, [(model, seq)])
INSTANCES = [
    ("lab-16.yaml", 64, [("gpt2-medium", 1024), ("gpt2-xl", 1024), ("bert-large", 512), ("gpt3-1.3b", 1024)]),
    ("mix-64.yaml", 512, [("gpt2-xl", 1024), ("gpt3-1.3b", 2048), ("gpt3-2.7b", 1024), ("llama2-7b", 1024),
                          ("llama2-70b", 1024), ("gpt3-175b", 2048)]),
    ("fleet-1024.yaml", 2048, [("gpt3-6.7b", 2048), ("gpt3-13b", 2048), ("llama2-13b", 2048),
                               ("llama2-70b", 1024), ("gpt3-175b", 2048)]),
    ("consumer-24.yaml", 64, [("llama2-7b", 4096)]),
]


def ideal_throughput(cluster, cg) -> float:
    """Samples/s if every device ran at peak with no communication or bubbles."""
    return cluster.total_peak_flops() / cg.train_flops_per_sample()


def run(time_limit: float, quick: bool) -> list[dict]:
    rows = []
    for cfile, B, models in INSTANCES:
        cluster = load_cluster(ROOT / "examples" / cfile)
        for model, seq in (models[:2] if quick else models):
            cg = analytic_cost_graph(get_model(model), seq)
            row = {"cluster": cluster.name, "devices": cluster.num_devices, "model": model, "seq": seq,
                   "global_batch": B, "ideal_samples_per_s": ideal_throughput(cluster, cg)}
            t0 = time.perf_counter()
            try:
                # what `hetalloc plan` returns: the search seeded by the baselines' plans, the
                # fastest-predicted of its best plans, or a baseline's plan if that predicts
                # faster still (``planner_source`` says which)
                plan = make_plan(cluster, cg, B, time_limit=time_limit)
                row["planner_samples_per_s"] = plan.predicted["throughput_samples_per_s"]
                row["planner_source"] = "search" if plan.planner == "ilp" else f"baseline {plan.planner}"
                row["planner_status"] = plan.solver.get("status")
                row["planner_gap"] = plan.solver.get("gap")
                row["planner_seconds"] = time.perf_counter() - t0
                row["planner_shape"] = f"R={len(plan.replicas)} S={plan.num_stages} M={plan.num_microbatches}"
            except InfeasibleError as e:
                row["planner_samples_per_s"] = 0.0
                row["planner_status"] = f"infeasible: {e}"
            for name in BASELINES:
                t1 = time.perf_counter()
                try:
                    bp = baseline_plan(name, cluster, cg, B, work=limits_for(time_limit, t1)[0])
                    row[f"{name}_samples_per_s"] = bp.predicted["throughput_samples_per_s"]
                    row[f"{name}_shape"] = (f"R={len(bp.replicas)} S={bp.num_stages} M={bp.num_microbatches}"
                                            + (" cut" if any("work bound" in n for n in bp.notes) else ""))
                except InfeasibleError as e:
                    row[f"{name}_samples_per_s"] = 0.0
                    row[f"{name}_shape"] = str(e)
                row[f"{name}_seconds"] = time.perf_counter() - t1
            best_base = max(row[f"{n}_samples_per_s"] for n in BASELINES)
            row["best_baseline_samples_per_s"] = best_base
            row["planner_vs_best_baseline"] = (row["planner_samples_per_s"] / best_base) if best_base else math.inf
            for name in ("even", "megatron"):
                row[f"planner_vs_{name}"] = (row["planner_samples_per_s"] / row[f"{name}_samples_per_s"]
                                             if row[f"{name}_samples_per_s"] else math.inf)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("cluster", "model", "planner_samples_per_s",
                                                  "best_baseline_samples_per_s", "planner_status")}),
                  file=sys.stderr, flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    def geo(xs):
        xs = [x for x in xs if x > 0 and math.isfinite(x)]
        return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan

    hetero = [r for r in rows if r["cluster"] in HETERO]
    return {
        "never_worse_than_best_baseline": all(r["planner_vs_best_baseline"] >= 1 - 1e-9 for r in rows),
        "geomean_vs_even_hetero": geo([r["planner_vs_even"] for r in hetero]),
        "even_infeasible_hetero": sum(1 for r in hetero if not r["even_samples_per_s"]),
        "geomean_vs_megatron_hetero": geo([r["planner_vs_megatron"] for r in hetero]),
        "megatron_infeasible_hetero": sum(1 for r in hetero if not r["megatron_samples_per_s"]),
        "geomean_vs_best_baseline_all": geo([r["planner_vs_best_baseline"] for r in rows]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=60.0, help="planner time limit per instance, seconds")
    ap.add_argument("--quick", action="store_true", help="two models per cluster")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR",
                    help="output directory (default benchmarks/out)")
    args = ap.parse_args()
    rows = run(args.time_limit, args.quick)
    summary = summarise(rows)
    t = Table(title="predicted throughput, samples/s (x ideal bound)")
    for c in ("cluster", "model", "planner", *BASELINES, "ideal", "vs best base", "vs even", "vs megatron",
              "status / gap"):
        t.add_column(c)

    def cell(r, k):
        v = r[f"{k}_samples_per_s"]
        return f"{v:,.1f} ({v / r['ideal_samples_per_s']:.2f})" if v else "does not fit"

    for r in rows:
        gap = r.get("planner_gap")
        t.add_row(r["cluster"], f"{r['model']}@{r['seq']}", cell(r, "planner"), *(cell(r, n) for n in BASELINES),
                  f"{r['ideal_samples_per_s']:,.1f}", f"{r['planner_vs_best_baseline']:.2f}x",
                  f"{r['planner_vs_even']:.2f}x", f"{r['planner_vs_megatron']:.2f}x",
                  (f"{r['planner_status']} {gap:.1%}" if isinstance(gap, float) and math.isfinite(gap)
                   else str(r["planner_status"])) + (f" ({r['planner_source']})" if r.get("planner_source",
                                                                                          "search") != "search" else ""))
    Console(width=200).print(t)
    print(json.dumps(summary, indent=2))
    out = Path(args.out) / "plan_quality.json"
    atomic_write_json(out, {"time_limit_s": args.time_limit, "rows": rows, "summary": summary})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
