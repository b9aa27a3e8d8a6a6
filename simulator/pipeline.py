"""What each group of a plan does in a training step, and which replicas are identical.

For every pipeline replica this builds, per group (one device, or t tensor-parallel
devices that run in lockstep and are simulated as one unit), what the shared vocabulary
says it costs: compute time of its layer range for its share with its t and its stage's
recompute choice (``CostGraph.range_time``), its tensor-parallel all-reduces per op
(``CostGraph.tp_allreduces``; priced by ``hetalloc.evaluate.group_tp_times``), the
activation / input-gradient slices each of its ranks sends (``slice_overlaps`` and
``rank_pairs``; the same bytes forward and backward, as the cost prediction assumes), its
optimizer step (``hetalloc.evaluate.optimizer_times``: zero1 steps a shard) and its memory
(``hetalloc.costs.stage_memory`` as ``hetalloc.plan.device_memory`` uses it).

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
representative's. A tensor-parallel group's ring counts as links its replica uses. Where any of this fails the replicas are simulated one by one. Folding
is therefore exact, never an approximation.

Never: invent costs here; every figure comes from hetalloc.costs / hetalloc.costgraph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from hetalloc.catalog import DeviceType
from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.costs import input_time, p2p_time, stage_memory
from hetalloc.evaluate import group_tp_times, optimizer_times, rank_pairs, slice_overlaps
from hetalloc.plan import Plan, Replica, Stage, optimizer_params
from hetalloc.schedule import Op, stage_op_order, warm_backward

from .links import Topology, Usage, UsageTable


@dataclass(slots=True)
class Send:
    src: str
    """The sending device (a rank of the sending group)."""
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
    recv_fwd: list[tuple[str, str]]
    """(source device, own rank device) of every forward slice it waits for."""
    recv_bwd: list[tuple[str, str]]
    """... and of every input-gradient slice (from the next stage)."""
    sends_fwd: list[Send]
    sends_bwd: list[Send]
    optimizer_s: float
    order: list[Op]
    static_bytes: float
    """Weights, gradients, optimizer state and send/receive buffers."""
    act_bytes_per_mb: float
    """Saved activations of one micro-batch (its share)."""
    ranks: list[str] = field(default_factory=list)
    """The group's devices (rank order); ``id`` is rank 0."""
    tp_allreduces: tuple[int, float, int, float] = (0, 0, 0, 0.0)
    """Per op: (all-reduces, bytes in all) forward, then backward (its share; 0 when t = 1)."""
    tp_fwd_s: float = 0.0
    """Seconds of the forward's tensor-parallel all-reduces alone on the link (formula)."""
    tp_bwd_s: float = 0.0
    tp_usage: Usage | None = None
    """The group's ring (with mates' multiplicity): set when simulating contention."""
    mates: list[str] = field(default_factory=list)
    """Devices this one stands for, itself first: its group's ranks, then those of the
    identical groups it represents."""
    bwd_cold_s: float | None = None
    """A backward that does not follow its own forward (``hetalloc.schedule.warm_backward``):
    from cold caches where the profile measured it; None: bwd_s."""
    bwd_cold_layer_s: list[float] | None = None
    """bwd_layer_s of such a backward."""
    data_s: float = 0.0
    """At the start of each step, before its first op: building its inputs or labels
    (``hetalloc.costs.input_time``; first and last stages)."""

    def backward(self, pos: int) -> tuple[float, list[float]]:
        """Seconds of the backward at order[pos], and its layers' (bucket readiness)."""
        if self.bwd_cold_s is None or warm_backward(self.order, pos):
            return self.bwd_s, self.bwd_layer_s
        return self.bwd_cold_s, self.bwd_cold_layer_s or self.bwd_layer_s


def replica_work(plan: Plan, ri: int, cluster: Cluster, cg: CostGraph, topo: Topology,
                 optimizer: tuple[dict[str, float], dict[str, float]] | None = None
                 ) -> tuple[list[DeviceWork], list[Send]]:
    """The work of replica ri's groups, and its sends in template order (all forward
    sends, then all backward ones, stage pair by stage pair, as ``_paths`` lists them).
    `optimizer`: ``optimizer_work(plan, ...)``, when the caller has it already."""
    r = plan.replicas[ri]
    S, M = len(r.stages), plan.num_microbatches
    out: list[DeviceWork] = []
    by_stage: list[list[DeviceWork]] = []
    opt_s, opt_n = optimizer or optimizer_work(plan, cluster, cg)
    for si, s in enumerate(r.stages):
        outb = cg.layers[s.stop - 1].out_act_bytes
        row = []
        for g in s.groups:
            dt = cluster.dtype(g.lead)
            params = cg.range_params(s.start, s.stop, g.tp)
            saved = cg.range_saved_bytes(s.start, s.stop, g.tp, s.recompute)
            working = cg.range_working_bytes(s.start, s.stop, g.tp, s.recompute)
            f, b = cg.range_time(s.start, s.stop, dt, g.share, g.tp, s.recompute)
            static = stage_memory(params, saved, outb, g.share, 0, plan.precision, plan.optimizer,
                                  optimizer_params=opt_n.get(g.lead), working_act_bytes_per_sample=working)
            lf, lb = cg.layer_times(dt, g.share, g.tp)
            bwd_layers = [float(lb[i]) + (float(lf[i]) if s.recompute == "full" and cg.layers[i].checkpoint_bytes > 0
                                          else 0.0) for i in range(s.start, s.stop)]
            bc = cg.range_time(s.start, s.stop, dt, g.share, g.tp, s.recompute, cold=True)[1]
            lbc = cg.layer_times(dt, g.share, g.tp, cold=True)[1]
            cold_layers = [x - float(lb[i]) + float(lbc[i]) for i, x in zip(range(s.start, s.stop), bwd_layers)]
            nf, bf, nb, bb = cg.tp_allreduces(s.start, s.stop, s.recompute) if g.tp > 1 else (0, 0.0, 0, 0.0)
            tf, tb = group_tp_times(cluster, cg, g, s.start, s.stop, s.recompute)
            w = DeviceWork(
                id=g.lead, replica=ri, stage=si, num_stages=S, start=s.start, stop=s.stop, share=g.share,
                dtype=dt, fwd_s=f, bwd_s=b, bwd_layer_s=bwd_layers,
                recv_fwd=[], recv_bwd=[], sends_fwd=[], sends_bwd=[],
                optimizer_s=opt_s[g.lead],
                order=stage_op_order(plan.schedule, si, S, M),
                static_bytes=static.total, act_bytes_per_mb=saved * g.share, ranks=list(g.devices),
                tp_allreduces=(nf, bf * g.share, nb, bb * g.share), tp_fwd_s=tf, tp_bwd_s=tb,
                mates=list(g.devices), bwd_cold_s=bc if bc != b else None,
                bwd_cold_layer_s=cold_layers if bc != b else None,
                data_s=input_time(g.share * M, dt) if si in (0, S - 1) else 0.0)
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
            for src, dst in rank_pairs(a.ranks, b.ranks):
                fwd.append(_send(cluster, topo, src, dst, nbytes))
                a.sends_fwd.append(fwd[-1])
                b.recv_fwd.append((src, dst))
            for src, dst in rank_pairs(b.ranks, a.ranks):
                bwd.append(_send(cluster, topo, src, dst, nbytes))
                b.sends_bwd.append(bwd[-1])
                a.recv_bwd.append((src, dst))
    return out, fwd + bwd


def optimizer_work(plan: Plan, cluster: Cluster, cg: CostGraph) -> tuple[dict[str, float], dict[str, float]]:
    """Per device: its optimizer step's seconds, and (zero1 only) the parameters whose state
    it keeps; they depend on the whole plan (who else holds the same layers)."""
    return (optimizer_times(plan, cluster, cg),
            optimizer_params(plan, cg) if plan.optimizer_sharding != "none" else {})


def _send(cluster: Cluster, topo: Topology, a: str, b: str, nbytes: float) -> Send:
    path = cluster.path(a, b)
    return Send(a, b, nbytes, topo.latency_s(a, b), p2p_time(nbytes, path.bandwidth_bytes_per_s, path.latency_s))


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
    stages = tuple((s.start, s.stop, s.recompute, tuple((cluster.device(g.lead).type, g.tp, g.share) for g in s.groups))
                   for s in r.stages)
    paths = tuple(tuple((topo.capacity[l], topo.links[l].latency_s) for l in p)
                  for p in _paths(r, topo) + _tp_paths(r, topo))
    return stages, paths


def _paths(r, topo: Topology) -> list[list[int]]:
    """Link paths of a replica's sends in a fixed template order (forward, then backward)."""
    fwd, bwd = [], []
    for s, nxt in zip(r.stages, r.stages[1:]):
        for i, j, _ in slice_overlaps([g.share for g in s.groups], [g.share for g in nxt.groups]):
            ga, gb = s.groups[i], nxt.groups[j]
            fwd += [topo.path(a, b) for a, b in rank_pairs(ga.devices, gb.devices)]
            bwd += [topo.path(a, b) for a, b in rank_pairs(gb.devices, ga.devices)]
    return fwd + bwd


def _tp_rings(r) -> list[list[tuple[str, str]]]:
    """The hops of each tensor-parallel group's ring (groups with t > 1, in stage order)."""
    return [list(zip(g.devices, g.devices[1:] + g.devices[:1])) for s in r.stages for g in s.groups if g.tp > 1]


def _tp_paths(r, topo: Topology) -> list[list[int]]:
    """Link paths of every hop of every tensor-parallel ring, in ``_tp_rings`` order."""
    return [topo.path(a, b) for ring in _tp_rings(r) for a, b in ring]


@dataclass
class ReplicaClass:
    replicas: list[int]
    """Replica indices; the first is simulated and stands for the others."""
    usages: list[Usage] | None = None
    """Per send template, the representative's link load (contention only)."""
    tp_usages: list[Usage] | None = None
    """Per tensor-parallel group template, the representative's ring (contention only)."""


def fold_replicas(plan: Plan, cluster: Cluster, topo: Topology, table: UsageTable, *, contention: bool,
                  collective_usages: list[Usage], enabled: bool = True) -> list[ReplicaClass]:
    groups: dict[tuple, list[int]] = {}
    for ri in range(len(plan.replicas)):
        key = _replica_key(plan, ri, cluster, topo) if enabled else (ri,)
        groups.setdefault(key, []).append(ri)
    classes = [ReplicaClass(v) for v in groups.values()]
    sends = {ri: _paths(plan.replicas[ri], topo) for ri in range(len(plan.replicas))}
    # the tensor-parallel rings count as links a replica uses when deciding what may fold
    paths = {ri: sends[ri] + _tp_paths(plan.replicas[ri], topo) for ri in range(len(plan.replicas))}
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
        per_t = list(zip(*(sends[ri] for ri in c.replicas)))  # template -> path of each mate
        c.usages = []
        for t, mate_paths in enumerate(per_t):
            cnt = Counter(l for p in mate_paths for l in p)
            rep = mate_paths[0]
            c.usages.append(table.get({l: cnt[l] for l in rep}, f"send r{c.replicas[0]} #{t}", dict(cnt)))
        c.tp_usages = []
        rings = {ri: _tp_rings(plan.replicas[ri]) for ri in c.replicas}
        for t in range(len(rings[c.replicas[0]])):
            mate_hops = [[topo.path(a, b) for a, b in rings[ri][t]] for ri in c.replicas]
            cnt = Counter(l for hops in mate_hops for p in hops for l in p)
            rep_links = Counter(l for p in mate_hops[0] for l in p)
            n = len(rings[c.replicas[0]][t])
            c.tp_usages.append(table.get({l: cnt[l] for l in rep_links}, f"tp ring x{n} r{c.replicas[0]} #{t}",
                                         dict(cnt)))
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
