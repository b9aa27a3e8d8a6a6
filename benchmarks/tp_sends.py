"""Pipeline sends between tensor-parallel groups on gloo: which way of moving a stage's
activations from a group of t_s ranks to a group of t_r ranks is faster (CPU ranks on
127.0.0.1, as the runtime runs them here). Every rank of a group holds the whole piece
and every rank of the receiving group needs the whole piece. Ways measured:

- ``one``: receiving rank k gets the whole piece from sending rank k mod t_s
  (``hetalloc.evaluate.rank_pairs``: what the prediction times and the runtime does);
- ``parts``: every sending rank sends its 1/t_s of the piece to every receiving rank;
- ``scatter_gather`` (Megatron-LM's): receiving rank k gets its 1/t_r of the piece from
  sending rank k mod t_s, then the receiving group all-gathers the parts.

One torchrun launch of 4 ranks (2 + 1, 1 + 2 and 2 + 2 ranks for the three pairs of
group sizes); per (pair, size, way) the median over --repeats transfers of the time from
a common start until the last receiving rank has the whole piece.

    python benchmarks/tp_sends.py --repeats 40

Prints a table and writes OUT/tp_sends.json (OUT: --out, default benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"2->1": ((0, 1), (2,)), "1->2": ((0,), (1, 2)), "2->2": ((0, 1), (2, 3))}
SIZES_KIB = (96, 384, 3072)
"""Pieces of gpt2-small activations in fp32: seq 32 x 1 sample, seq 128 x 1, seq 1024 x 1."""
WAYS = ("one", "parts", "scatter_gather")


def _transfer(way: str, senders: tuple[int, ...], receivers: tuple[int, ...], x, group) -> None:
    import torch
    import torch.distributed as dist
    rank = dist.get_rank()
    ts, tr = len(senders), len(receivers)
    works = []
    if rank in senders:
        j = senders.index(rank)
        for k, r in enumerate(receivers):
            if way == "one" and k % ts == j:
                works.append(dist.isend(x, r))
            elif way == "parts":
                works.append(dist.isend(x.chunk(ts)[j], r))
            elif way == "scatter_gather" and k % ts == j:
                works.append(dist.isend(x.chunk(tr)[k], r))
    elif rank in receivers:
        k = receivers.index(rank)
        if way == "one":
            works.append(dist.irecv(x, senders[k % ts]))
        elif way == "parts":
            works += [dist.irecv(b, s) for b, s in zip(x.chunk(ts), senders)]
        else:
            own = torch.empty_like(x.chunk(tr)[k])
            dist.irecv(own, senders[k % ts]).wait()
            dist.all_gather_into_tensor(x, own, group=group)
    for w in works:
        w.wait()


def worker(repeats: int, out: Path) -> None:
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    groups = {name: dist.new_group(list(recv)) for name, (_, recv) in PAIRS.items()}
    rows = []
    for name, (senders, receivers) in PAIRS.items():
        for kib in SIZES_KIB:
            for way in WAYS:
                if (way == "scatter_gather" and len(receivers) == 1) or (way == "parts" and len(senders) == 1):
                    continue  # the same transfers as 'one'
                x = torch.ones(kib * 256, dtype=torch.float32)  # kib KiB
                times = []
                for i in range(repeats + 2):
                    dist.barrier()
                    t0 = time.perf_counter()
                    _transfer(way, senders, receivers, x, groups[name] if rank in receivers else None)
                    dt = torch.tensor([time.perf_counter() - t0 if rank in receivers else 0.0], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                    if i >= 2:  # first transfers set up the connections
                        times.append(float(dt))
                rows.append({"pair": name, "kib": kib, "way": way, "median_ms": 1e3 * statistics.median(times),
                             "p25_ms": 1e3 * statistics.quantiles(times, n=4)[0],
                             "p75_ms": 1e3 * statistics.quantiles(times, n=4)[2]})
    if rank == 0:
        out.write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=40, help="timed transfers per case")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), metavar="DIR")
    a = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from hetalloc.fileio import atomic_write_json
    from runtime.launch import local_command, local_env
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "tp_sends.raw.json"
    env = local_env(4)
    env["OMP_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    proc = subprocess.run(local_command(4, ["--worker", str(a.repeats), str(raw)], script=__file__), env=env,
                          text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = json.loads(raw.read_text())
    raw.unlink()
    t = Table(title=f"gloo sends between tensor-parallel groups (median ms over {a.repeats}; load {load:.1f})")
    for c in ("groups", "KiB", *WAYS):
        t.add_column(c, justify="right")
    for name in PAIRS:
        for kib in SIZES_KIB:
            got = {r["way"]: r for r in rows if r["pair"] == name and r["kib"] == kib}
            t.add_row(name, str(kib), *(f"{got[w]['median_ms']:.3f}" if w in got else "-" for w in WAYS))
    Console(width=120).print(t)
    atomic_write_json(out / "tp_sends.json", {"load_1min_before": load, "repeats": a.repeats, "rows": rows})
    print(f"wrote {out / 'tp_sends.json'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
