"""Heterogeneity matters: on a two-device cluster where one device is half as fast
(examples/cpu-2-slow.yaml, the slow device emulated with --slowdown <device>=2), run the
even-split plan (Megatron/DeepSpeed style) and the planner's plan for the same cluster,
and compare measured step times with each other and with their predictions.

RESULTS.md's run (options: --quick for the small case only, --out DIR):

    python benchmarks/runtime_hetero.py --steps 12

Prints a table and writes OUT/runtime_hetero.json, the plans and runs under
OUT/runtime_hetero/ (OUT: --out, default benchmarks/out). It plans from the catalog's
rough CPU figures, not from a profile of this machine, so predictions are off in
absolute terms (benchmarks/sim_accuracy.py plans from a profile); the comparison that
matters is measured planner vs measured even split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from allocator import make_plan
from hetalloc.cluster import load_cluster
from hetalloc.fileio import atomic_write_json
from runtime.launch import run_local
from runtime.plans import cpu_cost_graph, describe

ROOT = Path(__file__).resolve().parents[1]
SLOWDOWN = 2.0
# (model, seq_len, global batch): data parallel with uneven shares, and a pipeline.
CASES = [("gpt2-tiny", 64, 32), ("gpt2-small", 32, 8)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per run (the first is warm-up)")
    ap.add_argument("--quick", action="store_true", help="only the small case")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR",
                    help="output directory (default benchmarks/out)")
    a = ap.parse_args(argv)
    out = Path(a.out) / "runtime_hetero"
    cluster = load_cluster(ROOT / "examples" / "cpu-2-slow.yaml")
    slow = [d.id for d in cluster.devices if d.type == "CPU-slow"]
    rows = []
    for model, seq, batch in CASES[:1] if a.quick else CASES:
        cg = cpu_cost_graph(model, seq)
        plans = {"even": make_plan(cluster, cg, batch, baseline="even"),
                 "planner": make_plan(cluster, cg, batch, time_limit=10)}
        for name, plan in plans.items():
            path = out / f"{model}-{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            plan.save(path)
            s = run_local(path, steps=a.steps, slowdown=[f"{d}={SLOWDOWN:g}" for d in slow],
                          out_dir=out / f"{model}-{name}", capture=True)
            m = s["measured"]
            rows.append({"model": model, "seq_len": seq, "global_batch": batch, "plan": name,
                         "layout": describe(plan), "grad_sync": plan.grad_sync,
                         "measured_step_s": m["step_time_median_s"], "measured_mean_step_s": m["step_time_s"],
                         "predicted_step_s": plan.predicted["iteration_time_s"],
                         "samples_per_s": plan.global_batch / m["step_time_median_s"],
                         "ranks": [{k: r[k] for k in ("rank", "device", "slowdown")} | r["measured"]
                                   for r in s["ranks"]]})
            print(f"  {model} {name}: {rows[-1]['measured_step_s']:.4f} s/step", flush=True)
    t = Table(title=f"measured vs predicted step time, one device slowed {SLOWDOWN:g}x")
    for c, just in (("model", "left"), ("plan", "left"), ("layout", "left"), ("measured s", "right"),
                    ("predicted s", "right"), ("samples/s", "right")):
        t.add_column(c, justify=just)
    for r in rows:
        t.add_row(r["model"], r["plan"], r["layout"], f"{r['measured_step_s']:.4f}", f"{r['predicted_step_s']:.4f}",
                  f"{r['samples_per_s']:.1f}")
    Console(width=140).print(t)
    verdicts = []
    for model, _, _ in CASES[:1] if a.quick else CASES:
        by = {r["plan"]: r for r in rows if r["model"] == model}
        speedup = by["even"]["measured_step_s"] / by["planner"]["measured_step_s"]
        pred = by["even"]["predicted_step_s"] / by["planner"]["predicted_step_s"]
        ok = speedup > 1.0
        verdicts.append({"model": model, "measured_speedup": speedup, "predicted_speedup": pred, "met": ok})
        print(f"{model}: planner's plan is {speedup:.2f}x faster than the even split measured "
              f"({pred:.2f}x predicted) — target 'planner faster': {'met' if ok else 'NOT met'}")
    atomic_write_json(out.with_suffix(".json"), {"slowdown": SLOWDOWN, "slow_devices": slow, "rows": rows,
                                                 "verdicts": verdicts})
    print(f"wrote {out.with_suffix('.json')}")
    return 0 if all(v["met"] for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
