"""Nothing hangs: `hetalloc plan` on a 100,000-GPU cluster (12,500 nodes x 8) x GPT-2 XL.

Target (issue 12 item 7): with --time-limit 5 the command answers (a plan, or one line on
stderr with exit 2) within 10 s of wall time, for every case below; the same command gives
the same plan each time (--repeat runs it again and compares the plan files).

Cases: cluster kind (uniform: A100 nodes; mixed: four GPU generations; mixed-expanded: the
mixed cluster written one entry per node) x global batch (512 and 100,000,000). The cluster
files are generated (benchmarks/big_cluster.py) into OUT, not kept in the repository.

    python benchmarks/scale_100k.py --time-limit 5 [--repeat] [--only mixed:512] [--out DIR]

Prints a table and writes OUT/scale_100k.json (OUT: --out, default benchmarks/out). Each
case runs the real CLI in a subprocess, so the figures include start-up and file writing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_cluster import write_cluster  # noqa: E402

from hetalloc.fileio import atomic_write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NODES, GPUS = 12_500, 8
CLUSTERS = {"uniform": ("uniform", False), "mixed": ("mixed", False), "mixed-expanded": ("mixed", True)}
BATCHES = (512, 100_000_000)


def plan_digest(path: Path) -> tuple[str, str] | None:
    """Digests of the plan (everything but the solver's record and the notes) and of its
    notes (a baseline past the last-resort deadline is noted 'not scored': clock-dependent)."""
    if not path.exists():
        return None
    plan = json.loads(path.read_text())
    plan.pop("solver", None)
    notes = plan.pop("notes", [])

    def h(x):
        return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]
    return h(plan), h(notes)


def run_case(cluster_file: Path, batch: int, time_limit: float, out: Path) -> dict:
    plan_file = out / f"plan-{cluster_file.stem}-{batch}.json"
    plan_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "hetalloc.cli", "plan", "--cluster", str(cluster_file), "--model", "gpt2-xl",
           "--global-batch", str(batch), "--time-limit", str(time_limit), "-o", str(plan_file)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    wall = time.perf_counter() - t0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    row = {"wall_s": wall, "exit": proc.returncode, "stderr_lines": len(err), "error": err[-1] if err else "",
           "plan_digest": plan_digest(plan_file)}
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        row["planner"] = plan.get("planner")
        row["iteration_s"] = plan.get("predicted", {}).get("iteration_time_s")
        row["devices_used"] = sum(len(g["devices"]) for r in plan["replicas"] for s in r["stages"]
                                  for g in s.get("groups", []))
        row["not_scored"] = sum("not scored" in n for n in plan.get("notes", []))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=5.0, help="--time-limit given to hetalloc plan, seconds")
    ap.add_argument("--repeat", action="store_true", help="run each case twice and compare the plans")
    ap.add_argument("--only", nargs="*", default=None, metavar="KIND:BATCH", help="e.g. mixed:512")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR",
                    help="output directory (default benchmarks/out)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind, (mix, expanded) in CLUSTERS.items():
        cases = [b for b in BATCHES if args.only is None or f"{kind}:{b}" in args.only]
        if not cases:
            continue
        cfile = write_cluster(out / f"{kind}-{NODES * GPUS}.yaml", NODES, GPUS, mix, expanded=expanded)
        for batch in cases:
            row = {"cluster": kind, "gpus": NODES * GPUS, "global_batch": batch,
                   **run_case(cfile, batch, args.time_limit, out)}
            if args.repeat:
                again = run_case(cfile, batch, args.time_limit, out)
                row["wall_s_repeat"] = again["wall_s"]
                a, b = row["plan_digest"], again["plan_digest"]
                row["same_plan"] = (a is None and b is None and again["error"] == row["error"]) or \
                    (a is not None and b is not None and a[0] == b[0])
                row["same_notes"] = a is not None and b is not None and a[1] == b[1]
            row["within_2x_limit"] = max(row["wall_s"], row.get("wall_s_repeat", 0.0)) <= 2 * args.time_limit
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    t = Table(title=f"hetalloc plan, {NODES:,} nodes x {GPUS} GPUs x GPT-2 XL, --time-limit {args.time_limit:g}")
    for c in ("cluster", "global batch", "wall s", "repeat s", "exit", "result", "same plan", "same notes",
              "<= 2x limit"):
        t.add_column(c)
    for r in rows:
        result = (f"{r['planner']} {r['iteration_s']:.4g} s/it, {r['devices_used']:,} GPUs"
                  + (f", {r['not_scored']} baselines not scored" if r.get("not_scored") else "")
                  if r.get("planner") else r["error"][:70])
        t.add_row(r["cluster"], f"{r['global_batch']:,}", f"{r['wall_s']:.1f}",
                  f"{r['wall_s_repeat']:.1f}" if "wall_s_repeat" in r else "-", str(r["exit"]), result,
                  str(r.get("same_plan", "-")), str(r.get("same_notes", "-")), str(r["within_2x_limit"]))
    Console(width=200).print(t)
    path = out / "scale_100k.json"
    atomic_write_json(path, {"time_limit_s": args.time_limit, "nodes": NODES, "gpus_per_node": GPUS, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
