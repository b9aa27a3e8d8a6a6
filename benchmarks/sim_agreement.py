"""Simulation against prediction on the example clusters: for the planner's plan and each
baseline, the formulas' iteration time (hetalloc.evaluate.predict) next to the simulated
one with contention and overlap off (must agree within 1 %), with link contention, and
with contention and overlap (the default); differences above 5 % are explained by
switching the effects on one at a time.

Run:  python benchmarks/sim_agreement.py [--time-limit 5]
Prints a table; writes benchmarks/out/sim_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from simulator import simulate  # noqa: E402
from simulator.api import explain_difference  # noqa: E402
from test_sim_agreement import INSTANCES, chained, example_plans  # noqa: E402  (the instances the tests check)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time-limit", type=float, default=5.0, help="planner time limit per instance (s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "sim_agreement.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'instance':<28} {'plan':<18} {'predicted s':>11} {'reference':>10} {'+contention':>12} "
          f"{'+overlap':>10} {'sim vs pred':>11}")
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
            print(f"{inst:<28} {label:<18} {pred:>11.4g} {ref:>10.4g} {cont:>12.4g} {full.iteration_time_s:>10.4g} "
                  f"{100 * diff:>+10.1f}%", flush=True)
            for line in why[1:]:
                print(f"{'':<30}{line.strip()}")
    plain = [r for r in rows if not r["chained_groups"]]
    worst = max(plain, key=lambda r: abs(r["reference_error"]))
    print(f"largest reference-mode error: {100 * worst['reference_error']:+.2e}% ({worst['instance']}, "
          f"{worst['plan']}) over {len(plain)} plans without chained gradient groups")
    for r in rows:
        if r["chained_groups"]:
            print(f"chained gradient groups (collectives wait for each other): {r['instance']}, {r['plan']}: "
                  f"reference {100 * r['reference_error']:+.2f}% vs formulas")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "sim_agreement", "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
