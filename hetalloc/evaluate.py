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

from .cluster import Cluster
from .costgraph import CostGraph
from .collectives import pick
from .costs import (LOSS_BYTES, MemoryBreakdown, collective_time as analytic_collective_time, grad_bytes_per_param,
                    hierarchical_allreduce_time, optimizer_time, p2p_time, param_server_time, ring_allreduce_time,
                    small_allreduce_time, tp_comm_time, usable_memory)
from .plan import Group, Plan, device_memory, optimizer_params, segments
from .schedule import PipeDevice, pipeline_timing


def slice_overlaps(senders: list[int], receivers: list[int]) -> list[tuple[int, int, int]]:
    """Shares are consecutive slices of the micro-batch in listed order. Returns
    (sender index, receiver index, samples in common) for every overlapping pair."""
    out = []
    a0 = 0
    for i, a in enumerate(senders):
        b0 = 0
        for j, b in enumerate(receivers):
            common = min(a0 + a, b0 + b) - max(a0, b0)
            if common > 0:
                out.append((i, j, common))
            b0 += b
        a0 += a
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


def sync_groups(plan: Plan, cluster: Cluster, cg: CostGraph, algorithm: str | None = None) -> list[GroupSync]:
    """Gradient groups: per maximal layer segment held by the same groups, and per slice j
    of its t_max parameter slices (t_max: the largest tensor-parallel degree among its
    holders), the devices holding slice j: rank j * t / t_max of every holder group. A
    slice's bytes are its share of the split parameters plus the replicated ones (norms,
    biases), whose gradients every tensor-parallel rank has whole. With t = 1 everywhere
    this is one group per segment with all its holders."""
    algorithm = algorithm or plan.grad_sync
    per_param = grad_bytes_per_param(plan.precision)
    out = []
    for a, b, holders in segments(plan):
        t_max = max(g.tp for g in holders)
        nbytes = cg.range_params(a, b, t_max) * per_param
        for j in range(t_max):
            devs = [g.devices[j * g.tp // t_max] for g in holders]
            out.append(GroupSync(a, b, devs, nbytes, allreduce_time(cluster, devs, nbytes, algorithm), algorithm,
                                 j, t_max))
    return out


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
    ring = sorted(devices, key=cluster.device_index.__getitem__)
    hops = [cluster.path(a, b) for a, b in zip(ring, ring[1:] + ring[:1])]
    return small_allreduce_time(LOSS_BYTES, len(ring), min(h.bandwidth_bytes_per_s for h in hops),
                                max(h.latency_s for h in hops))


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
    measured = measured_sync_time(cluster, devices, nbytes, algorithm)
    if measured is not None:
        return measured
    ring = sorted(devices, key=cluster.device_index.__getitem__)
    if algorithm == "ring":
        hops = [cluster.path(a, b) for a, b in zip(ring, ring[1:] + ring[:1])]
        return ring_allreduce_time(nbytes, len(ring), min(h.bandwidth_bytes_per_s for h in hops),
                                   max(h.latency_s for h in hops))
    per_node: dict[str, int] = {}
    for d in ring:
        n = cluster.device(d).node
        per_node[n] = per_node.get(n, 0) + 1
    nodes = list(per_node)
    intra = [cluster.node_path(n, n) for n in nodes if per_node[n] > 1] or [cluster.node_path(nodes[0], nodes[0])]
    inter = [cluster.node_path(a, b) for a, b in zip(nodes, nodes[1:] + nodes[:1]) if a != b]
    intra_bw, intra_lat = min(x.bandwidth_bytes_per_s for x in intra), max(x.latency_s for x in intra)
    inter_bw = min((x.bandwidth_bytes_per_s for x in inter), default=intra_bw)
    inter_lat = max((x.latency_s for x in inter), default=intra_lat)
    counts = list(per_node.values())
    if algorithm == "hierarchical":
        return hierarchical_allreduce_time(nbytes, counts, intra_bw, intra_lat, inter_bw, inter_lat)
    if algorithm == "param_server":
        return param_server_time(nbytes, counts, intra_bw, intra_lat, inter_bw, inter_lat)
    raise ValueError(f"unknown gradient sync algorithm '{algorithm}'")

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
    r = plan.replicas[replica_index]
    groups: list[Group] = []
    stage_of: list[int] = []
    first_index: list[int] = []
    for si, s in enumerate(r.stages):
        first_index.append(len(groups))
        for g in s.groups:
            groups.append(g)
            stage_of.append(si)
    n = len(groups)
    cf, cb, tf, tb, sf, sb = ([0.0] * n for _ in range(6))
    ins: list[list[int]] = [[] for _ in range(n)]
    outs: list[list[int]] = [[] for _ in range(n)]
    for si, s in enumerate(r.stages):
        base = first_index[si]
        for k, g in enumerate(s.groups):
            cf[base + k], cb[base + k] = cg.range_time(s.start, s.stop, cluster.dtype(g.lead), g.share, g.tp,
                                                       s.recompute)
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
    devs = [PipeDevice(groups[i].lead, stage_of[i], cf[i] + tf[i] + sf[i], cb[i] + tb[i] + sb[i], ins[i], outs[i])
            for i in range(n)]
    return ReplicaPipe(devs, groups, cf, cb, tf, tb, sf, sb)


def optimizer_times(plan: Plan, cluster: Cluster, cg: CostGraph) -> dict[str, float]:
    """Each device's optimizer step (``hetalloc.costs.optimizer_time`` over
    ``optimizer_params``)."""
    return {d: optimizer_time(n, cluster.dtype(d), plan.precision, plan.optimizer)
            for d, n in optimizer_params(plan, cg).items()}


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
    """All predicted figures of a plan (module doc gives the model)."""
    pipe_time = 0.0
    busy_total = 0.0
    pipe_devices = 0
    stages_out: list[dict[str, Any]] = []
    cache: dict[tuple, tuple] = {}
    for ri, r in enumerate(plan.replicas):
        # Replicas with the same device types, group sizes, shares and paths time identically.
        key = tuple((s.start, s.stop, s.recompute,
                     tuple((cluster.dtype(g.lead).name, g.tp, g.share, cluster.device(g.lead).node) for g in s.groups))
                    for s in r.stages)
        hit = cache.get(key)
        if hit is None:
            pipe = build_pipe(plan, ri, cluster, cg)
            timing = pipeline_timing(pipe.devices, len(r.stages), plan.num_microbatches, plan.schedule)
            hit = (pipe, timing)
            cache[key] = hit
        pipe, timing = hit
        pipe_time = max(pipe_time, timing.makespan_s)
        # a group's devices are all busy with its compute and its tensor-parallel all-reduces
        busy_total += sum((pipe.compute_fwd[i] + pipe.compute_bwd[i] + pipe.tp_fwd[i] + pipe.tp_bwd[i]) * g.tp
                          for i, g in enumerate(pipe.groups)) * plan.num_microbatches
        pipe_devices += sum(g.tp for g in pipe.groups)
        k = 0
        for si, s in enumerate(r.stages):
            idx = range(k, k + len(s.groups))
            k += len(s.groups)
            stages_out.append({
                "replica": ri, "stage": si, "layers": [s.start, s.stop], "devices": len(s.device_ids()),
                "groups": len(s.groups), "recompute": s.recompute,
                "fwd_s": max(pipe.compute_fwd[i] for i in idx),
                "bwd_s": max(pipe.compute_bwd[i] for i in idx),
                "tp_s": max(pipe.tp_fwd[i] + pipe.tp_bwd[i] for i in idx),
                "p2p_s": max(pipe.send_fwd[i] + pipe.send_bwd[i] for i in idx),
            })
    groups = sync_groups(plan, cluster, cg)
    sync_of: dict[str, float] = {}
    for g in groups:
        for d in g.devices:
            sync_of[d] = sync_of.get(d, 0.0) + g.time_s
    opt_of = optimizer_times(plan, cluster, cg)
    placement = plan.placement()
    tail = max(sync_of.get(d, 0.0) + opt_of[d] for d in placement)
    worst = max(placement, key=lambda d: (sync_of.get(d, 0.0) + opt_of[d], d))
    for st in stages_out:
        s = plan.replicas[st["replica"]].stages[st["stage"]]
        st["sync_s"] = max(sync_of.get(d, 0.0) for d in s.device_ids())
    loss_s = loss_reduction_time(cluster, list(placement))
    iteration = pipe_time + tail + loss_s
    mem = device_memory(plan, cluster, cg)
    frac = {d: mem[d].total / usable_memory(cluster.dtype(d)) for d in mem}
    by_alg = {}
    for alg in ("ring", "hierarchical", "param_server"):
        per_device: dict[str, float] = {}
        for g in sync_groups(plan, cluster, cg, alg):  # once per algorithm, not once per device
            for d in g.devices:
                per_device[d] = per_device.get(d, 0.0) + g.time_s
        by_alg[alg] = max((per_device.get(d, 0.0) for d in placement), default=0.0)
    samples = plan.global_batch
    return Prediction(
        iteration_time_s=iteration,
        pipeline_time_s=pipe_time,
        sync_time_s=sync_of.get(worst, 0.0),
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
