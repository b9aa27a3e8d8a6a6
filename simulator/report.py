"""Figures of a simulated run: step time, throughput, MFU, busy/idle per stage, bubble,
time and bytes per link, exposed communication, peak memory, the critical path, each
device's step split into the kinds of work the runtime measures (``WORK_KINDS``), and how
the simulation compares with the cost prediction.

Never: re-run or change the simulation here; this only reads a SimResult.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from hetalloc.costs import usable_memory
from hetalloc.evaluate import Prediction
from hetalloc.fileio import atomic_write_json
from hetalloc.plan import device_memory

from .engine import Activity, SimResult

SCHEMA_VERSION = 1
WORK_KINDS = ("compute", "p2p", "allreduce", "optimizer", "loss", "other")
"""A device's step, as runtime.metrics splits a measured one: forward and backward compute
(compute_s), waiting for activations, gradients and its own sends (p2p_wait_s), waiting
for the gradient all-reduce (grad_sync_s), the optimizer step (optimizer_s), the
end-of-step loss all-reduce with its wait for the slowest device (loss_sync_s), and the
runtime's own time (other_s: building its inputs, the measured per-op and per-step
overheads the formulas add to the ops)."""


def work_by_kind(res: SimResult, device: str) -> dict[str, float]:
    """Seconds per iteration of each kind of work (WORK_KINDS) on a simulated device; they
    add up to its iteration (from the end of the previous loss all-reduce to the end of
    its own)."""
    w = res.work[device]
    n_it = len(res.iteration_ends_s)
    out = dict.fromkeys(WORK_KINDS, 0.0)
    ops = {it: 0.0 for it in range(n_it)}
    count = {it: 0 for it in range(n_it)}
    data = {it: 0.0 for it in range(n_it)}
    for a in res.activities:
        if a.device == device and a.kind in ("F", "B"):
            ops[a.iteration] += a.t1 - a.t0
            count[a.iteration] += 1
        elif a.device == device and a.kind == "data":
            data[a.iteration] += a.t1 - a.t0
    op_oh, step_oh = w.dtype.op_runtime_s, w.dtype.step_overhead_s
    for it, m in enumerate(res.marks[device]):
        own = count[it] * op_oh
        out["compute"] += ops[it] - own
        out["other"] += own + step_oh + data[it]
        out["p2p"] += m["pipe_end"] - m["start"] - ops[it] - data[it]
        out["allreduce"] += m["opt_start"] - m["pipe_end"]
        out["optimizer"] += m["opt_end"] - m["opt_start"] - step_oh
        out["loss"] += m["end"] - m["opt_end"]
    return {k: v / n_it for k, v in out.items()}


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def exposed_length(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Time in `comm` intervals not covered by any `compute` interval."""
    comm, compute = merge(comm), merge(compute)
    exposed, k = 0.0, 0
    for a, b in comm:
        covered = 0.0
        while k < len(compute) and compute[k][1] <= a:
            k += 1
        j = k
        while j < len(compute) and compute[j][0] < b:
            covered += min(b, compute[j][1]) - max(a, compute[j][0])
            j += 1
        exposed += (b - a) - covered
    return exposed


@dataclass
class SimReport:
    """What a user wants to know about a simulated plan (see ``to_dict`` for units)."""

    result: SimResult = field(repr=False)
    iteration_time_s: float
    iteration_ends_s: list[float]
    throughput_samples_per_s: float
    tokens_per_s: float
    mfu: float
    bubble_fraction: float
    devices: dict[str, dict[str, Any]]
    stages: list[dict[str, Any]]
    links: list[dict[str, Any]]
    exposed_comm_s: float
    """Largest exposed communication time of a device over the run."""
    critical_path: dict[str, Any]
    predicted: dict[str, Any]
    folding: dict[str, Any]
    performance: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        opts = self.result.options
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "simulation",
            "model": self.result.plan.model,
            "cluster": self.result.cluster.name,
            "options": {"contention": opts.contention, "overlap": opts.overlap, "iterations": opts.iterations,
                        "bucket_bytes": opts.bucket_bytes, "max_collective_steps": opts.max_collective_steps,
                        "fold": opts.fold},
            "iteration_time_s": self.iteration_time_s,
            "iteration_ends_s": self.iteration_ends_s,
            "throughput_samples_per_s": self.throughput_samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "bubble_fraction": self.bubble_fraction,
            "exposed_comm_s": self.exposed_comm_s,
            "critical_path": self.critical_path,
            "predicted": self.predicted,
            "stages": self.stages,
            "devices": self.devices,
            "links": self.links,
            "folding": self.folding,
            "performance": self.performance,
            "notes": self.notes,
        }

    def memory_timeline(self, device: str) -> list[tuple[float, float]]:
        """(time in s, bytes in use) on `device` after each change: weights, gradients,
        optimizer state and buffers throughout, plus the activations in flight."""
        res = self.result
        rep = res.rep_of[device]
        cur = res.work[rep].static_bytes
        out = [(0.0, cur)]
        for t, delta in res.memory_events[rep]:
            cur += delta
            out.append((t, cur))
        return out

    def save(self, path) -> None:
        atomic_write_json(path, self.to_dict())

    def write_trace(self, path) -> None:
        from .trace import write_trace
        write_trace(self, path)

    def write_gantt(self, path, max_devices: int = 48) -> None:
        from .plots import gantt
        gantt(self, path, max_devices=max_devices)

    def write_utilisation(self, path, max_devices: int = 64) -> None:
        from .plots import utilisation
        utilisation(self, path, max_devices=max_devices)


def build_report(res: SimResult, prediction: Prediction | None) -> SimReport:
    plan, cluster, cg = res.plan, res.cluster, res.cg
    n_it = len(res.iteration_ends_s)
    total = res.iteration_ends_s[-1]
    it_s = total / n_it
    if res.noisy:  # the median iteration, as runs are judged by their median step
        ends = [0.0, *res.iteration_ends_s]
        it_s = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    by_dev: dict[str, list[Activity]] = {d: [] for d in res.work}
    for a in res.activities:
        by_dev[a.device].append(a)

    formula_mem = device_memory(plan, cluster, cg)
    devices: dict[str, dict[str, Any]] = {}
    pipe_end0 = 0.0
    busy_fb0 = 0.0
    n_pipe = 0
    for d, w in res.work.items():
        acts = by_dev[d]
        fb = [a for a in acts if a.kind in ("F", "B")]
        tp = [a for a in acts if a.kind == "tp"]
        compute = [(a.t0, a.t1) for a in acts if a.lane == "compute"]
        comm = [(a.t0, a.t1) for a in acts if a.lane != "compute" and a.t1 > a.t0]
        busy = sum(b - a for a, b in compute)
        it0 = [a for a in fb + tp if a.iteration == 0]  # a group is busy in its TP all-reduces too
        pipe_end0 = max(pipe_end0, max((a.t1 for a in it0), default=0.0))
        busy_fb0 += sum(a.t1 - a.t0 for a in it0) * len(w.mates)
        n_pipe += len(w.mates)
        peak_act, cur = 0.0, 0.0
        for _t, delta in res.memory_events[d]:
            cur += delta
            peak_act = max(peak_act, cur)
        peak = w.static_bytes + peak_act
        stats = {
            "replica": w.replica, "stage": w.stage, "type": w.dtype.name, "share": w.share,
            "layers": [w.start, w.stop],
            "busy_s": busy / n_it,
            "idle_s": it_s - busy / n_it,
            "utilisation": busy / total if total > 0 else 0.0,
            "compute_fb_s": sum(a.t1 - a.t0 for a in fb) / n_it,
            "tp_allreduce_s": sum(a.t1 - a.t0 for a in tp) / n_it,
            "tensor_parallel": len(w.ranks),
            "exposed_comm_s": exposed_length(comm, compute) / n_it,
            "peak_memory_bytes": peak,
            "peak_activation_microbatches": round(peak_act / w.act_bytes_per_mb) if w.act_bytes_per_mb else 0,
            "predicted_memory_bytes": formula_mem[d].total,
            "memory_fraction": peak / usable_memory(w.dtype),
            "represents": w.mates,
            "work_s": work_by_kind(res, d),
        }
        for m in w.mates:
            devices[m] = stats if m == d else {**stats, "represented_by": d}
    bubble = max(0.0, 1.0 - busy_fb0 / (n_pipe * pipe_end0)) if pipe_end0 > 0 else 0.0

    stages = []
    for ri, r in enumerate(plan.replicas):
        for si, s in enumerate(r.stages):
            ds = [devices[x] for x in s.device_ids()]
            busy = max(x["busy_s"] for x in ds)
            stages.append({"replica": ri, "stage": si, "layers": [s.start, s.stop], "devices": len(ds),
                           "busy_s": busy, "idle_s": it_s - busy, "busy_fraction": busy / it_s if it_s else 0.0})

    links = link_stats(res, total)
    exposed = max((v["exposed_comm_s"] for v in devices.values()), default=0.0)
    over = [d for d, v in devices.items() if v["memory_fraction"] > 1.0 and "represented_by" not in v]
    notes = []
    if over:
        notes.append(f"{len(over)} device(s) exceed usable memory at their peak (e.g. {over[0]}: "
                     f"{100 * devices[over[0]]['memory_fraction']:.0f}% of usable)")
    pred: dict[str, Any] = {}
    if prediction is not None:
        p = prediction.iteration_time_s
        pred = {"iteration_time_s": p, "difference": (it_s - p) / p if p else 0.0,
                "pipeline_time_s": prediction.pipeline_time_s, "sync_time_s": prediction.sync_time_s,
                "optimizer_time_s": prediction.optimizer_time_s}
    samples = plan.global_batch
    chains = res.chains.replicas
    reps = [{"representative": chains[c.replicas[0]].stages[0].groups[0].lead, "pipelines": len(c.replicas)}
            for c in res.classes]
    return SimReport(
        result=res,
        iteration_time_s=it_s,
        iteration_ends_s=list(res.iteration_ends_s),
        throughput_samples_per_s=samples / it_s,
        tokens_per_s=samples * cg.seq_len / it_s,
        mfu=samples * cg.train_flops_per_sample() / (it_s * cluster.total_peak_flops()),
        bubble_fraction=bubble,
        devices=devices,
        stages=stages,
        links=links,
        exposed_comm_s=exposed,
        critical_path=critical_path(res),
        predicted=pred,
        folding={"simulated_pipelines": len(res.classes), "pipelines": len(chains), "replicas": len(plan.replicas),
                 "classes": reps,
                 "simulated_devices": sum(len(w.ranks) for w in res.work.values()), "simulated_groups": len(res.work),
                 "devices": len(devices), "exact": True},
        performance={"events": res.num_events, "wall_s": res.wall_s,
                     "events_per_s": res.num_events / res.wall_s if res.wall_s > 0 else 0.0,
                     "network_solves": res.network_solves},
        notes=notes,
    )


def link_stats(res: SimResult, total_s: float) -> list[dict[str, Any]]:
    """Bytes and busy time of every link that carried traffic (busiest first)."""
    log, topo = res.log, res.topo
    nbytes: dict[int, float] = {}
    users: dict[int, list[int]] = {}
    for u in res.table.all:
        b = log.bytes_per_flow.get(u.key, 0.0)
        if b <= 0:
            continue
        for l, c in u.footprint.items():
            nbytes[l] = nbytes.get(l, 0.0) + c * b
            users.setdefault(l, []).append(u.key)
    busy_by_users: dict[tuple, float] = {}
    out = []
    for l, b in nbytes.items():
        key = tuple(users[l])
        busy = busy_by_users.get(key)
        if busy is None:
            busy = busy_by_users[key] = union_length([iv for k in key for iv in log.intervals.get(k, [])])
        link = topo.links[l]
        out.append({"link": link.name, "kind": link.kind, "bytes": b, "busy_s": busy,
                    "utilisation": b / (link.capacity_bytes_per_s * total_s) if total_s > 0 else 0.0})
    out.sort(key=lambda x: (-x["utilisation"], x["link"]))
    return out


def _bottlenecks(res: SimResult) -> dict[int, tuple[float, str]]:
    """Usage key -> (seconds held back, name of the link that held it back longest).
    Without contention (or where a load never met another): its slowest link per flow."""
    best: dict[int, tuple[float, int]] = {}
    for (k, l), t in res.log.bottleneck_s.items():
        if l >= 0 and t > best.get(k, (-1.0, -1))[0]:
            best[k] = (t, l)
    out = {k: (t, res.topo.links[l].name) for k, (t, l) in best.items()}
    for u in res.table.all:
        if u.key not in out and u.counts:
            out[u.key] = (0.0, res.topo.links[res.topo.bottleneck(u.counts)].name)
    return out


def _group_link(res: SimResult, group: int, names: dict[int, tuple[float, str]]) -> str:
    cand = [names[u.key] for st in res.collective_steps[group] for u, _ in st.flows if u.key in names]
    return max(cand)[1] if cand else "?"


def critical_path(res: SimResult) -> dict[str, Any]:
    """Walk back from the last activity along the activities that released each other."""
    acts = res.activities
    if not acts:
        return {"bound_by": "nothing", "made_of": "", "segments": [], "by_resource_s": {}, "by_kind_s": {}}
    names = _bottlenecks(res)
    group_links: dict[int, str] = {}
    i = max(range(len(acts)), key=lambda k: (acts[k].t1, -k))
    bound = acts[i].t1
    segs: list[dict[str, Any]] = []
    by_res: dict[str, float] = {}
    by_kind: dict[str, float] = {}
    seen = set()
    while i >= 0 and i not in seen:
        seen.add(i)
        a = acts[i]
        end = min(a.t1, bound)
        start = min(a.t0, end)
        if a.lane == "compute":
            resource = f"device {a.device}"
        elif a.kind == "send":
            resource = f"link {names[a.usage][1] if a.usage in names else '?'}"
        elif a.kind == "loss":
            resource = "loss all-reduce"
        elif a.kind == "tp":
            resource = f"tensor-parallel all-reduce of {a.device} over {names[a.usage][1] if a.usage in names else '?'}"
        else:
            if a.group not in group_links:
                group_links[a.group] = _group_link(res, a.group, names)
            g = res.groups[a.group]
            what = {"reducescatter": "reduce-scatter", "allgather": "all-gather"}.get(a.kind, "all-reduce")
            resource = f"{what} of L{g.start}-{g.stop - 1} over {group_links[a.group]}"
        dur = end - start
        by_res[resource] = by_res.get(resource, 0.0) + dur
        by_kind[a.kind] = by_kind.get(a.kind, 0.0) + dur
        segs.append({"name": a.name, "device": a.device, "kind": a.kind, "start_s": start, "end_s": end,
                     "resource": resource})
        bound = a.t0
        i = a.cause
    segs.reverse()
    top = max(by_res.items(), key=lambda kv: (kv[1], kv[0]))
    total = sum(by_kind.values())
    words = {"F": "forward", "B": "backward", "send": "sends", "allreduce": "all-reduce", "optimizer": "optimizer",
             "tp": "tensor-parallel all-reduce", "reducescatter": "reduce-scatter", "allgather": "all-gather",
             "loss": "loss all-reduce"}
    made_of = ", ".join(f"{words.get(k, k)} {100 * v / total:.0f}%"
                        for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])) if total > 0 else ""
    return {"bound_by": f"{top[0]} ({100 * top[1] / total:.0f}% of the path)" if total > 0 else top[0],
            "made_of": made_of,
            "by_resource_s": dict(sorted(by_res.items(), key=lambda kv: -kv[1])),
            "by_kind_s": by_kind, "segments": segs}
