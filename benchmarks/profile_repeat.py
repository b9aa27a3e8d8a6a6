"""Is profiling repeatable? Profile this machine twice in a row (same request) and compare
the two measured cost graphs: per (device type, layer, micro-batch size, pass) the
relative difference |a - b| / mean(a, b) of the median times.

    python benchmarks/profile_repeat.py [--model gpt2-tiny] [--seq 64] [--nproc 2] [--slowdown 1=2]

Target (issue 5): per-layer times within 10 % (median over all entries). Prints the
distribution (median, 90th percentile, worst) per device type and for whole passes, and
writes benchmarks/out/profile_repeat.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from hetalloc.costgraph import load_cost_graph  # noqa: E402
from hetalloc.fileio import atomic_write_json  # noqa: E402
from runtime.profile.command import run_profile  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "profile_repeat"


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
    a = ap.parse_args(argv)
    slowdown = a.slowdown if a.slowdown is not None else (["1=2"] if a.nproc >= 2 else [])
    t0 = time.perf_counter()
    cgs = []
    for k in (1, 2):
        print(f"profile {k} ({a.model}, seq {a.seq}, {a.nproc} ranks, slowdown {slowdown or 'none'}) ...", flush=True)
        run_profile(OUT / f"run{k}", nproc=a.nproc, model=a.model, seq=a.seq, slowdown=slowdown)
        cgs.append(load_cost_graph(OUT / f"run{k}" / "cost_graph.json"))
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
    print(f"\n{'device type':<24} {'entries':>7} {'layer median':>12} {'layer p90':>10} {'layer worst':>11} "
          f"{'pass median':>11} {'pass worst':>10}")
    for r in rows:
        print(f"{r['device_type']:<24} {r['entries']:>7} {100 * r['layer_median']:11.1f}% {100 * r['layer_p90']:9.1f}% "
              f"{100 * r['layer_max']:10.1f}% {100 * r['pass_median']:10.1f}% {100 * r['pass_max']:9.1f}%")
    med = statistics.median(allrel)
    print(f"\nall per-layer entries: median difference {100 * med:.1f}% (target <= 10%: "
          f"{'met' if med <= 0.10 else 'NOT met'}), 90th percentile {100 * pct(allrel, 0.9):.1f}%, "
          f"worst {100 * max(allrel):.1f}%")
    out = ROOT / "benchmarks" / "out" / "profile_repeat.json"
    atomic_write_json(out, {"model": a.model, "seq_len": a.seq, "nproc": a.nproc, "slowdown": slowdown,
                            "rows": rows, "median": med, "p90": pct(allrel, 0.9), "max": max(allrel),
                            "met": med <= 0.10, "seconds": time.perf_counter() - t0})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
