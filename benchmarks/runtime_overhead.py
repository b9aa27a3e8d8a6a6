"""Runtime overhead on a 2-stage GPT-2-small pipeline (CPU, gloo):
- time not spent in compute or communication (runtime.metrics ``other_s``: Python
  bookkeeping, data, slicing) as a fraction of the step time — target <= 5 %;
- step time against torch.distributed.pipelining driven by hand on the same stages,
  data, loss and optimizer (runtime/pipelining_ref.py) — target within 10 %.

Two layouts of the same cut: one device per stage (2 ranks), and tensor-parallel groups
of 2 (4 ranks; DTensor ColwiseParallel / RowwiseParallel on the blocks, vocabulary-parallel
embedding and head, both engines sharding with runtime.tensor_parallel). Both stages get
a group of 2 there because torch.distributed.pipelining expresses tensor parallelism as
a (pipeline x tensor) mesh, one pipeline per tensor-parallel rank: a stage of 2 next to
a stage of 1 has no such mesh. 4 ranks share 2 cores here: the comparison, not the
speed, is the point.

RESULTS.md's run (options: --seq, --layouts, --out DIR):

    python benchmarks/runtime_overhead.py --steps 12 --repeats 2

Both engines run in the same torchrun launch, stepping in turn on copies of the same
stages (runtime/pipelining_ref.py), so they see the same machine load; one launch per
schedule (GPipe, 1F1B) and repeat. Step times are medians over the steps after the
first (warm-up). Prints a table and writes OUT/runtime_overhead.json, the plans and runs
under OUT/runtime_overhead/ (OUT: --out, default benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hetalloc.cluster import load_cluster
from hetalloc.fileio import atomic_write_json
from runtime.launch import local_command, local_env
from runtime.plans import cpu_cost_graph, describe, hand_plan

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gpt2-small"
# Embedding + 9 blocks | 3 blocks + LM head (the head is ~5.4 blocks of FLOPs at this size).
STAGES = [((0, 10), [("host/0", 1)]), ((10, 14), [("host/1", 1)])]
TP_STAGES = [((0, 10), [(("host/0", "host/1"), 1)]), ((10, 14), [(("host/2", "host/3"), 1)])]
LAYOUTS = {"plain": (STAGES, 2), "tp2": (TP_STAGES, 4)}
"""name -> (stages, ranks)"""
GLOBAL_BATCH_MICROBATCHES = 4


def paired_run(plan_path: Path, steps: int, out: Path, ranks: int) -> tuple[dict, dict]:
    """The runtime and torch.distributed.pipelining stepping in turn in one launch."""
    argv = local_command(ranks, ["--plan", str(plan_path), "--steps", str(steps), "--out", str(out)])
    argv[argv.index("runtime.train")] = "runtime.pipelining_ref"
    env = local_env(ranks)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(argv, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"paired run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text()), json.loads((out / "pipelining_ref.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=9, help="steps per run (the first is warm-up)")
    ap.add_argument("--seq", type=int, default=32, help="sequence length")
    ap.add_argument("--repeats", type=int, default=2, help="paired launches per schedule")
    ap.add_argument("--layouts", default="plain,tp2", help="comma-separated: plain (1 device per stage), "
                    "tp2 (tensor-parallel groups of 2)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR",
                    help="output directory (default benchmarks/out)")
    a = ap.parse_args(argv)
    out = Path(a.out) / "runtime_overhead"
    cluster = load_cluster(ROOT / "examples" / "cpu-4.yaml")
    cg = cpu_cost_graph(MODEL, a.seq)
    rows = []
    for layout, schedule in [(lay, sch) for lay in a.layouts.split(",") for sch in ("gpipe", "1f1b")]:
        stages, nproc = LAYOUTS[layout]
        plan = hand_plan(cluster, cg, [stages], num_microbatches=GLOBAL_BATCH_MICROBATCHES, schedule=schedule,
                         name="overhead")
        path = out / f"plan-{layout}-{schedule}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(path)
        ours, theirs, other, losses_match, loads = [], [], [], True, []
        for k in range(a.repeats):
            loads.append(os.getloadavg()[0])
            s, ref = paired_run(path, a.steps, out / f"{layout}-{schedule}-{k}", nproc)
            ours.append(statistics.median(ref["runtime_step_times_s"][1:]))
            theirs.append(statistics.median(ref["pipelining_step_times_s"][1:]))
            other.append(s["measured"]["overhead_fraction_max"])
            losses_match &= all(abs(x - y) <= 1e-4 * abs(y)
                                for x, y in zip(ref["runtime_losses"], ref["pipelining_losses"]))
            ranks = [{"device": r["device"]} | r["measured"] for r in s["ranks"]]
            print(f"  {layout} {schedule} #{k}: runtime {ours[-1]:.3f} s, pipelining {theirs[-1]:.3f} s, "
                  f"other {100 * other[-1]:.1f} % (load {loads[-1]:.1f})", flush=True)
        rows.append({"layout_name": layout, "schedule": schedule, "layout": describe(plan), "seq_len": a.seq,
                     "ranks": nproc, "load_1min_at_start": loads,
                     "global_batch": plan.global_batch, "runtime_step_s": statistics.median(ours),
                     "pipelining_step_s": statistics.median(theirs),
                     "ratio": statistics.median(ours) / statistics.median(theirs),
                     "other_fraction_max": max(other), "losses_match_reference": losses_match,
                     "runs": {"runtime_s": ours, "pipelining_s": theirs, "other_fraction": other},
                     "last_run_ranks": ranks, "predicted_step_s": plan.predicted["iteration_time_s"]})
    t = Table(title=f"{MODEL}, 2 stages: the runtime vs torch.distributed.pipelining (median step s)")
    for c in ("layout", "schedule", "runtime s", "pipelining s", "ratio", "other (max rank)", "predicted s",
              "losses equal"):
        t.add_column(c, justify="left" if c in ("layout", "schedule") else "right")
    for r in rows:
        t.add_row(r["layout_name"], r["schedule"], f"{r['runtime_step_s']:.3f}", f"{r['pipelining_step_s']:.3f}",
                  f"{r['ratio']:.3f}",
                  f"{100 * r['other_fraction_max']:.2f}%", f"{r['predicted_step_s']:.3f}",
                  str(r["losses_match_reference"]))
    Console(width=120).print(t)
    overhead_ok = all(r["other_fraction_max"] <= 0.05 for r in rows)
    speed_ok = all(r["ratio"] <= 1.10 for r in rows)
    print(f"overhead <= 5 % of step time: {'met' if overhead_ok else 'NOT met'} "
          f"(worst {100 * max(r['other_fraction_max'] for r in rows):.2f} %)")
    print(f"step time within 10 % of torch.distributed.pipelining: {'met' if speed_ok else 'NOT met'} "
          f"(worst ratio {max(r['ratio'] for r in rows):.3f})")
    atomic_write_json(out.with_suffix(".json"), {"model": MODEL, "rows": rows, "overhead_met": overhead_ok,
                                                 "speed_met": speed_ok})
    print(f"wrote {out.with_suffix('.json')}")
    return 0 if overhead_ok and speed_ok else 1


if __name__ == "__main__":
    sys.exit(main())
