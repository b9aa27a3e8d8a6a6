"""Collectives and interference between profiling ranks, measured with the calls the
runtime makes. Imports torch (ranks only).

- **collectives** (``measure_collectives``): every operation of
  ``hetalloc.costs.COLLECTIVE_OPS`` at every size of ``COLLECTIVE_BYTES``, among the
  first 2, 3, ... ranks of each host (scope ``intra``) and among one rank per host
  (scope ``inter``, when there are several hosts). A repeat is a barrier, a short
  burst of compute on every member, then one call, as the runtime calls its collectives
  (after compute: with its threads asleep and caches cold; RESULTS.md had a run's
  gradient all-reduce of 0.95 MB at 2.6 ms against ~0.5 ms timed back to back); the repeat's
  time is its last-arriving member's (the least: the others also waited for it), a
  table's the median over repeats. The bytes are the whole buffer (all-gather: the
  gathered output; the others: what each member passes).
- **interference** (``measure_interference``): per rank, a square matmul in the training
  dtype (stretched by the rank's emulated slowdown, as the runtime stretches its ops)
  timed alone, while a stream of all-reduces of its group runs beside it, and while a
  stream of sends and receives with a peer does; the interference is the slowdown of
  the matmul's median, and the streams' own slowdown is recorded too. The streams carry
  messages of the sizes the model sends (its median activation slice, its gradients up
  to a 25 MiB bucket). Ranks measure in
  ``turns`` (groups that fit their hosts' compute slots), so that the figure is the
  communication's effect and not the cores' sharing.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from hetalloc.costs import COLLECTIVE_OPS

from ..config import stretch
from .device import cpu_clock, sync

COLLECTIVE_BYTES = (8, 1024, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20)
STREAM_BYTES = 1 << 20
"""Message size of the interference benchmark's streams when the model gives none."""


def _buffers(op: str, nbytes: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    numel = max(n, nbytes // 4)
    numel -= numel % n  # all-gather and reduce-scatter split the buffer evenly
    if op == "all_gather":
        return torch.zeros(numel // n, device=device), torch.zeros(numel, device=device)
    if op == "reduce_scatter":
        return torch.zeros(numel, device=device), torch.zeros(numel // n, device=device)
    return torch.zeros(numel, device=device), None


def call(op: str, buf: torch.Tensor, out: torch.Tensor | None, group, root: int, async_op: bool = False):
    """One collective as the runtime calls it (root: a global rank, for reduce and broadcast)."""
    if op == "allreduce":
        return dist.all_reduce(buf, group=group, async_op=async_op)
    if op == "reduce":
        return dist.reduce(buf, dst=root, group=group, async_op=async_op)
    if op == "broadcast":
        return dist.broadcast(buf, src=root, group=group, async_op=async_op)
    if op == "all_gather":
        return dist.all_gather_into_tensor(out, buf, group=group, async_op=async_op)
    if op == "reduce_scatter":
        return dist.reduce_scatter_tensor(out, buf, group=group, async_op=async_op)
    raise ValueError(f"unknown collective '{op}'")


def time_collective(op: str, nbytes: int, ranks: list[int], group, device: torch.device,
                    busy: Callable[[], None]) -> list[float]:
    """A member's seconds of one call of `op` over `group` in each repeat (module doc):
    a barrier, the same burst of compute on every member (the runtime issues its
    collectives after compute, with its threads asleep and its caches cold), then one
    call."""
    buf, out = _buffers(op, nbytes, len(ranks), device)
    repeats = 15 if nbytes <= (1 << 20) else 6
    ts = []
    for k in range(2 + repeats):
        dist.barrier(group=group)
        busy()
        sync(device)
        t0 = time.perf_counter()
        call(op, buf, out, group, ranks[0])
        sync(device)
        if k >= 2:
            ts.append(time.perf_counter() - t0)
    return ts


def collective_groups(hosts: list[str]) -> list[tuple[str, list[int]]]:
    """(scope, ranks) of every group measured: the first 2, 3, ... ranks of each host,
    then one rank per host for 2, 3, ... hosts."""
    by_host: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    out = [("intra", ranks[:n]) for ranks in by_host.values() for n in range(2, len(ranks) + 1)]
    leaders = [ranks[0] for ranks in by_host.values()]
    out += [("inter", leaders[:n]) for n in range(2, len(leaders) + 1)]
    return out


def measure_collectives(rank: int, hosts: list[str], device: torch.device) -> list[dict[str, Any]]:
    """Every collective at every size in every group (module doc); every rank calls this,
    every rank gets the tables. A repeat's time is its last member's (the members that
    came earlier also waited for it): the least over the members; a table keeps the
    median over repeats."""
    busy = _busy(device)
    tables = []
    for scope, ranks in collective_groups(hosts):
        group = dist.new_group(ranks)  # collective: every rank creates every group
        mine = {}
        if rank in ranks:
            for op in COLLECTIVE_OPS:
                mine[op] = [time_collective(op, nbytes, ranks, group, device, busy) for nbytes in COLLECTIVE_BYTES]
        got: list[Any] = [None] * len(hosts)
        dist.all_gather_object(got, mine)
        for op in COLLECTIVE_OPS:
            seconds = [statistics.median(min(xs) for xs in zip(*(got[r][op][k] for r in ranks)))
                       for k in range(len(COLLECTIVE_BYTES))]
            tables.append({"op": op, "scope": scope, "ranks": ranks, "hosts": sorted({hosts[r] for r in ranks}),
                           "bytes": list(COLLECTIVE_BYTES), "seconds": seconds})
    return tables


BUSY_S = 0.002
"""Compute before each timed collective (module doc)."""


def _busy(device: torch.device) -> Callable[[], None]:
    a = torch.randn(128, 128, device=device)

    def busy() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < BUSY_S:
            a @ a
    return busy


def compute_turns(hosts: list[str], slots: list[int]) -> list[list[int]]:
    """Groups of ranks that run at once without sharing compute: each host's ranks cut
    into runs of its compute slots (turn k holds the k-th run of every host)."""
    by_host: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    chunks = []
    for h, ranks in by_host.items():
        width = max(1, slots[ranks[0]]) if slots[ranks[0]] > 0 else len(ranks)
        chunks.append([ranks[i:i + width] for i in range(0, len(ranks), width)])
    return [sorted(r for c in chunks if k < len(c) for r in c[k]) for k in range(max(len(c) for c in chunks))]


def _matmul_timer(device: torch.device, slowdown: float):
    n = 4096 if device.type == "cuda" else 384
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def once() -> float:
        sync(device)
        t0 = time.perf_counter()
        cpu0 = cpu_clock(device)
        a @ b
        sync(device)
        return stretch(t0, slowdown, cpu0)
    return once


POOL = 16
"""Buffers a stream cycles through (what they hold does not matter, only their sizes)."""


def _stream(kind: str, rank: int, peer: int, group, ranks: list[int], count: int, device: torch.device,
            nbytes: int) -> list:
    out = [torch.zeros(max(1, nbytes // 4), device=device) for _ in range(min(count, POOL))]
    if kind == "collective":
        return [dist.all_reduce(out[k % POOL], group=group, async_op=True) for k in range(count)]
    inp = [torch.empty_like(x) for x in out]
    works = []
    for k in range(count):  # both directions at once, as a pipeline stage sends and receives
        works.append(dist.isend(out[k % POOL], peer))
        works.append(dist.irecv(inp[k % POOL], peer))
    return works


def measure_interference(rank: int, hosts: list[str], slots: list[int], slowdown: float, device: torch.device,
                         sizes: dict[str, int] | None = None) -> dict[str, Any] | None:
    """This rank's matmul alone and beside a communication stream (module doc); None for
    a rank that has no partner in its turn. sizes: message bytes of each stream
    ('collective', 'p2p': what the model's gradient buckets and activations are; default
    STREAM_BYTES). Every rank calls this."""
    sizes = {"collective": STREAM_BYTES, "p2p": STREAM_BYTES, **(sizes or {})}
    once = _matmul_timer(device, slowdown)
    for _ in range(5):
        once()
    result = None
    for turn in compute_turns(hosts, slots):
        if len(turn) == 1:  # a lone rank borrows a partner to communicate with (its figure is not kept)
            turn = sorted([turn[0], next(r for r in range(len(hosts)) if r != turn[0])])
        group = dist.new_group(turn)  # collective: every rank creates every group
        dist.barrier()
        if rank not in turn:
            continue
        i = turn.index(rank)
        peers = {"collective": rank, "p2p": turn[i ^ 1] if (i ^ 1) < len(turn) else -1}
        dist.barrier(group=group)
        alone = [once() for _ in range(30)]
        out: dict[str, Any] = {"matmul_alone_s": statistics.median(alone),
                               "matmul_alone_iqr_rel": _iqr_rel(alone)}
        for kind in ("collective", "p2p"):
            streams = peers[kind] >= 0  # a rank left without a p2p partner only keeps time
            count, enough = 16, False
            for _ in range(6):
                dist.barrier(group=group)
                t0 = time.perf_counter()
                works = _stream(kind, rank, peers[kind], group, turn, count, device, sizes[kind]) if streams else []
                for w in works:
                    w.wait()
                stream_alone = time.perf_counter() - t0
                dist.barrier(group=group)
                t0 = time.perf_counter()
                works = _stream(kind, rank, peers[kind], group, turn, count, device, sizes[kind]) if streams else []
                done = threading.Event()
                ended = [t0]
                # gloo's send and receive works report completion only to wait(): a thread waits
                waiter = threading.Thread(target=_wait_all, args=(works, done, ended), daemon=True)
                waiter.start()
                beside = []
                while works and not done.is_set():
                    beside.append(once())
                waiter.join()
                stream_busy = ended[0] - t0
                # if too short: longer, by the stream's own pace alone at least 40 matmuls' worth
                per_message = max(stream_alone, 1e-9) / count
                longer = min(1 << 16, max(count * 4, math.ceil(40 * out["matmul_alone_s"] / per_message)))
                got: list[Any] = [None] * len(turn)
                dist.all_gather_object(got, (len(beside) if streams else None, longer), group=group)
                if min(g[0] for g in got if g[0] is not None) >= 10:  # enough matmuls inside every stream
                    enough = True
                    break
                count = max(g[1] for g in got)  # every member streams as many messages
            if not (enough and streams):
                continue
            med = statistics.median(beside[:-1])  # the last one may have outlived the stream
            out[kind] = {"matmul_s": med, "slowdown": max(0.0, med / out["matmul_alone_s"] - 1.0),
                         "matmuls": len(beside), "stream_alone_s": stream_alone, "stream_busy_s": stream_busy,
                         "stream_slowdown": max(0.0, stream_busy / stream_alone - 1.0), "messages": count,
                         "message_bytes": sizes[kind],
                         "peer": peers[kind] if kind == "p2p" else None}
        if result is None:
            result = out
    dist.barrier()
    return result


def _wait_all(works: list, done: threading.Event, ended: list[float]) -> None:
    for w in works:
        w.wait()
    ended[0] = time.perf_counter()
    done.set()


def _iqr_rel(xs: list[float]) -> float:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    med = statistics.median(xs)
    return (q[2] - q[0]) / med if med > 0 else 0.0
