"""Gradient synchronisation as steps over the real links: ring, hierarchical and sharded
parameter-server all-reduce, and DDP-style gradient buckets.

A collective is a list of synchronous steps. In a step every participating flow moves
its chunk after the step's latency (the slowest link's latency on the way); the step ends
when its last flow has arrived. Steps are built so that, alone on an idle network, they
add up exactly to the formulas in ``hetalloc.costs``:
- ring (devices in cluster order, as ``hetalloc.evaluate.allreduce_time`` orders them):
  n-1 reduce-scatter and n-1 all-gather steps, each hop moving bytes/n;
- hierarchical: g-1 intra-node reduce-scatter steps (bytes/g per hop, g = most group
  devices on a node), 2(K-1) steps of g parallel inter-node rings (bytes/(gK) per hop,
  so a node's NIC carries g hops at once), g-1 intra-node all-gather steps;
- parameter server: a push step and a pull step, each with an on-node and an off-node
  entity (every worker sends bytes/n to each other worker).
Under zero1 a collective is one half of these: the reduce-scatter (``part='rs'``: the
ring's first n-1 steps, the intra-node reduce-scatter and the first K-1 inter-node steps,
the push) before the optimizer step, and the all-gather (``part='ag'``: the rest) after
it; each half alone adds up to half the formula (``hetalloc.costs.zero1_halves``).
A tensor-parallel group's all-reduces (``tp_steps``): k all-reduces of B bytes in all
over a ring of t devices are 2(t-1)k steps that each move B/(tk) per hop after one
latency: ``hetalloc.costs.tp_comm_time`` alone on the links.
Consecutive identical steps may be merged (``max_steps``): a merged step waits the sum
of their latencies, then moves the sum of their bytes — the same total alone, a coarser
interleaving under contention.

Never: time a collective here; timing is the network's (contention) or the shared
formula's (``hetalloc.evaluate.allreduce_time``, without contention).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hetalloc.costgraph import CostGraph
from hetalloc.costs import grad_bytes_per_param

from .links import Topology, Usage, UsageTable, max_min_rates


@dataclass(frozen=True, slots=True)
class Step:
    latency_s: float
    flows: tuple[tuple[Usage, float], ...]
    """(entity, bytes per flow as a fraction of the collective's bytes)."""
    repeat: int
    """Identical steps merged into this one."""
    phase: str


def split_steps(total: int, most: int) -> list[int]:
    """`total` identical steps as at most `most` merged ones (sizes as equal as can be)."""
    if total <= 0:
        return []
    k = min(total, max(1, most))
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


def _phase(name: str, entities: list[tuple[Usage, float]], count: int, most: int, topo: Topology) -> list[Step]:
    lat = max((topo.latency_of(u) for u, _ in entities), default=0.0)
    return [Step(lat * r, tuple((u, f * r) for u, f in entities), r, name) for r in split_steps(count, most)]


def ring_order(topo: Topology, devices: list[str]) -> list[str]:
    order = topo.device_order
    return sorted(devices, key=order.__getitem__)


def _ring_usage(topo: Topology, table: UsageTable, rings: list[list[str]], label: str) -> Usage:
    paths = [topo.path(a, b) for r in rings for a, b in zip(r, r[1:] + r[:1]) if a != b]
    return table.of_paths(paths, label)


def ring_steps(topo: Topology, table: UsageTable, devices: list[str], most: int, part: str = "all") -> list[Step]:
    ring = ring_order(topo, devices)
    n = len(ring)
    if n <= 1:
        return []
    u = _ring_usage(topo, table, [ring], f"ring x{n}")
    half = max(1, most // 2)
    rs = _phase("reduce-scatter", [(u, 1.0 / n)], n - 1, half, topo) if part != "ag" else []
    ag = _phase("all-gather", [(u, 1.0 / n)], n - 1, half, topo) if part != "rs" else []
    return rs + ag


def _by_node(topo: Topology, devices: list[str]) -> dict[str, list[str]]:
    per: dict[str, list[str]] = {}
    for d in ring_order(topo, devices):
        per.setdefault(topo.cluster.device(d).node, []).append(d)
    return per


def hierarchical_steps(topo: Topology, table: UsageTable, devices: list[str], most: int,
                       part: str = "all") -> list[Step]:
    per = _by_node(topo, devices)
    n = len(devices)
    if n <= 1:
        return []
    g, K = max(len(v) for v in per.values()), len(per)
    steps: list[Step] = []
    third = max(1, most // 3)
    intra = [v for v in per.values() if len(v) > 1]
    u_intra = _ring_usage(topo, table, intra, f"intra-node rings x{len(intra)}") if g > 1 else None
    if u_intra is not None and part != "ag":
        steps += _phase("intra reduce-scatter", [(u_intra, 1.0 / g)], g - 1, third, topo)
    if K > 1:
        members = list(per.values())
        rings = [[m[j % len(m)] for m in members] for j in range(g)]
        u = _ring_usage(topo, table, rings, f"inter-node rings {g}x{K}")
        if part == "all":
            steps += _phase("inter all-reduce", [(u, 1.0 / (g * K))], 2 * (K - 1), third, topo)
        else:
            name = "inter reduce-scatter" if part == "rs" else "inter all-gather"
            steps += _phase(name, [(u, 1.0 / (g * K))], K - 1, third, topo)
    if u_intra is not None and part != "rs":
        steps += _phase("intra all-gather", [(u_intra, 1.0 / g)], g - 1, third, topo)
    return steps


def param_server_steps(topo: Topology, table: UsageTable, devices: list[str], most: int,
                       part: str = "all") -> list[Step]:
    per = _by_node(topo, devices)
    n = len(devices)
    if n <= 1:
        return []
    on: Counter = Counter()
    off: Counter = Counter()
    for node, ds in per.items():
        g = len(ds)
        for d in ds:
            on[topo.up[d]] += g - 1
            on[topo.down[d]] += g - 1
            off[topo.up[d]] += n - g
            off[topo.down[d]] += n - g
        if n > g:
            off[topo.nic_up[node]] += g * (n - g)
            off[topo.nic_down[node]] += g * (n - g)
            off[topo.core] += g * (n - g)
    ents = [(table.get(dict(c), label), 1.0 / n) for c, label in ((on, "ps on-node"), (off, "ps off-node"))
            if any(c.values())]
    return ((_phase("push", ents, 1, most, topo) if part != "ag" else [])
            + (_phase("pull", ents, 1, most, topo) if part != "rs" else []))


STEP_BUILDERS = {"ring": ring_steps, "hierarchical": hierarchical_steps, "param_server": param_server_steps}


def alone_time(steps: list[Step], nbytes: float, topo: Topology) -> float:
    """Seconds the steps of a collective of nbytes take alone on idle links, as the
    network plays them (each step: its latency, then its entities' bytes at max-min fair
    rates, re-shared as entities finish)."""
    total = 0.0
    for st in steps:
        total += st.latency_s
        left = {i: f * nbytes for i, (_u, f) in enumerate(st.flows) if f * nbytes > 0 and st.flows[i][0].reduced}
        while left:
            keys = list(left)
            rates = max_min_rates([st.flows[i][0] for i in keys], [1] * len(keys), topo.capacity)
            dt = min(left[i] / r for i, (r, _l) in zip(keys, rates))
            total += dt
            for i, (r, _l) in zip(keys, rates):
                left[i] -= r * dt
                if left[i] <= 1e-9 * nbytes:
                    del left[i]
    return total
def tp_steps(topo: Topology, ring: Usage, tp: int, num_allreduces: int, most: int) -> list[Step]:
    """The tensor-parallel all-reduces of one op over a group's ring (see module doc);
    `ring` is the group's ring as one entity, fractions are of the op's bytes in all."""
    if tp <= 1 or num_allreduces <= 0:
        return []
    return _phase("tp all-reduce", [(ring, 1.0 / (tp * num_allreduces))], 2 * (tp - 1) * num_allreduces, most, topo)


@dataclass(frozen=True, slots=True)
class Bucket:
    """Gradients of layers [start, stop) of one sync group, reduced together; ready when
    the device's last backward has passed layer ``start``."""

    group: int
    start: int
    stop: int
    nbytes: float


def buckets(group_index: int, start: int, stop: int, cg: CostGraph, precision: str,
            bucket_bytes: float) -> list[Bucket]:
    """DDP-style buckets of at most ``bucket_bytes`` in reverse layer order; a layer larger
    than a bucket is split into equal buckets that are all ready with that layer."""
    per_param = grad_bytes_per_param(precision)
    out: list[Bucket] = []
    acc, top = 0.0, stop
    for layer in range(stop - 1, start - 1, -1):
        b = cg.layers[layer].params * per_param
        if b > bucket_bytes:
            if acc > 0:
                out.append(Bucket(group_index, layer + 1, top, acc))
            k = -(-int(b) // int(bucket_bytes))
            out += [Bucket(group_index, layer, layer + 1, b / k)] * k
            acc, top = 0.0, layer
            continue
        if acc + b > bucket_bytes and acc > 0:
            out.append(Bucket(group_index, layer + 1, top, acc))
            acc, top = 0.0, layer + 1
        acc += b
    if acc > 0 or not out:
        out.append(Bucket(group_index, start, top, acc))
    return out
