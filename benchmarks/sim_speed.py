"""Simulator speed: wall time and events/s to simulate one iteration, against scale.

Clusters of 8, 64, 512 and 4096 GPUs (8-GPU nodes of four kinds: A100-80G/NVLink3/HDR,
H100-80G/NVLink4/NDR, A100-40G/NVLink3/HDR, L40S/PCIe4/100GbE, in turn), fabric 2:1
oversubscribed. Plan: every node is one 8-stage pipeline replica of GPT-3 6.7B (even
layer split), data parallel across nodes (so each stage's ring all-reduce spans every
node), 32 micro-batches, 1F1B, ring all-reduce; H100 replicas take 2 samples per
micro-batch, the others 1. Simulated with link contention and overlap (DDP buckets of
25 MiB) unless --no-contention / --no-overlap.

RESULTS.md's run (options: --microbatches, --model, --no-contention, --no-overlap, --out DIR):

    python benchmarks/sim_speed.py --sizes 8,64,512,4096 --unfolded-up-to 4096

Prints a table and writes OUT/sim_speed.json (OUT: --out, default benchmarks/out).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hetalloc.cluster import cluster_from_dict
from hetalloc.costgraph import analytic_cost_graph
from hetalloc.fileio import atomic_write_json
from hetalloc.models import get_model
from hetalloc.plan import Group, Plan, Replica, Stage
from simulator import simulate

ROOT = Path(__file__).resolve().parents[1]

NODE_KINDS = [("A100-80G", "NVLink3", "IB-HDR", 1), ("H100-80G", "NVLink4", "IB-NDR", 2),
              ("A100-40G", "NVLink3", "IB-HDR", 1), ("L40S", "PCIe4", "Eth-100G", 1)]
STAGES = 8


def cluster(num_devices: int):
    nodes = []
    for k in range(num_devices // 8):
        t, intra, nic, _ = NODE_KINDS[k % len(NODE_KINDS)]
        nodes.append({"name": f"n{k}", "gpus": [{"type": t, "count": 8}], "intra_link": intra, "nic": nic})
    return cluster_from_dict({"name": f"bench-{num_devices}", "fabric": {"oversubscription": 2}, "nodes": nodes})


def plan_for(cl, cg, num_microbatches: int) -> Plan:
    L = cg.num_layers
    cuts = [round(i * L / STAGES) for i in range(STAGES + 1)]
    share = {t: mb for t, _, _, mb in NODE_KINDS}
    replicas = []
    for node in cl.nodes:
        mb = share[node.devices[0].type]
        replicas.append(Replica([Stage(cuts[s], cuts[s + 1], [Group([node.devices[s].id], mb)])
                                 for s in range(STAGES)]))
    B = num_microbatches * sum(r.microbatch for r in replicas)
    return Plan(cg.model, cg.seq_len, B, num_microbatches, "1f1b", "ring", replicas, precision=cg.precision)


def measure(n: int, args, fold: bool) -> dict:
    cl = cluster(n)
    cg = analytic_cost_graph(get_model(args.model))
    plan = plan_for(cl, cg, args.microbatches)
    t0 = time.perf_counter()
    rep = simulate(plan, cl, cg, contention=not args.no_contention, overlap=not args.no_overlap, fold=fold,
                   record=False, compare=False)
    wall = time.perf_counter() - t0
    return {"devices": n, "fold": fold, "wall_s": wall, "sim_s": rep.performance["wall_s"],
            "events": rep.performance["events"], "events_per_s": rep.performance["events"] / rep.performance["wall_s"],
            "simulated_devices": rep.folding["simulated_devices"], "network_solves": rep.performance["network_solves"],
            "iteration_time_s": rep.iteration_time_s, "microbatches": args.microbatches,
            "global_batch": plan.global_batch}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8,64,512,4096")
    ap.add_argument("--unfolded-up-to", type=int, default=512,
                    help="also simulate every replica (no folding) up to this many devices")
    ap.add_argument("--microbatches", type=int, default=32)
    ap.add_argument("--model", default="gpt3-6.7b")
    ap.add_argument("--no-contention", action="store_true")
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR",
                    help="output directory (default benchmarks/out)")
    args = ap.parse_args()
    rows = []
    t = Table(title="simulator speed: one iteration")
    for c in ("devices", "fold", "simulated", "events", "wall s", "events/s", "iteration s"):
        t.add_column(c, justify="right")
    for n in [int(x) for x in args.sizes.split(",")]:
        for fold in ([True, False] if n <= args.unfolded_up_to else [True]):
            r = measure(n, args, fold)
            rows.append(r)
            print(f"{n} devices, fold {'yes' if fold else 'no'}: {r['wall_s']:.2f} s", file=sys.stderr, flush=True)
            t.add_row(str(n), "yes" if fold else "no", str(r["simulated_devices"]), f"{r['events']:,}",
                      f"{r['wall_s']:.2f}", f"{r['events_per_s']:,.0f}", f"{r['iteration_time_s']:.5g}")
    Console(width=120).print(t)
    out = Path(args.out) / "sim_speed.json"
    atomic_write_json(out, {"benchmark": "sim_speed", "machine": platform.platform(),
                            "python": platform.python_version(), "args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
