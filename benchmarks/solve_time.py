"""Solve time and proven gap of the planner versus cluster size and model depth.

Clusters: lab-16 (2 types), mix-64 (3 types), mix-256 (mix-64 with 4x the nodes) and
fleet-1024 (4 types). Models: gpt3-1.3b (24 blocks), gpt3-2.7b (32), gpt3-6.7b (32),
llama2-7b (32), gpt3-13b (40), llama2-13b (40), gpt2-xl (48), llama2-70b (80) and
gpt3-175b at seq 512 (96 blocks). --space v1 searches single devices without
recomputation or sharding (the plan space the targets were set on); v2 (default) what
'hetalloc plan' searches: tensor-parallel units, per-stage recomputation, zero1.

Targets (this 2-core machine): every mix-64 instance with <= 34 layers proven optimal
in <= 5 s; lab-16 optimal in <= 2 s; mix-256 and fleet-1024 proven within 1 % in <= 60 s.
Each instance reports wall seconds, whether the work budget or the wall clock (the last
resort: a result that depends on the machine's speed) ended it, the process's CPU seconds and its build worker's
(allocator.ahead: shapes built ahead on the second core; on a busy machine the CPU
figures are what it would take on an idle one).

RESULTS.md's run (options: --quick for the two target instances, --only CLUSTER:MODEL ...,
--out DIR):

    python benchmarks/solve_time.py --time-limit 60 --space v1
    python benchmarks/solve_time.py --time-limit 60 --space v2

Prints a table and writes OUT/solve_time_SPACE.json (OUT: --out, default benchmarks/out).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from allocator.api import plan_spaces, tp_degrees
from allocator.problem import Problem
from allocator.search import search
from hetalloc.cluster import cluster_from_dict, load_cluster
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.fileio import atomic_write_json
from hetalloc.models import get_model

ROOT = Path(__file__).resolve().parent.parent


def clusters():
    lab = load_cluster(ROOT / "examples" / "lab-16.yaml")
    mix = load_cluster(ROOT / "examples" / "mix-64.yaml")
    raw = yaml.safe_load((ROOT / "examples" / "mix-64.yaml").read_text())
    big = copy.deepcopy(raw)
    big["name"] = "mix-256"
    for n in big["nodes"]:
        n["count"] = n.get("count", 1) * 4
    fleet = load_cluster(ROOT / "examples" / "fleet-1024.yaml")
    return [lab, mix, cluster_from_dict(big, "mix-256 (mix-64 x 4)"), fleet]


MODELS = [("gpt3-1.3b", 2048), ("gpt3-2.7b", 2048), ("gpt3-6.7b", 2048), ("llama2-7b", 2048),
          ("gpt3-13b", 2048), ("llama2-13b", 2048), ("gpt2-xl", 1024), ("llama2-70b", 2048), ("gpt3-175b", 512)]


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the search's build worker,
    allocator.ahead)."""
    t = os.times()
    return t.children_user + t.children_system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true", help="only the two target instances")
    ap.add_argument("--only", nargs="*", metavar="CLUSTER:MODEL", help="only these instances, e.g. mix-64:gpt3-2.7b")
    ap.add_argument("--space", choices=["v1", "v2"], default="v2",
                    help="v1: single devices, no recomputation or sharding (the plan space of the search issue); "
                         "v2 (default): what 'hetalloc plan' searches (tensor-parallel units, recomputation, zero1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR",
                    help="output directory (default benchmarks/out)")
    args = ap.parse_args()
    rows = []
    for cl in clusters():
        B = 64 if cl.num_devices <= 16 else (512 if cl.num_devices <= 256 else 2048)
        for model, seq in MODELS:
            target = (cl.num_devices, model) in ((64, "gpt3-2.7b"), (1024, "gpt3-175b"))
            if (args.quick and not target) or (args.only and f"{cl.name.split()[0]}:{model}" not in args.only):
                continue
            cg = analytic_cost_graph(get_model(model), seq)
            if args.space == "v1":
                probs = [Problem(cl, cg, B, recompute="none")]
            else:
                probs = plan_spaces(cl, cg, B, tp_degrees(cl, cg, "auto"), "auto")
            t0, c0, w0 = time.perf_counter(), time.process_time(), _children_cpu()
            res = search(probs, time_limit=args.time_limit)
            row = {"cluster": cl.name, "devices": cl.num_devices, "types": len(cl.type_counts()),
                   "nodes": len(cl.nodes), "model": model, "layers": cg.num_layers, "global_batch": B,
                   "space": args.space, "spaces": len(probs),
                   "plan_tp": res.prob.tp, "plan_sharding": res.prob.optimizer_sharding,
                   "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                   "worker_cpu_seconds": _children_cpu() - w0,
                   "status": res.status, "stopped_by_clock": res.stopped_by_clock,
                   "objective_s": res.best.objective_s if res.best else math.inf,
                   "bound_s": res.bound, "gap": res.gap}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    t = Table(title=f"planner solve time (limit {args.time_limit:g} s, plan space {args.space})")
    for c in ("cluster", "GPUs", "types", "model", "layers", "seconds", "cpu s", "worker cpu s", "status", "ended by",
              "objective s", "gap"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["cluster"], str(r["devices"]), str(r["types"]), r["model"], str(r["layers"]),
                  f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}", f"{r['worker_cpu_seconds']:.1f}", r["status"],
                  "clock" if r["stopped_by_clock"] else ("work" if r["status"] == "time_limit" else "-"),
                  f"{r['objective_s']:.4g}",
                  f"{r['gap']:.2%}" if math.isfinite(r["gap"]) else "unknown")
    Console(width=160).print(t)
    out = Path(args.out) / "solve_time.json"
    out = out.with_name(f"solve_time_{args.space}.json")
    atomic_write_json(out, {"time_limit_s": args.time_limit, "space": args.space, "load_average": os.getloadavg(),
                            "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
