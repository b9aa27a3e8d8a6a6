"""Chrome-trace JSON of a simulated run (opens in ui.perfetto.dev and chrome://tracing).

One process per simulated group (a device, or a tensor-parallel group of t) with threads
``compute``, ``tp`` (its tensor-parallel all-reduces), ``p2p`` and ``collective``
(collective steps nest inside their all-reduce; with zero1 reduce-scatter and
all-gather), one more ``p2p`` / ``collective`` thread per further rank of a group, a
memory counter per group, and one
process per link that carried traffic, with one thread per concurrent load on it.
Times are microseconds. Every event carries ph/ts/dur/pid/tid (metadata and counters
with dur 0) so that simple validators accept it.

Never: compute figures here; this only lays out what the simulation recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hetalloc.fileio import atomic_write_text

if TYPE_CHECKING:
    from .report import SimReport

LANES = {"compute": 0, "p2p": 1, "collective": 2, "tp": 3}
RANK_TID = 10
"""Threads of rank k > 0 of a tensor-parallel group: RANK_TID * k + the lane's number."""


def _tid(lane: str, rank: int) -> int:
    return LANES[lane] + RANK_TID * rank
LINK_PID_BASE = 100_000
MAX_LINK_EVENTS = 200_000
"""Link tracks are left out beyond this many events (the device tracks always stay)."""


def _us(t: float) -> float:
    return round(t * 1e6, 3)


def _meta(name: str, pid: int, tid: int, value: Any) -> dict[str, Any]:
    return {"name": name, "ph": "M", "ts": 0, "dur": 0, "pid": pid, "tid": tid, "args": {"name": value}}


def trace_events(report: "SimReport") -> list[dict[str, Any]]:
    res = report.result
    pid_of = {d: i for i, d in enumerate(res.work)}
    ev: list[dict[str, Any]] = []
    for d, w in res.work.items():
        pid = pid_of[d]
        t = len(w.ranks)
        extra = f" (+{len(w.mates) // t - 1} identical)" if len(w.mates) > t else ""
        who = d if t == 1 else f"{'+'.join(w.ranks)} (TP {t})"
        ev.append(_meta("process_name", pid, 0, f"{who} {w.dtype.name} r{w.replica} s{w.stage}{extra}"))
        ev.append({"name": "process_sort_index", "ph": "M", "ts": 0, "dur": 0, "pid": pid, "tid": 0,
                   "args": {"sort_index": pid}})
        for lane, tid in LANES.items():
            if lane != "tp" or t > 1:
                ev.append(_meta("thread_name", pid, tid, lane))
        for k, r in enumerate(w.ranks[1:], 1):
            for lane in ("p2p", "collective"):
                ev.append(_meta("thread_name", pid, _tid(lane, k), f"{lane} rank {k} ({r})"))
    for a in res.activities:
        ev.append({"name": a.name, "cat": a.kind, "ph": "X", "ts": _us(a.t0), "dur": _us(a.t1 - a.t0),
                   "pid": pid_of[a.device], "tid": _tid(a.lane, a.rank), "args": {"iteration": a.iteration}})
    for c in res.collectives:
        for phase, t0, t1 in c.steps:
            for d in c.members:
                w = res.work[res.rep_of[d]]
                ev.append({"name": phase, "cat": "step", "ph": "X", "ts": _us(t0), "dur": _us(t1 - t0),
                           "pid": pid_of[w.id], "tid": _tid("collective", w.ranks.index(d)), "args": {}})
    for d, points in res.memory_events.items():
        w, cur = res.work[d], 0.0
        for t, delta in points:
            cur += delta
            ev.append({"name": "memory GiB", "ph": "C", "ts": _us(t), "dur": 0, "pid": pid_of[d], "tid": 0,
                       "args": {"static": w.static_bytes / 2**30, "activations": cur / 2**30}})
    ev.extend(_link_events(report))
    return ev


def _link_events(report: "SimReport") -> list[dict[str, Any]]:
    res = report.result
    if sum(len(res.log.intervals.get(u.key, [])) * len(u.footprint) for u in res.table.all) > MAX_LINK_EVENTS:
        return []
    by_link: dict[int, list[tuple[float, float, str]]] = {}
    for u in res.table.all:
        for t0, t1 in res.log.intervals.get(u.key, []):
            for l in u.footprint:
                by_link.setdefault(l, []).append((t0, t1, u.label))
    out: list[dict[str, Any]] = []
    for l, items in sorted(by_link.items()):
        pid = LINK_PID_BASE + l
        out.append(_meta("process_name", pid, 0, f"link {res.topo.links[l].name}"))
        lanes: list[float] = []  # end time of the last slice on each thread
        for t0, t1, label in sorted(items):
            tid = next((k for k, end in enumerate(lanes) if end <= t0), len(lanes))
            if tid == len(lanes):
                lanes.append(t1)
                out.append(_meta("thread_name", pid, tid, f"load {tid + 1}"))
            lanes[tid] = t1
            out.append({"name": label, "cat": "link", "ph": "X", "ts": _us(t0), "dur": _us(t1 - t0),
                        "pid": pid, "tid": tid, "args": {}})
    return out


def write_trace(report: "SimReport", path) -> None:
    import json
    doc = {"traceEvents": trace_events(report), "displayTimeUnit": "ms",
           "otherData": {"iteration_time_s": report.iteration_time_s, "plan_model": report.result.plan.model}}
    atomic_write_text(path, json.dumps(doc, separators=(",", ":")))
