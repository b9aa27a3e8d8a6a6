"""Physical links of a cluster as shared resources, and fair sharing of their bandwidth.

Links are the directed edges of ``Cluster.graph`` (read by ``Topology``, not restated) —
a device's edge to its node switch in each direction (the node's intra link), a node
switch's edge to the fabric in each direction (its NIC) — plus the fabric core, whose
capacity is the sum of the NIC bandwidths divided by the fabric's oversubscription. A
transfer from device a to device b crosses a's up edge, [a's NIC up, the core, b's NIC
down,] b's down edge.

A *flow entity* moves the same number of bytes on each of several parallel flows that
advance at one common rate: a point-to-point send is one flow; a step of a ring
all-reduce is one entity whose flows are the ring's hops (NCCL pipelines a ring, so
every hop runs at the pace of the slowest). ``Usage`` says how many of an entity's flows
cross each link. Rates are max-min fair *per flow* (progressive filling): every link's
capacity is split equally among the flows crossing it, a flow limited elsewhere leaves
its unused part to the others, and rates are recomputed whenever an entity starts or
ends (processor sharing, not first-come serialisation). A flow alone on its path gets
the path's bottleneck bandwidth, so a lone send takes exactly ``hetalloc.costs.p2p_time``
(the caller waits the path latency, then the fluid transfer runs).

This module must never price anything by itself: it only shares capacities.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import simpy

from hetalloc.cluster import Cluster

FABRIC = "fabric core"


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    kind: str
    """intra-up | intra-down | nic-up | nic-down | fabric"""
    capacity_bytes_per_s: float
    latency_s: float


class Topology:
    """Link ids of a cluster, and the links a transfer between two devices crosses.

    Derived from ``Cluster.graph``, a tree rooted at the fabric: each edge is two links,
    one per direction ("up" is towards the fabric), and a vertex of kind ``fabric`` adds
    its core (capacity: the sum of its edges' bandwidths over its ``oversubscription``).
    A transfer climbs from its source to the lowest vertex it shares with its
    destination, crosses that vertex's core if it has one, and descends; so a fabric
    level added to the cluster's graph reaches the simulator with no change here.
    ``up``/``down`` (per device), ``nic_up``/``nic_down`` (per node: its switch's edge)
    and ``core`` (the top fabric's) name the links collectives count by hand."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.links: list[Link] = []
        self.parent: dict[str, str] = {}
        self.depth: dict[str, int] = {}
        self.up_of: dict[str, int] = {}
        """vertex -> the link from it to its parent (and down_of: back)."""
        self.down_of: dict[str, int] = {}
        self.core_of: dict[str, int] = {}
        g = cluster.graph
        roots = [v for kind in ("fabric", "switch") for v, k in g.nodes(data="kind") if k == kind]
        for root in roots:
            if root in self.depth:
                continue
            self.depth[root] = 0
            for v, p in nx.dfs_predecessors(g, root).items():
                self.parent[v] = p
            for v in nx.dfs_preorder_nodes(g, root):
                if v != root:
                    self.depth[v] = self.depth[self.parent[v]] + 1
            for v in nx.dfs_postorder_nodes(g, root):  # children's links first, as a tree is read
                if v != root:
                    self._add_edge(g, v, self.parent[v])
                if g.nodes[v]["kind"] == "fabric" and any(self.parent.get(c) == v for c in g[v]):
                    total = sum(g.edges[v, c]["bandwidth"] for c in g[v] if self.parent.get(c) == v)
                    name = FABRIC if v == "fabric" else f"{v} core"
                    self.core_of[v] = self._add(Link(name, "fabric", total / g.nodes[v].get("oversubscription", 1.0),
                                                     0.0))
        self.up = {d.id: self.up_of[d.id] for d in cluster.devices}
        self.down = {d.id: self.down_of[d.id] for d in cluster.devices}
        self.nic_up = {n.name: self.up_of[f"switch:{n.name}"] for n in cluster.nodes if f"switch:{n.name}" in self.up_of}
        self.nic_down = {n: self.down_of[f"switch:{n}"] for n in self.nic_up}
        self.core: int | None = self.core_of.get("fabric")
        self.device_order = {d.id: i for i, d in enumerate(cluster.devices)}
        self.capacity = [l.capacity_bytes_per_s for l in self.links]

    def _add_edge(self, g: nx.Graph, v: str, parent: str) -> None:
        e = g.edges[v, parent]
        kind = e["kind"]
        who = v if kind == "intra" else f"{g.nodes[v].get('node', v)} {kind}"
        self.up_of[v] = self._add(Link(f"{who} up", f"{kind}-up", e["bandwidth"], e["latency"]))
        self.down_of[v] = self._add(Link(f"{who} down", f"{kind}-down", e["bandwidth"], e["latency"]))

    def _add(self, link: Link) -> int:
        self.links.append(link)
        return len(self.links) - 1

    def path(self, a: str, b: str) -> list[int]:
        """Link ids from device a to device b (empty when a == b)."""
        if a == b:
            return []
        up: list[int] = []
        down: list[int] = []
        while self.depth[a] > self.depth[b]:
            up.append(self.up_of[a])
            a = self.parent[a]
        while self.depth[b] > self.depth[a]:
            down.append(self.down_of[b])
            b = self.parent[b]
        while a != b:
            up.append(self.up_of[a])
            down.append(self.down_of[b])
            a, b = self.parent[a], self.parent[b]
        if a in self.core_of:
            up.append(self.core_of[a])
        return up + down[::-1]

    def latency_s(self, a: str, b: str) -> float:
        """Latency of the slowest hop, as ``Cluster.path`` defines a path's latency."""
        return max((self.links[l].latency_s for l in self.path(a, b)), default=0.0)

    def latency_of(self, usage: "Usage") -> float:
        """The slowest hop among all links an entity crosses."""
        return max((self.links[l].latency_s for l in usage.counts), default=0.0)

    def bottleneck(self, links: list[int] | dict[int, float]) -> int:
        """The link of least capacity per flow (ties: the first)."""
        counts = links if isinstance(links, dict) else Counter(links)
        return min(counts, key=lambda l: (self.capacity[l] / counts[l], l))


class Usage:
    """How many flows of an entity cross each link (``counts``, used for rates), and the
    physical footprint it stands for (``footprint``, used for link statistics: a folded
    replica's send also stands for its identical mates' sends)."""

    __slots__ = ("key", "counts", "footprint", "label", "reduced")

    def __init__(self, key: int, counts: dict[int, float], footprint: dict[int, float], label: str):
        self.key = key
        self.counts = counts
        self.footprint = footprint
        self.label = label
        self.reduced = counts
        """``counts`` without redundant constraints (see UsageTable.reduce)."""


class UsageTable:
    """Interns usages so that equal link loads share one key (the rate cache relies on it)."""

    def __init__(self) -> None:
        self._by_counts: dict[tuple, Usage] = {}
        self.all: list[Usage] = []

    def get(self, counts: dict[int, float], label: str = "", footprint: dict[int, float] | None = None) -> Usage:
        counts = {l: c for l, c in counts.items() if c > 0}
        fp = counts if footprint is None else footprint
        key = (tuple(sorted(counts.items())), tuple(sorted(fp.items())) if footprint is not None else None)
        hit = self._by_counts.get(key)
        if hit is None:
            hit = Usage(len(self.all), counts, fp, label)
            self._by_counts[key] = hit
            self.all.append(hit)
        return hit

    def reduce(self, capacity: list[float]) -> None:
        """Drop redundant link constraints before a run: links that carry the same usages
        with the same counts and have the same capacity saturate together, so one of them
        stands for all (a ring over 512 nodes loads 512 NICs alike: one constraint per
        NIC kind instead of 512). Exact; the kept link is the one reported as bottleneck."""
        users: dict[int, list[tuple[int, float]]] = {}
        for u in self.all:
            for l, c in u.counts.items():
                users.setdefault(l, []).append((u.key, c))
        keep: dict[tuple, int] = {}
        for l in sorted(users):
            keep.setdefault((capacity[l], tuple(users[l])), l)
        kept = set(keep.values())
        for u in self.all:
            u.reduced = {l: c for l, c in u.counts.items() if l in kept}

    def of_paths(self, paths: list[list[int]], label: str = "") -> Usage:
        """One entity whose flows follow the given paths."""
        c: Counter = Counter()
        for p in paths:
            c.update(p)
        return self.get(dict(c), label)


def max_min_rates(usages: list[Usage], mults: list[int], capacity: list[float]) -> list[tuple[float, int]]:
    """Per-flow max-min fair rates by progressive filling. Entity e has ``mults[e]``
    identical copies. Returns (rate per flow in bytes/s, bottleneck link id) per entity.

    Links are visited in order of their fair level (residual capacity / unfrozen flows)
    from a heap; freezing flows only raises the level of the other links they cross, so
    stale heap entries are re-pushed when popped: O((links + loads) log links)."""
    load: dict[int, float] = {}
    users: dict[int, list[int]] = {}
    for e, (u, m) in enumerate(zip(usages, mults)):
        for l, c in u.reduced.items():
            load[l] = load.get(l, 0.0) + c * m
            users.setdefault(l, []).append(e)
    residual = {l: capacity[l] for l in load}
    heap = [(residual[l] / ld, l) for l, ld in load.items()]
    heapq.heapify(heap)
    out: list[tuple[float, int] | None] = [None] * len(usages)
    while heap:
        level, l = heapq.heappop(heap)
        ld = load[l]
        if ld <= 1e-12:
            continue
        current = max(residual[l], 0.0) / ld
        if current > level * (1 + 1e-12):
            heapq.heappush(heap, (current, l))
            continue
        for e in users[l]:
            if out[e] is not None:
                continue
            out[e] = (current, l)
            m = mults[e]
            for l2, c in usages[e].reduced.items():
                load[l2] -= c * m
                residual[l2] -= c * m * current
    return [o if o is not None else (math.inf, -1) for o in out]


@dataclass(eq=False, slots=True)
class _Flow:
    usage: Usage
    total: float
    done: simpy.Event
    start: float
    remaining: float = 0.0
    """Bytes left at ``since``."""
    since: float = 0.0
    rate: float = 0.0
    bottleneck: int = -1
    finish: float = math.inf


@dataclass
class LinkLog:
    """What crossed the links: per usage, bytes per flow and active intervals; per
    usage and bottleneck link, the seconds it was held to that link's pace."""

    bytes_per_flow: dict[int, float] = field(default_factory=dict)
    intervals: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    bottleneck_s: dict[tuple[int, int], float] = field(default_factory=dict)

    def record(self, usage: Usage, t0: float, t1: float, nbytes: float) -> None:
        self.bytes_per_flow[usage.key] = self.bytes_per_flow.get(usage.key, 0.0) + nbytes
        self.intervals.setdefault(usage.key, []).append((t0, t1))


class Network:
    """Fluid model of the links: ``transfer`` returns an event that fires when the bytes
    have crossed.

    A flow whose links carry no other flow starts (or ends) without touching anyone
    else's rate; otherwise all rates are re-solved. Solutions are cached per set of
    active usages (equal sets recur: every step of a ring loads the same links), so a
    long collective costs few solves. Completions come from a heap of finish times."""

    def __init__(self, env: simpy.Environment, topo: Topology, log: LinkLog):
        self.env = env
        self.topo = topo
        self.log = log
        self.active: dict[_Flow, None] = {}
        self._users: dict[int, int] = {}
        self._heap: list[tuple[float, int, _Flow]] = []
        self._seq = 0
        self._gen = 0
        self._armed = math.inf
        self._cache: dict[tuple, dict[int, tuple[float, int]]] = {}
        self._solo: dict[int, tuple[float, int]] = {}
        self.solves = 0

    def transfer(self, usage: Usage, nbytes: float) -> simpy.Event:
        ev = self.env.event()
        if nbytes <= 0 or not usage.reduced:  # nothing to move, or nothing to cross
            ev.succeed()
            return ev
        now = self.env.now
        f = _Flow(usage, nbytes, ev, now, nbytes, now)
        alone = True
        for l in usage.reduced:
            n = self._users.get(l, 0)
            alone = alone and n == 0
            self._users[l] = n + 1
        self.active[f] = None
        if alone:  # nobody else's rate changes
            self._set_rate(f, *self._solo_rate(usage), now)
            self._push(f)
            self._arm(now)
        else:
            self._resolve(now)
        return ev

    def _solo_rate(self, usage: Usage) -> tuple[float, int]:
        hit = self._solo.get(usage.key)
        if hit is None:
            l = self.topo.bottleneck(usage.reduced)
            hit = self._solo[usage.key] = (self.topo.capacity[l] / usage.reduced[l], l)
        return hit

    def _set_rate(self, f: _Flow, rate: float, bottleneck: int, now: float) -> None:
        if f.rate > 0:
            f.remaining -= f.rate * (now - f.since)
            key = (f.usage.key, f.bottleneck)
            self.log.bottleneck_s[key] = self.log.bottleneck_s.get(key, 0.0) + now - f.since
        f.since, f.rate, f.bottleneck = now, rate, bottleneck
        f.finish = now + max(f.remaining, 0.0) / rate

    def _push(self, f: _Flow) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (f.finish, self._seq, f))

    def _resolve(self, now: float) -> None:
        """Re-solve every active flow's rate and rebuild the completion heap."""
        mult = Counter(f.usage.key for f in self.active)
        key = tuple(sorted(mult.items()))
        rates = self._cache.get(key)
        if rates is None:
            by_key = {f.usage.key: f.usage for f in self.active}
            keys = [k for k, _ in key]
            rates = dict(zip(keys, max_min_rates([by_key[k] for k in keys], [m for _, m in key],
                                                 self.topo.capacity)))
            self._cache[key] = rates
            self.solves += 1
        self._heap = []
        for f in self.active:
            r, l = rates[f.usage.key]
            if r != f.rate or l != f.bottleneck:
                self._set_rate(f, r, l, now)
            self._seq += 1
            self._heap.append((f.finish, self._seq, f))
        heapq.heapify(self._heap)
        self._armed = math.inf  # pending wakes may now be too late or too early
        self._arm(now)

    def _arm(self, now: float) -> None:
        while self._heap and self._heap[0][2].finish != self._heap[0][0]:
            heapq.heappop(self._heap)  # an entry from before a rate change
        if not self._heap or self._heap[0][0] >= self._armed:
            return
        self._armed = t = self._heap[0][0]
        self._gen += 1
        gen = self._gen
        self.env.timeout(max(t - now, 0.0)).callbacks.append(lambda _ev: self._wake(gen))

    def _wake(self, gen: int) -> None:
        if gen != self._gen:
            return  # superseded by an earlier completion or a re-solve
        self._armed = math.inf
        now = self.env.now
        shared = False
        tol = 1e-12 * max(1.0, now)
        while self._heap and self._heap[0][0] <= now + tol:
            fin, _, f = heapq.heappop(self._heap)
            if f.finish != fin or f not in self.active:
                continue
            del self.active[f]
            for l in f.usage.reduced:
                n = self._users[l] - 1
                self._users[l] = n
                shared = shared or n > 0
            self._set_rate(f, f.rate, f.bottleneck, now)  # books its last bottleneck time
            self.log.record(f.usage, f.start, now, f.total)
            f.done.succeed()
        if shared:
            self._resolve(now)
        else:
            self._arm(now)
