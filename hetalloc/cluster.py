"""Cluster spec: nodes, devices, links and the topology graph.

A cluster file is YAML written by people; every problem in it is reported as
``file: field.path: what is wrong — how to fix it``. Devices get stable ids
``<node>/<local index>``. The topology is a networkx graph (device — node switch —
fabric switch); the bandwidth of a path is that of its slowest link and its latency
that of its slowest hop. Oversubscription of the fabric matters only under contention
(the simulator models it); a single flow sees the bottleneck of its own path.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import yaml

from .catalog import DEVICE_TYPES, LINK_TYPES, DeviceType, suggest_device, suggest_link
from .collectives import MeasuredCollective, parse_collectives
from .errors import SpecError
from .fileio import read_text


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """A link's figures: bandwidth per direction (bytes/s) and latency (s)."""

    bandwidth_bytes_per_s: float
    latency_s: float
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.name:
            d["name"] = self.name
        d["bandwidth_gbps"] = _num(self.bandwidth_bytes_per_s / 1e9)
        d["latency_us"] = _num(self.latency_s * 1e6)
        return d


def _num(x: float) -> float:
    """Figures as floats rounded to 12 significant digits, so specs round-trip exactly."""
    return float(f"{x:.12g}")


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    type: str
    node: str
    local_index: int


def type_counts(devices: list[Device]) -> dict[str, int]:
    """Devices per type, in order of first appearance."""
    return dict(Counter(d.type for d in devices))


@dataclass(slots=True)
class Node:
    name: str
    devices: list[Device]
    intra: LinkSpec
    nic: LinkSpec | None
    compute_slots: int = 0
    """Devices whose compute can run at once (CPU cores for CPU ranks, GPUs for processes
    that time-slice them); 0: one per device (nothing shared)."""
    share_efficiency: float = 1.0
    """On a node that shares its compute slots: the fraction of a slot's speed the devices
    get while more of them compute than it has slots (what the operating system's
    switching between processes, their caches and their communication threads take).
    Fitted by the profile to a run of all its ranks at once (workflows.hostfit); 1:
    unmeasured."""

    @property
    def shares_compute(self) -> bool:
        """More devices than compute slots: their compute is shared (processor sharing)."""
        return 0 < self.compute_slots < len(self.devices)

    def type_counts(self) -> dict[str, int]:
        """Devices per type, in order of first appearance."""
        return type_counts(self.devices)

    def signature(self) -> tuple:
        """Nodes with equal signatures are interchangeable."""
        nic = (self.nic.bandwidth_bytes_per_s, self.nic.latency_s) if self.nic else None
        return (
            tuple(sorted(self.type_counts().items())),
            (self.intra.bandwidth_bytes_per_s, self.intra.latency_s),
            nic,
            self.compute_slots,
            self.share_efficiency,
        )


@dataclass
class Cluster:
    name: str
    nodes: list[Node]
    device_types: dict[str, DeviceType]
    fabric_oversubscription: float = 1.0
    source: str = "<cluster>"
    collectives: tuple[MeasuredCollective, ...] = ()
    """Measured collective times (``hetalloc profile``); empty: the analytic formulas."""
    _path_cache: dict = field(default_factory=dict, repr=False)

    # ---- lookup -------------------------------------------------------------------
    @cached_property
    def devices(self) -> list[Device]:
        return [d for n in self.nodes for d in n.devices]

    @cached_property
    def device_by_id(self) -> dict[str, Device]:
        return {d.id: d for d in self.devices}

    @cached_property
    def device_index(self) -> dict[str, int]:
        """Device id -> position in cluster order."""
        return {d.id: i for i, d in enumerate(self.devices)}

    @cached_property
    def node_by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def device(self, device_id: str) -> Device:
        try:
            return self.device_by_id[device_id]
        except KeyError:
            raise KeyError(f"device '{device_id}' is not in cluster '{self.name}'") from None

    def dtype(self, device_id: str) -> DeviceType:
        return self.device_types[self.device(device_id).type]

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def type_counts(self) -> dict[str, int]:
        """Devices per type, in order of first appearance."""
        return type_counts(self.devices)

    def total_peak_flops(self) -> float:
        return sum(self.device_types[d.type].peak_flops for d in self.devices)

    # ---- topology -----------------------------------------------------------------
    @cached_property
    def graph(self) -> nx.Graph:
        """Devices, one switch per node, one fabric switch (with its oversubscription); edges
        carry bandwidth, latency, kind (intra, nic) and the link's name. The simulator's
        links are read from this graph (simulator.links.Topology)."""
        g = nx.Graph()
        g.add_node("fabric", kind="fabric", oversubscription=self.fabric_oversubscription)
        for n in self.nodes:
            sw = f"switch:{n.name}"
            g.add_node(sw, kind="switch", node=n.name)
            for d in n.devices:
                g.add_node(d.id, kind="device", node=n.name, type=d.type)
                g.add_edge(d.id, sw, bandwidth=n.intra.bandwidth_bytes_per_s,
                           latency=n.intra.latency_s, kind="intra", name=n.intra.name)
            if n.nic is not None:
                g.add_edge(sw, "fabric", bandwidth=n.nic.bandwidth_bytes_per_s,
                           latency=n.nic.latency_s, kind="nic", name=n.nic.name)
        return g

    def path(self, a: str, b: str) -> LinkSpec:
        """Bottleneck bandwidth and slowest-hop latency from device a to device b."""
        if a == b:
            return LinkSpec(math.inf, 0.0, "self")
        return self.node_path(self.device(a).node, self.device(b).node)

    def node_path(self, na: str, nb: str) -> LinkSpec:
        """Path between two distinct devices on nodes na and nb (na == nb: inside a node).
        Inside a node, and between two nodes on the one fabric switch, the path's links
        are known without a search (device - switch - fabric - switch - device): the
        graph is built only for other topologies."""
        key = (na, nb)
        hit = self._path_cache.get(key)
        if hit is None:
            a, b = self.node_by_name[na], self.node_by_name[nb]
            if na == nb:
                hops = [(a.intra, "intra")] * 2
            elif a.nic is not None and b.nic is not None:  # both on the one fabric switch
                hops = [(a.intra, "intra"), (a.nic, "nic"), (b.nic, "nic"), (b.intra, "intra")]
            else:
                g = self.graph
                sp = nx.shortest_path(g, f"switch:{na}", f"switch:{nb}")
                edges = [(a.devices[0].id, f"switch:{na}"), *zip(sp[:-1], sp[1:]), (f"switch:{nb}", b.devices[0].id)]
                hops = [(LinkSpec(g.edges[e]["bandwidth"], g.edges[e]["latency"], g.edges[e]["name"]),
                         g.edges[e]["kind"]) for e in edges]
            bw = min(h.bandwidth_bytes_per_s for h, _ in hops)
            lat = max(h.latency_s for h, _ in hops)
            names = sorted({h.name or kind for h, kind in hops})
            hit = LinkSpec(bw, lat, "+".join(names))
            self._path_cache[key] = hit
        return hit

    @cached_property
    def links(self) -> "NodeLinks":
        """The path figures as arrays indexed by device and node (vectorised all-reduces)."""
        return NodeLinks.of(self)

    # ---- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Normalised spec (one entry per node, links spelled out); loads back identically."""
        custom = [
            {"name": t.name, "vendor": t.vendor, "peak_tflops": _num(t.peak_tflops),
             "memory_gib": _num(t.memory_gib), "mem_bandwidth_gbps": _num(t.mem_bandwidth_gbps),
             "cost_per_hour_usd": _num(t.cost_per_hour_usd),
             **{k: _num(getattr(t, k)) for k in MEASURED_TYPE_FIELDS if getattr(t, k)},
             **({"compute_quantiles": [_num(x) for x in t.compute_quantiles]} if t.compute_quantiles else {})}
            for name, t in sorted(self.device_types.items())
            if DEVICE_TYPES.get(name) != t and any(d.type == name for d in self.devices)
        ]
        out: dict[str, Any] = {"name": self.name}
        if custom:
            out["device_types"] = custom
        out["fabric"] = {"oversubscription": _num(self.fabric_oversubscription)}
        nodes = []
        for n in self.nodes:
            nd: dict[str, Any] = {"name": n.name,
                                  "gpus": [{"type": t, "count": c, **({"at": at} if at is not None else {})}
                                           for t, c, at in _ordered_counts(n)],
                                  "intra_link": n.intra.to_dict()}
            if n.nic is not None:
                nd["nic"] = n.nic.to_dict()
            if n.compute_slots:
                nd["compute_slots"] = n.compute_slots
            if n.share_efficiency != 1.0:
                nd["compute_share_efficiency"] = n.share_efficiency
            nodes.append(nd)
        out["nodes"] = nodes
        if self.collectives:
            out["collectives"] = [c.to_dict() for c in self.collectives]
        return out

    def fingerprint(self) -> str:
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        """Computed once, like the other derived views: a Cluster is not changed after it is
        built (scenarios build new ones)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> str:
        counts = ", ".join(f"{c}x{t}" for t, c in sorted(self.type_counts().items()))
        return f"{self.name}: {self.num_devices} devices ({counts}) on {len(self.nodes)} nodes"


@dataclass(eq=False)
class NodeLinks:
    """``Cluster.node_path`` as arrays, for computing over many devices at once: nodes
    with the same intra link and NIC form a link class; the path between two distinct
    nodes depends only on their classes (``pair_*``), the path inside a node on its class
    (``intra_*``)."""

    node_of: np.ndarray
    """Device index (cluster order) -> node index."""
    class_of: np.ndarray
    """Node index -> link class."""
    intra_bw: np.ndarray
    intra_lat: np.ndarray
    pair_bw: np.ndarray
    """[class a, class b]: bandwidth between a node of class a and another of class b."""
    pair_lat: np.ndarray
    node_of_id: dict[str, int] = field(default_factory=dict)
    """Device id -> node index."""

    @staticmethod
    def of(cluster: "Cluster") -> "NodeLinks":
        by_key: dict[tuple, int] = {}
        members: list[list[int]] = []
        class_of = np.empty(len(cluster.nodes), dtype=np.int64)
        searched = len(cluster.nodes) > 1 and any(n.nic is None for n in cluster.nodes)
        for i, n in enumerate(cluster.nodes):
            nic = (n.nic.bandwidth_bytes_per_s, n.nic.latency_s) if n.nic is not None else None
            key = (i,) if searched else (n.intra.bandwidth_bytes_per_s, n.intra.latency_s, nic)
            c = by_key.setdefault(key, len(by_key))
            if c == len(members):
                members.append([])
            members[c].append(i)
            class_of[i] = c
        C = len(members)
        names = [n.name for n in cluster.nodes]
        intra = [cluster.node_path(names[m[0]], names[m[0]]) for m in members]
        pair_bw = np.full((C, C), np.nan)
        pair_lat = np.full((C, C), np.nan)
        for a in range(C):
            for b in range(C):
                na = members[a][0]
                nb = members[b][0] if a != b else (members[b][1] if len(members[b]) > 1 else None)
                if nb is not None:
                    link = cluster.node_path(names[na], names[nb])
                    pair_bw[a, b], pair_lat[a, b] = link.bandwidth_bytes_per_s, link.latency_s
        node_index = {n.name: i for i, n in enumerate(cluster.nodes)}
        node_of = np.fromiter((node_index[d.node] for d in cluster.devices), dtype=np.int64,
                              count=len(cluster.devices))
        return NodeLinks(node_of, class_of, np.array([x.bandwidth_bytes_per_s for x in intra]),
                         np.array([x.latency_s for x in intra]), pair_bw, pair_lat,
                         {d.id: node_index[d.node] for d in cluster.devices})

    def hops(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bandwidth and latency of the paths from device index a[i] to b[i] (distinct devices)."""
        na, nb = self.node_of[a], self.node_of[b]
        ca, cb = self.class_of[na], self.class_of[nb]
        same = na == nb
        return (np.where(same, self.intra_bw[ca], self.pair_bw[ca, cb]),
                np.where(same, self.intra_lat[ca], self.pair_lat[ca, cb]))


def _ordered_counts(n: Node) -> list[tuple[str, int, int | None]]:
    """Runs of devices of one type with consecutive local indices: (type, count, local
    index of the first when the indices skip some (a device gone), else None)."""
    out: list[tuple[str, int, int | None]] = []
    nxt = 0
    for d in n.devices:
        if out and out[-1][0] == d.type and d.local_index == nxt:
            out[-1] = (d.type, out[-1][1] + 1, out[-1][2])
        else:
            out.append((d.type, 1, d.local_index if d.local_index != nxt else None))
        nxt = d.local_index + 1
    return out


# ---- loading and validation -----------------------------------------------------------

_TOP_KEYS = {"name", "nodes", "fabric", "device_types", "prices", "collectives"}
_NODE_KEYS = {"name", "count", "gpus", "intra_link", "nic", "nics", "compute_slots", "compute_share_efficiency"}
MEASURED_TYPE_FIELDS = ("op_overhead_us", "op_compute_us", "compute_noise", "collective_extra_us", "step_overhead_us",
                        "data_us", "data_sample_us",
                        "interference_collective", "interference_p2p", "comm_slowdown_collective", "comm_slowdown_p2p")
"""Device-type figures only a profile measures (written when non-zero)."""
_LINK_KEYS = {"name", "bandwidth_gbps", "latency_us", "like"}
_DTYPE_KEYS = {"name", "vendor", "peak_tflops", "memory_gib", "mem_bandwidth_gbps",
               "cost_per_hour_usd", "like", "compute_quantiles", *MEASURED_TYPE_FIELDS}


class _Checker:
    """Validation helpers bound to one source file."""

    def __init__(self, source: str):
        self.source = source

    def err(self, path: str, problem: str, fix: str = "") -> SpecError:
        return SpecError(self.source, path, problem, fix)

    def keys(self, obj: Any, path: str, allowed: set[str], what: str) -> dict:
        if not isinstance(obj, dict):
            raise self.err(path, f"expected a mapping for {what}, got {type(obj).__name__}",
                           f"write it as 'key: value' lines ({', '.join(sorted(allowed))})")
        for k in obj:
            if k not in allowed:
                import difflib
                close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(sorted(allowed))}"
                raise self.err(f"{path}.{k}" if path else str(k), f"unknown field '{k}'", hint)
        return obj

    def number(self, obj: dict, key: str, path: str, *, positive: bool = True, integer: bool = False,
               default: Any = None, unit: str = "") -> Any:
        p = f"{path}.{key}" if path else key
        if key not in obj:
            if default is not None:
                return default
            raise self.err(p, "missing", f"give {key}{' in ' + unit if unit else ''}")
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.err(p, f"expected a number, got {v!r}", f"write a plain number{' in ' + unit if unit else ''}")
        if integer and int(v) != v:
            raise self.err(p, f"expected a whole number, got {v}", "use an integer")
        if not math.isfinite(v) or (positive and v <= 0) or (not positive and v < 0):
            bound = "> 0" if positive else ">= 0"
            raise self.err(p, f"must be {bound}, got {v}", f"give a value {bound}{' in ' + unit if unit else ''}")
        return int(v) if integer else float(v)


def catalog_link(name: str) -> LinkSpec | None:
    """The catalog's link of that name (NVLink3, IB-HDR, ...) as a LinkSpec; None if unknown."""
    lt = LINK_TYPES.get(name)
    return None if lt is None else LinkSpec(lt.bandwidth_bytes_per_s, lt.latency_s, lt.name)


def _link(v: _Checker, raw: Any, path: str) -> LinkSpec:
    if isinstance(raw, str):
        spec = catalog_link(raw)
        if spec is None:
            raise v.err(path, f"unknown link '{raw}'", suggest_link(raw) + " (or give bandwidth_gbps/latency_us)")
        return spec
    obj = v.keys(raw, path, _LINK_KEYS, "a link")
    base = None
    if "like" in obj:
        base = LINK_TYPES.get(obj["like"])
        if base is None:
            raise v.err(f"{path}.like", f"unknown link '{obj['like']}'", suggest_link(str(obj["like"])))
    bw = v.number(obj, "bandwidth_gbps", path, unit="GB/s",
                  default=base.bandwidth_gbps if base else None)
    lat = v.number(obj, "latency_us", path, positive=False, unit="microseconds",
                   default=base.latency_us if base else 0.0)
    return LinkSpec(bw * 1e9, lat * 1e-6, str(obj.get("name", base.name if base else "")))


def _device_types(v: _Checker, raw: Any) -> dict[str, DeviceType]:
    types = dict(DEVICE_TYPES)
    if raw is None:
        return types
    if not isinstance(raw, list):
        raise v.err("device_types", "expected a list of device declarations",
                    "write '- {name: X, peak_tflops: .., memory_gib: .., mem_bandwidth_gbps: ..}'")
    for i, entry in enumerate(raw):
        p = f"device_types[{i}]"
        obj = v.keys(entry, p, _DTYPE_KEYS, "a device type")
        if not isinstance(obj.get("name"), str) or not obj["name"]:
            raise v.err(f"{p}.name", "missing", "give the device type a name")
        base = None
        if "like" in obj:
            base = types.get(obj["like"])
            if base is None:
                raise v.err(f"{p}.like", f"unknown GPU '{obj['like']}'", suggest_device(str(obj["like"])))
        types[obj["name"]] = DeviceType(
            name=obj["name"],
            vendor=str(obj.get("vendor", base.vendor if base else "custom")),
            peak_tflops=v.number(obj, "peak_tflops", p, unit="TFLOP/s", default=base.peak_tflops if base else None),
            memory_gib=v.number(obj, "memory_gib", p, unit="GiB", default=base.memory_gib if base else None),
            mem_bandwidth_gbps=v.number(obj, "mem_bandwidth_gbps", p, unit="GB/s",
                                        default=base.mem_bandwidth_gbps if base else None),
            cost_per_hour_usd=v.number(obj, "cost_per_hour_usd", p, positive=False, unit="USD/hour",
                                       default=base.cost_per_hour_usd if base else 0.0),
            source="declared in cluster file",
            op_overhead_us=v.number(obj, "op_overhead_us", p, positive=False, unit="µs",
                                    default=base.op_overhead_us if base else 0.0),
            op_compute_us=v.number(obj, "op_compute_us", p, positive=False, unit="µs",
                                   default=base.op_compute_us if base else 0.0),
            compute_noise=v.number(obj, "compute_noise", p, positive=False,
                                   unit="standard deviation of log(step compute / median)",
                                   default=base.compute_noise if base else 0.0),
            compute_quantiles=_quantiles(v, obj, p, base.compute_quantiles if base else ()),
            collective_extra_us=v.number(obj, "collective_extra_us", p, positive=False, unit="µs",
                                         default=base.collective_extra_us if base else 0.0),
            step_overhead_us=v.number(obj, "step_overhead_us", p, positive=False, unit="µs",
                                      default=base.step_overhead_us if base else 0.0),
            data_us=v.number(obj, "data_us", p, positive=False, unit="µs", default=base.data_us if base else 0.0),
            data_sample_us=v.number(obj, "data_sample_us", p, positive=False, unit="µs",
                                    default=base.data_sample_us if base else 0.0),
            interference_collective=v.number(obj, "interference_collective", p, positive=False,
                                             unit="fraction (0.2 = compute 20% slower)",
                                             default=base.interference_collective if base else 0.0),
            interference_p2p=v.number(obj, "interference_p2p", p, positive=False,
                                      unit="fraction (0.2 = compute 20% slower)",
                                      default=base.interference_p2p if base else 0.0),
            comm_slowdown_collective=v.number(obj, "comm_slowdown_collective", p, positive=False,
                                              unit="fraction (0.5 = half a second more per second of overlap)",
                                              default=base.comm_slowdown_collective if base else 0.0),
            comm_slowdown_p2p=v.number(obj, "comm_slowdown_p2p", p, positive=False,
                                       unit="fraction (0.5 = half a second more per second of overlap)",
                                       default=base.comm_slowdown_p2p if base else 0.0),
        )
    return types


def _quantiles(v: _Checker, obj: dict, path: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """A device type's ``compute_quantiles``: at least 2 finite numbers, ascending."""
    if "compute_quantiles" not in obj:
        return default
    raw, p = obj["compute_quantiles"], f"{path}.compute_quantiles"
    if (not isinstance(raw, list) or len(raw) < 2
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in raw)):
        raise v.err(p, "expected a list of at least 2 numbers", "write it with 'hetalloc profile', or leave it out")
    if any(b < a for a, b in zip(raw, raw[1:])):
        raise v.err(p, "must ascend", "list the quantiles from the lowest level to the highest")
    return tuple(float(x) for x in raw)


def _gpus(v: _Checker, raw: Any, path: str, types: dict[str, DeviceType]) -> list[tuple[str, int, int | None]]:
    if raw is None:
        raise v.err(path, "missing", "list the node's GPUs, e.g. 'gpus: [{type: A100-80G, count: 8}]'")
    if isinstance(raw, dict):  # shorthand {A100-80G: 8}
        raw = [{"type": k, "count": c} for k, c in raw.items()]
    if not isinstance(raw, list) or not raw:
        raise v.err(path, "expected a non-empty list of {type, count}",
                    "e.g. 'gpus: [{type: A100-80G, count: 8}]'")
    out = []
    for j, g in enumerate(raw):
        p = f"{path}[{j}]"
        if isinstance(g, str):  # shorthand "8xA100-80G"
            cnt, _, name = g.partition("x")
            if not cnt.isdigit() or not name:
                raise v.err(p, f"cannot read '{g}'", "write '8xA100-80G' or {type: A100-80G, count: 8}")
            g = {"type": name, "count": int(cnt)}
        obj = v.keys(g, p, {"type", "count", "at"}, "a GPU entry")
        t = obj.get("type")
        if not isinstance(t, str):
            raise v.err(f"{p}.type", "missing", "name a GPU type from the catalog (hetalloc catalog)")
        if t not in types:
            raise v.err(f"{p}.type", f"unknown GPU '{t}'", suggest_device(t, types))
        at = obj.get("at")
        if at is not None and (not isinstance(at, int) or isinstance(at, bool) or at < 0):
            raise v.err(f"{p}.at", f"expected a local device index >= 0, got {at!r}",
                        "'at' numbers the entry's first device (written for nodes that lost devices); omit it")
        out.append((t, v.number(obj, "count", p, integer=True, default=1), at))
    return out


def cluster_from_dict(raw: Any, source: str = "<cluster>") -> Cluster:
    v = _Checker(source)
    if raw is None:
        raise v.err("", "the file is empty", "describe the cluster: name and nodes")
    obj = v.keys(raw, "", _TOP_KEYS, "the cluster")
    types = _device_types(v, obj.get("device_types"))
    prices = obj.get("prices") or {}
    if not isinstance(prices, dict):
        raise v.err("prices", "expected a mapping GPU type -> USD per hour", "e.g. 'prices: {A100-80G: 2.5}'")
    for t, price in prices.items():
        if t not in types:
            raise v.err(f"prices.{t}", f"unknown GPU '{t}'", suggest_device(str(t), types))
        p = v.number(prices, t, "prices", positive=False, unit="USD/hour")
        dt = types[t]
        types[t] = replace(dt, cost_per_hour_usd=p)
    fabric = obj.get("fabric") or {}
    fabric = v.keys(fabric, "fabric", {"oversubscription"}, "the fabric")
    oversub = v.number(fabric, "oversubscription", "fabric", default=1.0)
    if oversub < 1:
        raise v.err("fabric.oversubscription", f"must be >= 1, got {oversub}",
                    "1 = non-blocking, 2 = half the aggregate NIC bandwidth in the core")
    raw_nodes = obj.get("nodes")
    if not raw_nodes:
        raise v.err("nodes", "the cluster has no nodes",
                    "add at least one node: 'nodes: [{gpus: [{type: A100-80G, count: 8}], intra_link: NVLink3}]'")
    if not isinstance(raw_nodes, list):
        raise v.err("nodes", "expected a list of nodes", "write each node as '- gpus: ...'")
    nodes: list[Node] = []
    seen: set[str] = set()
    total_nodes = 0
    for i, rn in enumerate(raw_nodes):
        p = f"nodes[{i}]"
        nobj = v.keys(rn, p, _NODE_KEYS, "a node")
        count = v.number(nobj, "count", p, integer=True, default=1)
        total_nodes += count
        gpus = _gpus(v, nobj.get("gpus"), f"{p}.gpus", types)
        if "intra_link" not in nobj:
            raise v.err(f"{p}.intra_link", "missing",
                        "name the GPU-to-GPU link (NVLink3, PCIe4, ...) or give {bandwidth_gbps, latency_us}")
        intra = _link(v, nobj["intra_link"], f"{p}.intra_link")
        nic = _link(v, nobj["nic"], f"{p}.nic") if nobj.get("nic") is not None else None
        nics = v.number(nobj, "nics", p, integer=True, default=1)
        slots = v.number(nobj, "compute_slots", p, integer=True, default=0, positive=False,
                         unit="devices computing at once (CPU cores)")
        efficiency = v.number(nobj, "compute_share_efficiency", p, default=1.0,
                              unit="fraction of a compute slot's speed while shared (0-1]")
        if efficiency > 1.0:
            raise v.err(f"{p}.compute_share_efficiency", f"{efficiency} is above 1",
                        "give the fraction of a slot's speed that sharing leaves, at most 1")
        if nic is not None and nics != 1:
            nic = LinkSpec(nic.bandwidth_bytes_per_s * nics, nic.latency_s, f"{nics}x{nic.name}" if nic.name else "")
        base = nobj.get("name", f"node{len(nodes)}")
        if not isinstance(base, str) or not base or "/" in base:
            raise v.err(f"{p}.name", f"bad node name {base!r}", "use letters, digits, '-' or '_' (no '/')")
        for k in range(count):
            name = base if count == 1 else f"{base}-{k}"
            if name in seen:
                raise v.err(f"{p}.name", f"duplicate node name '{name}'", "give every node a unique name")
            seen.add(name)
            devs, idx = [], 0
            for j, (t, c, at) in enumerate(gpus):
                if at is not None:
                    if at < idx:
                        raise v.err(f"{p}.gpus[{j}].at", f"index {at} repeats an earlier device's",
                                    "local indices rise through the node's entries")
                    idx = at
                for _ in range(c):
                    devs.append(Device(f"{name}/{idx}", t, name, idx))
                    idx += 1
            nodes.append(Node(name, devs, intra, nic, slots, efficiency))
    if total_nodes > 1:
        for i, rn in enumerate(raw_nodes):
            if rn.get("nic") is None:
                raise v.err(f"nodes[{i}].nic", "missing (the cluster has more than one node)",
                            "name the node's network link (IB-HDR, Eth-100G, ...) or give {bandwidth_gbps, latency_us}")
    name = obj.get("name") or Path(source).stem
    return Cluster(str(name), nodes, types, oversub, source, collectives=parse_collectives(obj.get("collectives"), source))


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML has it (a 12,500-node spec: ~0.5 s instead of ~5 s),
else the pure-Python one; both build plain types only."""


def load_cluster(path: str | Path) -> Cluster:
    path = Path(path)
    source = str(path)
    text = read_text(path, missing_fix="check the path (examples/ has sample clusters)", what="cluster YAML")
    try:
        raw = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(source, where, f"invalid YAML ({problem})", "fix the syntax (indentation, ':' after keys)") from None
    return cluster_from_dict(raw, source)


def dump_cluster_yaml(cluster: Cluster) -> str:
    return yaml.safe_dump(cluster.to_dict(), sort_keys=False)
