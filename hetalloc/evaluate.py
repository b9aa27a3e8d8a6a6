"""Predicted figures of a concrete plan, from the shared cost formulas.

This is the contention-free, non-overlapped reference that the simulator reproduces
when link sharing and overlap are switched off:
1. pipeline phase: every group (a device, or t tensor-parallel devices in lockstep) runs
   its schedule's ops; an op lasts its compute time (``CostGraph.range_time`` with the
   group's t and the stage's recompute choice), plus its tensor-parallel all-reduces on
   the node's link (``hetalloc.costs.tp_comm_time``), plus its blocking sends (forward:
   its activation slices to the next stage's groups, backward: input-gradient slices to
   the previous stage's); see hetalloc.schedule. Every rank k of a receiving group gets
   the whole slice from rank k mod t of the sending group (``rank_pairs``); the op ends
   when its busiest rank has sent;
2. gradient synchronisation after the flush: the devices holding the same parameter
   slice all-reduce their gradients with the plan's algorithm (``sync_groups``); with
   zero1 a reduce-scatter before the optimizer step and an all-gather after it, each
   half of that (``hetalloc.costs.zero1_halves``);
3. optimizer step on every device (zero1: on its 1/d of the state).
4. the loss reduction: every device all-reduces the step's loss once the last device has
   stepped (``loss_reduction_time``); the iteration ends with it.
Collectives are timed by ``collective_time``: the cluster's measured tables where it has
them (``hetalloc.collectives``, from ``hetalloc profile``), else the analytic formulas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cluster import Cluster
from .costgraph import CostGraph
from .collectives import pick
from .costs import (LOSS_BYTES, MemoryBreakdown, collective_time as analytic_collective_time, grad_bytes_per_param,
                    hierarchical_allreduce_time, input_time, optimizer_time, p2p_time, param_server_time, ring_allreduce_time,
                    small_allreduce_time, tp_comm_time, usable_memory)
from .plan import Group, Plan, Replica, device_memory, optimizer_params, segments
from .schedule import PipeDevice, PipeTiming, pipeline_timing


def slice_overlaps(senders: list[int], receivers: list[int]) -> list[tuple[int, int, int]]:
    """Shares are consecutive slices of the micro-batch in listed order. Returns
    (sender index, receiver index, samples in common) for every overlapping pair, by
    sender then receiver (one pass over both lists)."""
    out = []
    i = j = 0
    a0 = b0 = 0
    while i < len(senders) and j < len(receivers):
        a1, b1 = a0 + senders[i], b0 + receivers[j]
        common = min(a1, b1) - max(a0, b0)
        if common > 0:
            out.append((i, j, common))
        if a1 <= b1:
            i, a0 = i + 1, a1
        if b1 <= a1:
            j, b0 = j + 1, b1
    return out


def rank_pairs(senders: list[str], receivers: list[str]) -> list[tuple[str, str]]:
    """Who sends a slice to whom between two groups: every rank k of the receiving group
    gets the whole slice from rank k mod t of the sending group (one device to one
    device when t = 1). The same rule serves activations forward and input gradients
    backward (senders and receivers swapped); every rank of a tensor-parallel group holds
    the full activations at a stage boundary, so any rank can send them. The runtime sends
    this way: on gloo it beat every sending rank sending its part and Megatron-LM's
    scatter-gather in every case measured (benchmarks/tp_sends.py)."""
    return [(senders[k % len(senders)], r) for k, r in enumerate(receivers)]


@dataclass
class GroupSync:
    start: int
    stop: int
    devices: list[str]
    nbytes: float
    time_s: float
    """All-reduce seconds (zero1: reduce-scatter + all-gather, half each)."""
    algorithm: str
    slice: int = 0
    """Which of ``slices`` parameter slices of the segment (tensor parallelism)."""
    slices: int = 1


def gradient_groups(plan: Plan, cluster: Cluster, cg: CostGraph
                    ) -> list[tuple[int, int, list[str], np.ndarray, float, int, int]]:
    """The gradient groups of ``sync_groups`` without their times: (start, stop, devices,
    their cluster indices sorted, bytes, slice, slices)."""
    per_param = grad_bytes_per_param(plan.precision)
    index = cluster.device_index
    out = []
    for a, b, holders in segments(plan):
        t_max = max(g.tp for g in holders)
        nbytes = cg.range_params(a, b, t_max) * per_param
        for j in range(t_max):
            devs = [g.devices[j * g.tp // t_max] for g in holders]
            idx = np.sort(np.fromiter((index[d] for d in devs), dtype=np.int64, count=len(devs)))
            out.append((a, b, devs, idx, nbytes, j, t_max))
    return out


def sync_groups(plan: Plan, cluster: Cluster, cg: CostGraph, algorithm: str | None = None) -> list[GroupSync]:
    """Gradient groups: per maximal layer segment held by the same groups, and per slice j
    of its t_max parameter slices (t_max: the largest tensor-parallel degree among its
    holders), the devices holding slice j: rank j * t / t_max of every holder group. A
    slice's bytes are its share of the split parameters plus the replicated ones (norms,
    biases), whose gradients every tensor-parallel rank has whole. With t = 1 everywhere
    this is one group per segment with all its holders."""
    algorithm = algorithm or plan.grad_sync
    return [GroupSync(a, b, devs, nbytes, allreduce_time_of(cluster, idx, nbytes, algorithm), algorithm, j, t)
            for a, b, devs, idx, nbytes, j, t in gradient_groups(plan, cluster, cg)]


def measured_time(cluster: Cluster, op: str, devices: list[str], nbytes: float) -> float | None:
    """`op` (hetalloc.costs.COLLECTIVE_OPS) of nbytes among `devices` from the cluster's
    measured tables: over the node's intra link when they share a node (scope 'intra'),
    else over the NICs (scope 'inter', the slowest NIC's link class); None when no table
    covers it."""
    n = len(devices)
    if n <= 1 or nbytes <= 0:
        return 0.0
    if not cluster.collectives:
        return None
    nodes = list(dict.fromkeys(cluster.device(d).node for d in devices))
    if len(nodes) == 1:
        table = pick(cluster.collectives, op, "intra", cluster.node_by_name[nodes[0]].intra.name, n)
    else:
        nics = [cluster.node_by_name[x].nic for x in nodes]
        slowest = min((x for x in nics if x is not None), key=lambda x: x.bandwidth_bytes_per_s, default=None)
        table = pick(cluster.collectives, op, "inter", slowest.name if slowest else "", n)
    return None if table is None else table.time(nbytes, n)


def collective_time(cluster: Cluster, op: str, devices: list[str], nbytes: float) -> float:
    """`op` of nbytes among `devices`: measured (``measured_time``) where the cluster has a
    table for it, else ``hetalloc.costs.collective_time`` over the group's slowest path."""
    t = measured_time(cluster, op, devices, nbytes)
    if t is not None:
        return t
    ring = sorted(devices, key=cluster.device_index.__getitem__)
    hops = [cluster.path(a, b) for a, b in zip(ring, ring[1:] + ring[:1])]
    return analytic_collective_time(op, nbytes, len(ring), min(h.bandwidth_bytes_per_s for h in hops),
                                    max(h.latency_s for h in hops))


def loss_reduction_time(cluster: Cluster, devices: list[str]) -> float:
    """The end-of-step all-reduce of the loss (hetalloc.costs.LOSS_BYTES) over `devices`
    (every device of the plan): measured where the cluster has a table, else
    ``hetalloc.costs.small_allreduce_time`` over the group's slowest path."""
    t = measured_time(cluster, "allreduce", list(devices), LOSS_BYTES)
    if t is not None:
        return t
    if len(devices) <= 1:
        return 0.0
    index = cluster.device_index
    idx = np.sort(np.fromiter((index[d] for d in devices), dtype=np.int64, count=len(devices)))
    return small_allreduce_time(LOSS_BYTES, len(idx), *ring_bottleneck(cluster, idx))


def ring_bottleneck(cluster: Cluster, idx: np.ndarray) -> tuple[float, float]:
    """Least bandwidth and largest latency among the hops of the ring over cluster
    positions `idx` (sorted, distinct, at least two), the wrap-around included."""
    bw, lat = cluster.links.hops(idx, np.roll(idx, -1))
    return float(bw.min()), float(lat.max())


def measured_sync_time(cluster: Cluster, devices: list[str], nbytes: float, algorithm: str) -> float | None:
    """Gradient synchronisation from measured collectives, composed of the calls the
    runtime makes (runtime.grad_sync): ring: one all-reduce; hierarchical: a reduce to a
    leader in each node, an all-reduce among the leaders, a broadcast in each node;
    parameter server: a reduce of each member's shard to its owner, then its broadcast
    back. None when a part has no table."""
    if not cluster.collectives:
        return None
    if algorithm == "ring":
        return measured_time(cluster, "allreduce", devices, nbytes)
    per_node: dict[str, list[str]] = {}
    for d in sorted(devices, key=cluster.device_index.__getitem__):
        per_node.setdefault(cluster.device(d).node, []).append(d)
    if algorithm == "hierarchical":
        if len(per_node) == 1:
            return measured_time(cluster, "allreduce", devices, nbytes)
        widest = max(per_node.values(), key=len)
        parts = [measured_time(cluster, "allreduce", [v[0] for v in per_node.values()], nbytes)]
        if len(widest) > 1:
            parts += [measured_time(cluster, "reduce", widest, nbytes), measured_time(cluster, "broadcast", widest, nbytes)]
        return None if any(p is None for p in parts) else sum(parts)
    if algorithm == "param_server":
        n = len(devices)
        parts = [measured_time(cluster, op, devices, nbytes / n) for op in ("reduce", "broadcast")]
        return None if any(p is None for p in parts) else n * sum(parts)
    raise ValueError(f"unknown gradient sync algorithm '{algorithm}'")


def allreduce_time(cluster: Cluster, devices: list[str], nbytes: float, algorithm: str) -> float:
    """Gradient synchronisation time of a group of devices: measured collectives where the
    cluster has them (``measured_sync_time``), else the formulas in hetalloc.costs."""
    if len(devices) <= 1:
        return 0.0
    index = cluster.device_index
    idx = np.sort(np.fromiter((index[d] for d in devices), dtype=np.int64, count=len(devices)))
    return allreduce_time_of(cluster, idx, nbytes, algorithm)


def allreduce_time_of(cluster: Cluster, idx: np.ndarray, nbytes: float, algorithm: str) -> float:
    """``allreduce_time`` of the devices at cluster positions `idx` (sorted, distinct):
    measured where the cluster has tables (``measured_sync_time``), else the formulas.
    The ring runs in cluster order; its bottleneck is the slowest of its hops (the
    wrap-around included). Hierarchical and parameter-server take the slowest intra link
    among the nodes with several of the devices (else the first node's) and the slowest
    path between consecutive nodes of the ring of nodes."""
    n = len(idx)
    if n <= 1:
        return 0.0
    if cluster.collectives:
        measured = measured_sync_time(cluster, [cluster.devices[i].id for i in idx.tolist()], nbytes, algorithm)
        if measured is not None:
            return measured
    links = cluster.links
    if algorithm == "ring":
        bw, lat = links.hops(idx, np.roll(idx, -1))
        return ring_allreduce_time(nbytes, n, float(bw.min()), float(lat.max()))
    if algorithm not in ("hierarchical", "param_server"):
        raise ValueError(f"unknown gradient sync algorithm '{algorithm}'")
    nodes, counts = np.unique(links.node_of[idx], return_counts=True)  # in ring order
    cls = links.class_of[nodes]
    intra = cls[counts > 1] if (counts > 1).any() else cls[:1]
    intra_bw, intra_lat = float(links.intra_bw[intra].min()), float(links.intra_lat[intra].max())
    if len(nodes) > 1:
        nxt = np.roll(cls, -1)
        inter_bw, inter_lat = float(links.pair_bw[cls, nxt].min()), float(links.pair_lat[cls, nxt].max())
    else:
        inter_bw, inter_lat = intra_bw, intra_lat
    per_node = counts.tolist()
    if algorithm == "hierarchical":
        return hierarchical_allreduce_time(nbytes, per_node, intra_bw, intra_lat, inter_bw, inter_lat)
    return param_server_time(nbytes, per_node, intra_bw, intra_lat, inter_bw, inter_lat)

@dataclass
class ReplicaPipe:
    """Per group of one replica (in stage order): op durations and their parts."""

    devices: list[PipeDevice]
    groups: list[Group]
    compute_fwd: list[float]
    compute_bwd: list[float]
    tp_fwd: list[float]
    """Tensor-parallel all-reduce seconds per forward op."""
    tp_bwd: list[float]
    send_fwd: list[float]
    """Blocking send seconds per forward op (its busiest rank)."""
    send_bwd: list[float]

    @property
    def ids(self) -> list[str]:
        """The groups' rank-0 devices."""
        return [g.lead for g in self.groups]


def group_tp_times(cluster: Cluster, cg: CostGraph, g: Group, start: int, stop: int,
                   recompute: str) -> tuple[float, float]:
    """Seconds of a group's tensor-parallel all-reduces per forward and per backward op:
    ``hetalloc.costs.tp_comm_time`` over the path between two of its devices (the node's
    intra link)."""
    if g.tp == 1:
        return 0.0, 0.0
    link = cluster.path(g.devices[0], g.devices[1])
    nf, bf, nb, bb = cg.tp_allreduces(start, stop, recompute)
    bw, lat = link.bandwidth_bytes_per_s, link.latency_s
    return tp_comm_time(nf, bf * g.share, g.tp, bw, lat), tp_comm_time(nb, bb * g.share, g.tp, bw, lat)


def build_pipe(plan: Plan, replica_index: int, cluster: Cluster, cg: CostGraph) -> ReplicaPipe:
    """Per-group op durations and wiring of one replica (see module doc)."""
    return replica_pipe(plan.replicas[replica_index], cluster, cg, plan.num_microbatches)


def replica_pipe(r: Replica, cluster: Cluster, cg: CostGraph, num_microbatches: int = 0) -> ReplicaPipe:
    """``build_pipe`` of a replica given by itself; with `num_microbatches`, its first and
    last stages' groups start their step after building their inputs or labels
    (``hetalloc.costs.input_time``; 0: no input time)."""
    groups: list[Group] = []
    stage_of: list[int] = []
    first_index: list[int] = []
    for si, s in enumerate(r.stages):
        first_index.append(len(groups))
        for g in s.groups:
            groups.append(g)
            stage_of.append(si)
    n = len(groups)
    cf, cb, cbc, tf, tb, sf, sb = ([0.0] * n for _ in range(7))
    ins: list[list[int]] = [[] for _ in range(n)]
    outs: list[list[int]] = [[] for _ in range(n)]
    for si, s in enumerate(r.stages):
        base = first_index[si]
        for k, g in enumerate(s.groups):
            cf[base + k], cb[base + k] = cg.range_time(s.start, s.stop, cluster.dtype(g.lead), g.share, g.tp,
                                                       s.recompute)
            cbc[base + k] = cg.range_time(s.start, s.stop, cluster.dtype(g.lead), g.share, g.tp, s.recompute,
                                          cold=True)[1]
            tf[base + k], tb[base + k] = group_tp_times(cluster, cg, g, s.start, s.stop, s.recompute)
        if si + 1 < len(r.stages):
            nxt = r.stages[si + 1]
            nbase = first_index[si + 1]
            per_sample = cg.layers[s.stop - 1].out_act_bytes
            rank_f: dict[str, float] = {}  # seconds of blocking sends per device
            rank_b: dict[str, float] = {}
            for i, j, common in slice_overlaps([g.share for g in s.groups], [g.share for g in nxt.groups]):
                a, b = base + i, nbase + j
                ga, gb = groups[a], groups[b]
                for src, dst in rank_pairs(ga.devices, gb.devices):  # activations forward
                    link = cluster.path(src, dst)
                    rank_f[src] = rank_f.get(src, 0.0) + p2p_time(common * per_sample, link.bandwidth_bytes_per_s,
                                                                  link.latency_s)
                for src, dst in rank_pairs(gb.devices, ga.devices):  # input gradients backward, same size
                    link = cluster.path(src, dst)
                    rank_b[src] = rank_b.get(src, 0.0) + p2p_time(common * per_sample, link.bandwidth_bytes_per_s,
                                                                  link.latency_s)
                outs[a].append(b)
                ins[b].append(a)
            for k, g in enumerate(s.groups):
                sf[base + k] = max(rank_f.get(d, 0.0) for d in g.devices)
            for k, g in enumerate(nxt.groups):
                sb[nbase + k] = max(rank_b.get(d, 0.0) for d in g.devices)
    last = len(r.stages) - 1
    devs = [PipeDevice(groups[i].lead, stage_of[i], cf[i] + tf[i] + sf[i], cb[i] + tb[i] + sb[i], ins[i], outs[i],
                       cbc[i] + tb[i] + sb[i] if cbc[i] != cb[i] else None,
                       input_time(groups[i].share * num_microbatches, cluster.dtype(groups[i].lead))
                       if stage_of[i] in (0, last) else 0.0)
            for i in range(n)]
    return ReplicaPipe(devs, groups, cf, cb, tf, tb, sf, sb)


def optimizer_times(plan: Plan, cluster: Cluster, cg: CostGraph) -> dict[str, float]:
    """Each device's optimizer step (``hetalloc.costs.optimizer_time`` over
    ``optimizer_params``)."""
    memo: dict[tuple[float, str], float] = {}
    out = {}
    for d, n in optimizer_params(plan, cg).items():
        dtype = cluster.dtype(d)
        t = memo.get((n, dtype.name))
        if t is None:
            t = memo[(n, dtype.name)] = optimizer_time(n, dtype, plan.precision, plan.optimizer)
        out[d] = t
    return out


def replica_key(r: Replica, cluster: Cluster) -> tuple:
    """What a replica's op durations and wiring depend on (``replica_pipe``): per stage its
    layers, recompute choice and groups (device type, share, and the node of every device
    as a slot numbered in order of appearance), and each slot's link class. Replicas with
    equal keys time identically wherever their nodes are."""
    node_of = cluster.links.node_of_id
    slots: dict[int, int] = {}
    stages = []
    for s in r.stages:
        groups = tuple((cluster.device(g.lead).type, g.share,
                        tuple(slots.setdefault(node_of[d], len(slots)) for d in g.devices)) for g in s.groups)
        stages.append((s.start, s.stop, s.recompute, groups))
    class_of = cluster.links.class_of
    return tuple(stages), tuple(int(class_of[n]) for n in slots)


def timing_key(pipe: ReplicaPipe) -> tuple:
    """What ``pipeline_timing`` depends on besides the schedule: op durations and wiring."""
    return tuple((d.stage, d.fwd_s, d.bwd_s, d.bwd_cold_s, d.start_s, tuple(d.inputs), tuple(d.outputs))
                 for d in pipe.devices)


@dataclass
class Prediction:
    iteration_time_s: float
    pipeline_time_s: float
    sync_time_s: float
    optimizer_time_s: float
    throughput_samples_per_s: float
    tokens_per_s: float
    mfu: float
    bubble_fraction: float
    stages: list[dict[str, Any]]
    memory: dict[str, MemoryBreakdown]
    memory_fraction: dict[str, float]
    sync_by_algorithm: dict[str, float] = field(default_factory=dict)
    loss_reduction_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration_time_s": self.iteration_time_s,
            "pipeline_time_s": self.pipeline_time_s,
            "sync_time_s": self.sync_time_s,
            "optimizer_time_s": self.optimizer_time_s,
            "throughput_samples_per_s": self.throughput_samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "bubble_fraction": self.bubble_fraction,
            "stages": self.stages,
            "memory_bytes": {k: v.total for k, v in self.memory.items()},
            "memory_fraction": self.memory_fraction,
            "sync_by_algorithm_s": self.sync_by_algorithm,
            "loss_reduction_time_s": self.loss_reduction_time_s,
        }


def predict(plan: Plan, cluster: Cluster, cg: CostGraph) -> Prediction:
    """All predicted figures of a plan (module doc gives the model). The work grows with
    the distinct replicas (``replica_key``, then ``timing_key``), not with the replicas."""
    M = plan.num_microbatches
    pipe_time = 0.0
    busy_total = 0.0
    pipe_devices = 0
    stages_out: list[dict[str, Any]] = []
    by_structure: dict[tuple, tuple] = {}
    by_timing: dict[tuple, PipeTiming] = {}
    for ri, r in enumerate(plan.replicas):
        key = replica_key(r, cluster)
        hit = by_structure.get(key)
        if hit is None:
            pipe = replica_pipe(r, cluster, cg, M)
            tkey = timing_key(pipe)
            timing = by_timing.get(tkey)
            if timing is None:
                timing = by_timing[tkey] = pipeline_timing(pipe.devices, len(r.stages), M, plan.schedule)
            # a group's devices are all busy with its compute and its tensor-parallel all-reduces
            busy = sum((pipe.compute_fwd[i] + pipe.compute_bwd[i] + pipe.tp_fwd[i] + pipe.tp_bwd[i]) * g.tp
                       for i, g in enumerate(pipe.groups)) * M
            rows, k = [], 0
            for s in r.stages:
                idx = range(k, k + len(s.groups))
                k += len(s.groups)
                rows.append((sum(g.tp for g in s.groups), len(s.groups),
                             max(pipe.compute_fwd[i] for i in idx), max(pipe.compute_bwd[i] for i in idx),
                             max(pipe.tp_fwd[i] + pipe.tp_bwd[i] for i in idx),
                             max(pipe.send_fwd[i] + pipe.send_bwd[i] for i in idx)))
            hit = by_structure[key] = (timing.makespan_s, busy, sum(g.tp for g in pipe.groups), rows)
        makespan, busy, ndev, rows = hit
        pipe_time = max(pipe_time, makespan)
        busy_total += busy
        pipe_devices += ndev
        for si, (s, (nd, ng, fwd, bwd, tp, p2p)) in enumerate(zip(r.stages, rows)):
            stages_out.append({
                "replica": ri, "stage": si, "layers": [s.start, s.stop], "devices": nd,
                "groups": ng, "recompute": s.recompute, "fwd_s": fwd, "bwd_s": bwd, "tp_s": tp, "p2p_s": p2p,
            })
    # Gradient groups once; their times per algorithm, summed per device (by cluster position).
    groups = gradient_groups(plan, cluster, cg)
    index = cluster.device_index
    used = plan.device_ids()
    used_idx = np.fromiter((index[d] for d in used), dtype=np.int64, count=len(used))
    by_alg: dict[str, float] = {}
    sync_of = np.zeros(cluster.num_devices)
    for alg in ("ring", "hierarchical", "param_server"):
        acc = sync_per_device(groups, cluster, alg)
        by_alg[alg] = float(acc[used_idx].max()) if len(used) else 0.0
        if alg == plan.grad_sync:
            sync_of = acc
    if plan.grad_sync not in by_alg:
        raise ValueError(f"unknown gradient sync algorithm '{plan.grad_sync}'")
    opt_of = optimizer_times(plan, cluster, cg)
    sync_list = sync_of[used_idx].tolist()
    ends = [s + opt_of[d] for d, s in zip(used, sync_list)]
    tail = max(ends)
    worst_i = max(range(len(used)), key=lambda i: (ends[i], used[i]))
    worst = used[worst_i]
    sync_by_device = dict(zip(used, sync_list))
    for st in stages_out:
        s = plan.replicas[st["replica"]].stages[st["stage"]]
        st["sync_s"] = max(sync_by_device[d] for d in s.device_ids())
    loss_s = loss_reduction_time(cluster, used)
    iteration = pipe_time + tail + loss_s
    mem = device_memory(plan, cluster, cg)
    frac = memory_fractions(mem, cluster)
    samples = plan.global_batch
    return Prediction(
        iteration_time_s=iteration,
        pipeline_time_s=pipe_time,
        sync_time_s=sync_list[worst_i],
        optimizer_time_s=opt_of[worst],
        throughput_samples_per_s=samples / iteration,
        tokens_per_s=samples * cg.seq_len / iteration,
        mfu=samples * cg.train_flops_per_sample() / (iteration * cluster.total_peak_flops()),
        bubble_fraction=max(0.0, 1.0 - busy_total / (pipe_devices * pipe_time)) if pipe_time > 0 else 0.0,
        stages=stages_out,
        memory=mem,
        memory_fraction=frac,
        sync_by_algorithm=by_alg,
        loss_reduction_time_s=loss_s,
    )


def sync_per_device(groups: list, cluster: Cluster, algorithm: str) -> np.ndarray:
    """Seconds of gradient synchronisation of every device (by cluster position): the sum,
    in group order, of the all-reduces of the ``gradient_groups`` it belongs to."""
    acc = np.zeros(cluster.num_devices)
    for _, _, _, idx, nbytes, _, _ in groups:
        if len(idx) > 1:
            acc[idx] += allreduce_time_of(cluster, idx, nbytes, algorithm)
    return acc


def after_flush_time(plan: Plan, cluster: Cluster, cg: CostGraph) -> float:
    """What ``predict`` adds to the pipeline time: the slowest device's gradient
    synchronisation (the plan's algorithm) plus optimizer step, then the loss reduction."""
    acc = sync_per_device(gradient_groups(plan, cluster, cg), cluster, plan.grad_sync)
    index = cluster.device_index
    tail = max(float(acc[index[d]]) + t for d, t in optimizer_times(plan, cluster, cg).items())
    return tail + loss_reduction_time(cluster, plan.device_ids())


def memory_fractions(mem: dict[str, MemoryBreakdown], cluster: Cluster) -> dict[str, float]:
    """Each device's memory as a fraction of its usable memory."""
    usable = {t: usable_memory(dt) for t, dt in cluster.device_types.items()}
    return {d: m.total / usable[cluster.device(d).type] for d, m in mem.items()}
