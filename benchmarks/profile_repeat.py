"""Is profiling repeatable? Profile this machine twice in a row (same request) and compare
the two measured cost graphs: per (device type, layer, micro-batch size, pass) the
relative difference |a - b| / mean(a, b) of the median times.

RESULTS.md's run (options: --model gpt2-tiny, --seq 64, --nproc 2, --slowdown 1=2, --out DIR):

    python benchmarks/profile_repeat.py

Target (issue 5): per-layer times within 10 % (median over all entries). Prints the
distribution (median, 90th percentile, worst) per device type and for whole passes as a
table, and writes OUT/profile_repeat.json and the two profiles under OUT/profile_repeat/
(OUT: --out, default benchmarks/out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hetalloc.costgraph import load_cost_graph
from hetalloc.fileio import atomic_write_json
from runtime.profile.command import run_profile

ROOT = Path(__file__).resolve().parents[1]


def rel(a: float, b: float) -> float:
    return abs(a - b) / ((a + b) / 2) if a + b > 0 else 0.0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-tiny")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--slowdown", action="append", default=None, help="RANK=FACTOR (default 1=2 with 2 ranks)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR",
                    help="output directory (default benchmarks/out)")
    a = ap.parse_args(argv)
    profiles = Path(a.out) / "profile_repeat"
    slowdown = a.slowdown if a.slowdown is not None else (["1=2"] if a.nproc >= 2 else [])
    t0 = time.perf_counter()
    cgs = []
    for k in (1, 2):
        print(f"profile {k} ({a.model}, seq {a.seq}, {a.nproc} ranks, slowdown {slowdown or 'none'}) ...", flush=True)
        run_profile(profiles / f"run{k}", nproc=a.nproc, model=a.model, seq=a.seq, slowdown=slowdown)
        cgs.append(load_cost_graph(profiles / f"run{k}" / "cost_graph.json"))
    one, two = cgs
    rows, allrel = [], []
    for name in sorted(one.tables):
        t1, t2 = one.tables[name], two.tables[name]
        layer = [rel(x, y) for pass_ in ("fwd_s", "bwd_s") for r1, r2 in zip(getattr(t1, pass_), getattr(t2, pass_))
                 for x, y in zip(r1, r2)]
        whole = [rel(sum(r[k] for r in getattr(t1, p)), sum(r[k] for r in getattr(t2, p)))
                 for p in ("fwd_s", "bwd_s") for k in range(len(t1.batch_sizes))]
        allrel += layer
        rows.append({"device_type": name, "entries": len(layer), "layer_median": statistics.median(layer),
                     "layer_p90": pct(layer, 0.9), "layer_max": max(layer), "pass_median": statistics.median(whole),
                     "pass_max": max(whole)})
    t = Table(title="two profiles in a row: relative difference of the median times")
    for c in ("device type", "entries", "layer median", "layer p90", "layer worst", "pass median", "pass worst"):
        t.add_column(c, justify="left" if c == "device type" else "right")
    for r in rows:
        t.add_row(r["device_type"], str(r["entries"]), *(f"{100 * r[k]:.1f}%" for k in
                                                         ("layer_median", "layer_p90", "layer_max", "pass_median",
                                                          "pass_max")))
    Console(width=120).print(t)
    med = statistics.median(allrel)
    print(f"\nall per-layer entries: median difference {100 * med:.1f}% (target <= 10%: "
          f"{'met' if med <= 0.10 else 'NOT met'}), 90th percentile {100 * pct(allrel, 0.9):.1f}%, "
          f"worst {100 * max(allrel):.1f}%")
    out = profiles.with_suffix(".json")
    atomic_write_json(out, {"model": a.model, "seq_len": a.seq, "nproc": a.nproc, "slowdown": slowdown,
                            "rows": rows, "median": med, "p90": pct(allrel, 0.9), "max": max(allrel),
                            "met": med <= 0.10, "seconds": time.perf_counter() - t0})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
