"""What each device of a plan does in a training step, and which replicas are identical.

For every pipeline replica this builds, per device, what the shared vocabulary says it
costs: compute time of its layer range for its share (``CostGraph.range_time``), the
activation / input-gradient slices it sends (``hetalloc.evaluate.slice_overlaps``; the
same bytes forward and backward, as the cost prediction assumes), its optimizer step
(``hetalloc.costs.optimizer_time``) and its memory (``hetalloc.costs.stage_memory``).

Chains: a replica whose stages split the micro-batch alike is several independent
pipelines (``split_chains``); they are simulated as such, which is exact.

Folding: replicas with the same stages, device types and shares run the same timeline
when nothing couples them unevenly, so one representative is simulated for all of them.
Without contention the condition is that their sends see the same path bandwidth and
latency. With contention it must also hold that every mate's sends meet the same load
on their links: the links a replica class sends over are used by no other class (the
fabric core excepted: there each representative send counts once per mate), each
mate's sends cross links of the same capacity with the same number of mates on them, in
the same pattern, and the collectives load a mate's links as they load the
representative's. Where any of this fails the replicas are simulated one by one. Folding
is therefore exact, never an approximation.

Never: invent costs here; every figure comes from hetalloc.costs / hetalloc.costgraph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from hetalloc.catalog import DeviceType
from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.costs import optimizer_time, p2p_time, stage_memory
from hetalloc.evaluate import slice_overlaps
from hetalloc.plan import Plan, Replica, Stage
from hetalloc.schedule import Op, stage_op_order

from .links import Topology, Usage, UsageTable


@dataclass(slots=True)
class Send:
    dst: str
    nbytes: float
    latency_s: float
    formula_s: float
    """hetalloc.costs.p2p_time over the path: the time alone on an idle network."""
    usage: Usage | None = None
    """Links crossed (with mates' multiplicity) — set when simulating contention."""


@dataclass(slots=True)
class DeviceWork:
    id: str
    replica: int
    stage: int
    num_stages: int
    start: int
    stop: int
    share: int
    dtype: DeviceType
    fwd_s: float
    bwd_s: float
    bwd_layer_s: list[float]
    """Backward seconds of each layer of the stage (layer order), for bucket readiness."""
    inputs: list[str]
    outputs: list[str]
    sends_fwd: list[Send]
    sends_bwd: list[Send]
    optimizer_s: float
    order: list[Op]
    static_bytes: float
    """Weights, gradients, optimizer state and send/receive buffers."""
    act_bytes_per_mb: float
    """Saved activations of one micro-batch (its share)."""
    mates: list[str] = field(default_factory=list)
    """Devices this one stands for, itself first."""


def replica_work(plan: Plan, ri: int, cluster: Cluster, cg: CostGraph,
                 topo: Topology) -> tuple[list[DeviceWork], list[Send]]:
    """The work of replica ri's devices, and its sends in template order (all forward
    sends, then all backward ones, stage pair by stage pair, as ``_paths`` lists them)."""
    r = plan.replicas[ri]
    S, M = len(r.stages), plan.num_microbatches
    out: list[DeviceWork] = []
    by_stage: list[list[DeviceWork]] = []
    for si, s in enumerate(r.stages):
        params = cg.params(s.start, s.stop)
        saved = sum(l.saved_act_bytes for l in cg.layers[s.start:s.stop])
        outb = cg.layers[s.stop - 1].out_act_bytes
        row = []
        for g in s.groups:
            dt = cluster.dtype(g.lead)
            f, b = cg.range_time(s.start, s.stop, dt, g.share)
            static = stage_memory(params, saved, outb, g.share, 0, plan.precision, plan.optimizer)
            one_mb = stage_memory(params, saved, outb, g.share, 1, plan.precision, plan.optimizer)
            w = DeviceWork(
                id=g.lead, replica=ri, stage=si, num_stages=S, start=s.start, stop=s.stop, share=g.share,
                dtype=dt, fwd_s=f, bwd_s=b,
                bwd_layer_s=[float(x) for x in cg.layer_times(dt, g.share)[1][s.start:s.stop]],
                inputs=[], outputs=[], sends_fwd=[], sends_bwd=[],
                optimizer_s=optimizer_time(params, dt, plan.precision, plan.optimizer),
                order=stage_op_order(plan.schedule, si, S, M),
                static_bytes=static.total, act_bytes_per_mb=one_mb.activations, mates=[g.lead])
            row.append(w)
            out.append(w)
        by_stage.append(row)
    fwd: list[Send] = []
    bwd: list[Send] = []
    for si in range(S - 1):
        per_sample = cg.layers[r.stages[si].stop - 1].out_act_bytes
        senders, receivers = by_stage[si], by_stage[si + 1]
        for i, j, common in slice_overlaps([w.share for w in senders], [w.share for w in receivers]):
            a, b = senders[i], receivers[j]
            nbytes = common * per_sample
            a.outputs.append(b.id)
            b.inputs.append(a.id)
            fwd.append(_send(cluster, topo, a.id, b.id, nbytes))
            bwd.append(_send(cluster, topo, b.id, a.id, nbytes))
            a.sends_fwd.append(fwd[-1])
            b.sends_bwd.append(bwd[-1])
    return out, fwd + bwd


def _send(cluster: Cluster, topo: Topology, a: str, b: str, nbytes: float) -> Send:
    path = cluster.path(a, b)
    return Send(b, nbytes, topo.latency_s(a, b), p2p_time(nbytes, path.bandwidth_bytes_per_s, path.latency_s))


# ---- folding ------------------------------------------------------------------------------

def split_chains(plan: Plan) -> Plan:
    """The same plan with every replica cut into its independent chains: devices are
    linked when their slices overlap; a wide replica whose stages split the micro-batch
    alike (shares [1, 1, 1, 1] on every stage) is four one-device pipelines that never
    wait for each other. Each chain keeps its devices, layers and shares, so every cost
    and every gradient group is unchanged; identical chains can then be folded."""
    out = []
    for r in plan.replicas:
        parent: dict[str, str] = {g.lead: g.lead for s in r.stages for g in s.groups}

        def root(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x
        for s, nxt in zip(r.stages, r.stages[1:]):
            for i, j, _ in slice_overlaps([g.share for g in s.groups], [g.share for g in nxt.groups]):
                parent[root(s.groups[i].lead)] = root(nxt.groups[j].lead)
        chains: dict[str, list[Stage]] = {}
        for s in r.stages:
            for g in s.groups:
                stages = chains.setdefault(root(g.lead), [])
                if not stages or stages[-1].start != s.start:
                    stages.append(Stage(s.start, s.stop, [], s.recompute))
                stages[-1].groups.append(g)
        out += [Replica(stages) for stages in chains.values()]
    return replace(plan, replicas=out)


def _replica_key(plan: Plan, ri: int, cluster: Cluster, topo: Topology) -> tuple:
    r = plan.replicas[ri]
    stages = tuple((s.start, s.stop, tuple((cluster.device(g.lead).type, g.share) for g in s.groups))
                   for s in r.stages)
    paths = tuple(tuple((topo.capacity[l], topo.links[l].latency_s) for l in p) for p in _paths(r, topo))
    return stages, paths


def _paths(r, topo: Topology) -> list[list[int]]:
    """Link paths of a replica's sends in a fixed template order (forward, then backward)."""
    fwd, bwd = [], []
    for s, nxt in zip(r.stages, r.stages[1:]):
        for i, j, _ in slice_overlaps([g.share for g in s.groups], [g.share for g in nxt.groups]):
            a, b = s.groups[i].lead, nxt.groups[j].lead
            fwd.append(topo.path(a, b))
            bwd.append(topo.path(b, a))
    return fwd + bwd


@dataclass
class ReplicaClass:
    replicas: list[int]
    """Replica indices; the first is simulated and stands for the others."""
    usages: list[Usage] | None = None
    """Per send template, the representative's link load (contention only)."""


def fold_replicas(plan: Plan, cluster: Cluster, topo: Topology, table: UsageTable, *, contention: bool,
                  collective_usages: list[Usage], enabled: bool = True) -> list[ReplicaClass]:
    groups: dict[tuple, list[int]] = {}
    for ri in range(len(plan.replicas)):
        key = _replica_key(plan, ri, cluster, topo) if enabled else (ri,)
        groups.setdefault(key, []).append(ri)
    classes = [ReplicaClass(v) for v in groups.values()]
    paths = {ri: _paths(plan.replicas[ri], topo) for ri in range(len(plan.replicas))}
    coll: dict[int, list[tuple[int, float]]] = {}
    for u in collective_usages:
        for l, c in u.counts.items():
            coll.setdefault(l, []).append((u.key, c))
    while contention:
        split = False
        owners: dict[int, set[int]] = {}
        for ci, c in enumerate(classes):
            for ri in c.replicas:
                for p in paths[ri]:
                    for l in p:
                        if l != topo.core:
                            owners.setdefault(l, set()).add(ci)
        out: list[ReplicaClass] = []
        for ci, c in enumerate(classes):
            shared = any(len(owners[l]) > 1 for ri in c.replicas for p in paths[ri] for l in p if l != topo.core)
            if len(c.replicas) > 1 and (shared or not _symmetric(c.replicas, paths, topo, coll)):
                out += [ReplicaClass([ri]) for ri in c.replicas]
                split = True
            else:
                out.append(c)
        classes = out
        if not split:
            break
    for c in classes:
        per_t = list(zip(*(paths[ri] for ri in c.replicas)))  # template -> path of each mate
        c.usages = []
        for t, mate_paths in enumerate(per_t):
            cnt = Counter(l for p in mate_paths for l in p)
            rep = mate_paths[0]
            c.usages.append(table.get({l: cnt[l] for l in rep}, f"send r{c.replicas[0]} #{t}", dict(cnt)))
    return classes


def _symmetric(replicas: list[int], paths: dict[int, list[list[int]]], topo: Topology,
               coll: dict[int, list[tuple[int, float]]]) -> bool:
    per_t = list(zip(*(paths[ri] for ri in replicas)))
    counts = [Counter(l for p in mate_paths for l in p) for mate_paths in per_t]
    for k, ri in enumerate(replicas):
        phi: dict[int, int] = {}
        for t, mate_paths in enumerate(per_t):
            mine, theirs = mate_paths[0], mate_paths[k]
            for a, b in zip(mine, theirs):
                if counts[t][a] != counts[t][b] or topo.capacity[a] != topo.capacity[b]:
                    return False
                if phi.setdefault(a, b) != b:
                    return False
                if sorted(coll.get(a, [])) != sorted(coll.get(b, [])):
                    return False
        if len(set(phi.values())) != len(phi):
            return False
    return True
