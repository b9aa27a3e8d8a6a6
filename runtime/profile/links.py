"""Links between profiling ranks: one-way p2p time between pairs of ranks and all-reduce
time within and across nodes, measured with the calls the runtime makes. Imports torch
(ranks only).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from .device import sync

GENERIC_P2P_BYTES = (4, 4096, 65536, 262144, 1 << 20, 4 << 20)
ALLREDUCE_BYTES = (4096, 65536, 1 << 20, 4 << 20, 16 << 20)
MAX_ALL_PAIRS = 8
"""Up to this many ranks every pair is measured; above it, one pair per node pair."""


def pairs_to_measure(hosts: list[str]) -> list[tuple[int, int]]:
    """Every pair of ranks on small jobs; else one pair per node pair (and one per node)."""
    n = len(hosts)
    if n <= MAX_ALL_PAIRS:
        return [(a, b) for a in range(n) for b in range(a + 1, n)]
    first: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        first.setdefault(h, []).append(r)
    nodes = list(first)
    out = [(first[h][0], first[h][1]) for h in nodes if len(first[h]) > 1]
    out += [(first[a][0], first[b][0]) for i, a in enumerate(nodes) for b in nodes[i + 1:]]
    return out


def p2p_one_way(rank: int, a: int, b: int, nbytes: int, warmup: int, repeats: int, device: torch.device) -> float:
    """Median one-way seconds between ranks a and b (half a ping-pong); 0 on other ranks."""
    if rank not in (a, b):
        return 0.0
    buf = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    peer = b if rank == a else a
    ts = []
    for k in range(warmup + repeats):
        t0 = time.perf_counter()
        if rank == a:
            dist.isend(buf, peer).wait()
            dist.irecv(buf, peer).wait()
        else:
            dist.irecv(buf, peer).wait()
            dist.isend(buf, peer).wait()
        sync(device)
        if k >= warmup:
            ts.append((time.perf_counter() - t0) / 2)
    return statistics.median(ts)


def time_allreduce(nbytes: int, group, warmup: int, repeats: int, device: torch.device) -> float:
    """Median measured seconds of an all-reduce of `nbytes` over `group` (a member's view)."""
    buf = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    ts = []
    for k in range(warmup + repeats):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=group)
        sync(device)
        if k >= warmup:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_links(rank: int, hosts: list[str], p2p_bytes: list[int], repeats: int,
                  device: torch.device) -> dict[str, Any]:
    """p2p per measured pair and all-reduce per node and across nodes (module doc).
    Every rank calls this; rank 0's return value holds the results."""
    p2p = []
    for a, b in pairs_to_measure(hosts):
        row = []
        for n in p2p_bytes:
            dist.barrier()
            row.append(p2p_one_way(rank, a, b, n, 5, repeats, device))
        got: list[Any] = [None] * len(hosts)
        dist.all_gather_object(got, row)
        p2p.append({"ranks": [a, b], "hosts": [hosts[a], hosts[b]], "bytes": list(p2p_bytes), "seconds": got[a]})
    by_host: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    sets = [("intra", h, ranks) for h, ranks in by_host.items()]
    if len(by_host) > 1:
        sets.append(("inter", "*", [ranks[0] for ranks in by_host.values()]))
    allreduce = []
    for scope, host, ranks in sets:
        group = dist.new_group(ranks)  # collective: every rank creates every group
        if len(ranks) < 2:
            continue
        row = [time_allreduce(n, group, 3, max(5, repeats // 2), device) if rank in ranks else 0.0
               for n in ALLREDUCE_BYTES]
        got = [None] * len(hosts)
        dist.all_gather_object(got, row)
        per_size = [max(got[r][k] for r in ranks) for k in range(len(ALLREDUCE_BYTES))]
        allreduce.append({"scope": scope, "host": host, "ranks": ranks, "bytes": list(ALLREDUCE_BYTES),
                          "seconds": per_size})
    return {"p2p": p2p, "allreduce": allreduce}
