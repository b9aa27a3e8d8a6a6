"""Simulation against prediction on the example clusters: for the planner's plan and each
baseline, the formulas' iteration time (hetalloc.evaluate.predict) next to the simulated
one with contention and overlap off (must agree within 1 %), with link contention, and
with contention and overlap (the default); differences above 5 % are explained by
switching the effects on one at a time. The instances are the ones
tests/test_sim_agreement.py checks (workflows.examples).

RESULTS.md's run (options: --time-limit S per planner run, default 5; --out DIR):

    python benchmarks/sim_agreement.py

Prints a table and writes OUT/sim_agreement.json (OUT: --out, default benchmarks/out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hetalloc.fileio import atomic_write_json
from simulator import simulate
from simulator.api import explain_difference
from workflows.examples import INSTANCES, chained, example_plans

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time-limit", type=float, default=5.0, help="planner time limit per instance (s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR",
                    help="output directory (default benchmarks/out)")
    args = ap.parse_args()
    rows = []
    t = Table(title="iteration time, s: formulas vs simulation (reference: no contention, no overlap)")
    for c, just in (("instance", "left"), ("plan", "left"), ("predicted s", "right"), ("reference", "right"),
                    ("+contention", "right"), ("+overlap", "right"), ("sim vs pred", "right")):
        t.add_column(c, justify=just)
    for name, model, batch in INSTANCES:
        cl, cg, plans = example_plans(name, model, batch, args.time_limit)
        for label, plan in plans.items():
            full = simulate(plan, cl, cg)
            pred = full.predicted["iteration_time_s"]
            ref = simulate(plan, cl, cg, contention=False, overlap=False, compare=False).iteration_time_s
            cont = simulate(plan, cl, cg, overlap=False, compare=False).iteration_time_s
            diff = full.predicted["difference"]
            why = explain_difference(plan, cl, cg, full, {}) if abs(diff) > 0.05 else []
            inst = f"{name} {model} B={batch}"
            rows.append({"instance": inst, "plan": label, "planner": plan.planner, "grad_sync": plan.grad_sync,
                         "predicted_s": pred, "reference_s": ref, "reference_error": (ref - pred) / pred,
                         "contention_s": cont, "full_s": full.iteration_time_s, "difference": diff,
                         "chained_groups": chained(plan, cl, cg), "bound_by": full.critical_path["bound_by"],
                         "explanation": why})
            print(f"{inst} {label}: {100 * diff:+.1f}%", file=sys.stderr, flush=True)
            t.add_row(inst, label, f"{pred:.4g}", f"{ref:.4g}", f"{cont:.4g}", f"{full.iteration_time_s:.4g}",
                      f"{100 * diff:+.1f}%")
    Console(width=160).print(t)
    for r in rows:
        if r["explanation"]:
            print(f"{r['instance']}, {r['plan']}:")
            for line in r["explanation"][1:]:
                print(f"  {line.strip()}")
    plain = [r for r in rows if not r["chained_groups"]]
    worst = max(plain, key=lambda r: abs(r["reference_error"]))
    print(f"largest reference-mode error: {100 * worst['reference_error']:+.2e}% ({worst['instance']}, "
          f"{worst['plan']}) over {len(plain)} plans without chained gradient groups")
    for r in rows:
        if r["chained_groups"]:
            print(f"chained gradient groups (collectives wait for each other): {r['instance']}, {r['plan']}: "
                  f"reference {100 * r['reference_error']:+.2f}% vs formulas")
    out = Path(args.out) / "sim_agreement.json"
    atomic_write_json(out, {"benchmark": "sim_agreement", "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
