"""What-if scenarios: transformations of (cluster, cost graph, global batch) that carry the
old plan over where it is still valid. Running them (re-planning with the allocator and
simulating the old and new plans) is workflows.whatif's: the simulator never calls the
allocator.

Scenario specs (each flag of ``hetalloc whatif`` is one scenario unless combined):
- ``swap 8xV100-16G=4xH100-80G``: remove 8 V100s (from the last nodes that have them)
  and put 4 H100s in the nodes they left (same links); new devices get new ids;
- ``add 8xH100-80G[@NVLink4/IB-NDR]``: new node(s) of up to 8 devices (links of the first
  node unless given);
- ``remove 8xV100-16G``;
- ``link [NODES.]intra|nic=BANDWIDTH[,LATENCY]`` (``nic=200Gb/s``, ``v100.nic=25GB/s,8us``;
  NODES is a node name or name prefix; a bare number is GB/s as in cluster files) and
  ``link fabric=OVERSUBSCRIPTION``;
- ``slow DEVICE=FACTOR``: that device computes (and steps its optimizer) FACTOR times slower;
- ``fail DEVICE`` or ``fail NODE``: the device or node is gone; ids of the others stay;
- ``batch N`` and ``seq N``: another global batch or sequence length (built-in models);
- plan options, toggled on the old plan (the cluster stays): ``tp N`` regroups every
  stage's devices of one type in one node into tensor-parallel groups of N (their shares
  summed, then split among the new groups by size); ``recompute none|full`` sets every
  stage's choice; ``optimizer_sharding none|zero1`` the plan's.

Prices per device-hour come from the catalog (``DeviceType.cost_per_hour_usd``), a
cluster file's ``prices:`` or ``--price TYPE=USD``; a cluster costs the sum over all its
devices, used or not.

Never: plan or simulate here, nor price anything itself — prices come from the catalog.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable

from hetalloc.apportion import largest_remainder
from hetalloc.catalog import DeviceType, suggest_device, suggest_link, with_price
from hetalloc.cluster import Cluster, Device, LinkSpec, Node, catalog_link
from hetalloc.costgraph import CostGraph, TimeTable, analytic_cost_graph
from hetalloc.errors import InfeasibleError, SpecError
from hetalloc.costs import OPTIMIZER_SHARDING, RECOMPUTE, TP_DEGREES
from hetalloc.plan import Group, Plan, plan_from_dict, validate_plan

KINDS = ("swap", "add", "remove", "link", "slow", "fail", "batch", "seq", "tp", "recompute", "optimizer_sharding")


@dataclass
class Case:
    """What to plan for, and the old plan carried over to it (or why it cannot be)."""

    cluster: Cluster
    cg: CostGraph
    global_batch: int
    old_plan: Plan | None
    old_invalid: str = ""


@dataclass
class Scenario:
    name: str
    transforms: list[Callable[[Case], Case]] = field(default_factory=list)


def _err(spec: str, problem: str, fix: str) -> SpecError:
    return SpecError("whatif", spec, problem, fix)


# ---- cluster surgery ------------------------------------------------------------------

def _rebuild(cluster: Cluster, nodes: list[Node], types: dict[str, DeviceType] | None = None,
             oversub: float | None = None) -> Cluster:
    nodes = [n for n in nodes if n.devices]
    if not nodes:
        raise InfeasibleError("the scenario leaves no devices in the cluster")
    return Cluster(cluster.name, nodes, dict(types or cluster.device_types),
                   cluster.fabric_oversubscription if oversub is None else oversub, cluster.source,
                   collectives=cluster.collectives)


def _copy_nodes(cluster: Cluster) -> list[Node]:
    return [Node(n.name, list(n.devices), n.intra, n.nic, n.compute_slots, n.share_efficiency) for n in cluster.nodes]


def _resolve_type(name: str, types: dict[str, DeviceType], spec: str, present: Cluster | None = None) -> str:
    """A type name, or an unambiguous prefix of one ('H100' -> 'H100-80G'); with `present`,
    types the cluster has are preferred ('V100' -> the cluster's V100 variant)."""
    if name in types:
        return name
    close = [t for t in types if t.upper().startswith(name.upper())]
    if present is not None and len(close) > 1:
        close = [t for t in close if t in present.type_counts()] or close
    if len(close) == 1:
        return close[0]
    fix = f"candidates: {', '.join(sorted(close))}" if close else suggest_device(name, types)
    raise _err(spec, f"{'ambiguous' if close else 'unknown'} GPU '{name}'", fix)


def _count_type(spec: str, text: str, types: dict[str, DeviceType], present: Cluster | None = None) -> tuple[int, str]:
    m = re.fullmatch(r"(\d+)\s*[xX]\s*(\S+)", text.strip())
    if not m or int(m.group(1)) < 1:
        raise _err(spec, f"cannot read '{text}'", "write COUNTxTYPE, e.g. 8xV100-16G")
    return int(m.group(1)), _resolve_type(m.group(2), types, spec, present)


def _remove(nodes: list[Node], count: int, dtype: str, spec: str) -> dict[str, int]:
    """Take `count` devices of `dtype` from the last nodes that have them; returns removed per node."""
    have = sum(1 for n in nodes for d in n.devices if d.type == dtype)
    if have < count:
        raise _err(spec, f"the cluster has {have} {dtype}, cannot remove {count}", f"use at most {have}x{dtype}")
    taken: dict[str, int] = {}
    left = count
    for n in reversed(nodes):
        for d in reversed(list(n.devices)):
            if left and d.type == dtype:
                n.devices.remove(d)
                taken[n.name] = taken.get(n.name, 0) + 1
                left -= 1
    return taken


def swap(spec: str) -> Callable[[Case], Case]:
    left, sep, right = spec.partition("=")
    if not sep:
        raise _err(spec, "expected OLD=NEW", "e.g. --swap 8xV100-16G=4xH100-80G")

    def apply(case: Case) -> Case:
        types = case.cluster.device_types
        n_old, t_old = _count_type(spec, left, types, case.cluster)
        n_new, t_new = _count_type(spec, right, types)
        nodes = _copy_nodes(case.cluster)
        top = {n.name: max((d.local_index for d in n.devices), default=-1) + 1 for n in nodes}
        taken = _remove(nodes, n_old, t_old, spec)
        names = list(taken)
        split = largest_remainder(n_new, [taken[n] for n in names])
        by_name = {n.name: n for n in nodes}
        for name, k in zip(names, split):
            node = by_name[name]
            start = top[name]
            for i in range(k):
                node.devices.append(Device(f"{name}/{start + i}", t_new, name, start + i))
        return dataclasses.replace(case, cluster=_rebuild(case.cluster, nodes))
    return apply


def add(spec: str) -> Callable[[Case], Case]:
    what, _, links = spec.partition("@")

    def apply(case: Case) -> Case:
        n, t = _count_type(spec, what, case.cluster.device_types)
        first = case.cluster.nodes[0]
        nic_default = next((x.nic for x in case.cluster.nodes if x.nic is not None), None)
        intra, nic = first.intra, nic_default
        if links:
            a, _, b = links.partition("/")
            intra = _named_link(a, spec) if a else intra
            nic = _named_link(b, spec) if b else nic
        nodes = _copy_nodes(case.cluster)
        if nic is None:
            nic = _named_link("IB-HDR", spec)
        nodes = [Node(x.name, x.devices, x.intra, x.nic or nic) for x in nodes]
        taken = {x.name for x in nodes}
        k = 0
        while n > 0:
            name = f"added{k}"
            k += 1
            if name in taken:
                continue
            c = min(8, n)
            nodes.append(Node(name, [Device(f"{name}/{i}", t, name, i) for i in range(c)], intra, nic))
            n -= c
        return dataclasses.replace(case, cluster=_rebuild(case.cluster, nodes))
    return apply


def _named_link(name: str, spec: str) -> LinkSpec:
    found = catalog_link(name)
    if found is None:
        raise _err(spec, f"unknown link '{name}'", suggest_link(name))
    return found


def remove(spec: str) -> Callable[[Case], Case]:
    def apply(case: Case) -> Case:
        n, t = _count_type(spec, spec, case.cluster.device_types, case.cluster)
        nodes = _copy_nodes(case.cluster)
        _remove(nodes, n, t, spec)
        return dataclasses.replace(case, cluster=_rebuild(case.cluster, nodes))
    return apply


def parse_bandwidth(text: str, spec: str) -> float:
    """'200Gb/s' (bits), '25GB/s' (bytes), '25' (GB/s as in cluster files) -> bytes/s."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[-+]?\d+)?)\s*(Gb/s|Gbit/s|Gbps|GB/s|)\s*", text)
    if not m:
        raise _err(spec, f"cannot read bandwidth '{text}'", "write e.g. 200Gb/s (bits) or 25GB/s (bytes)")
    v = float(m.group(1))
    if v <= 0:
        raise _err(spec, f"bandwidth must be > 0, got {text}", "give a positive bandwidth")
    return v * (1e9 / 8 if m.group(2) in ("Gb/s", "Gbit/s", "Gbps") else 1e9)


def parse_latency(text: str, spec: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|µs|ms|s|)\s*", text)
    if not m:
        raise _err(spec, f"cannot read latency '{text}'", "write e.g. 5us")
    return float(m.group(1)) * {"us": 1e-6, "µs": 1e-6, "": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


def link(spec: str) -> Callable[[Case], Case]:
    target, sep, value = spec.partition("=")
    if not sep:
        raise _err(spec, "expected TARGET=VALUE", "e.g. --link nic=200Gb/s or --link v100.intra=50GB/s,3us")
    nodes_sel, _, kind = target.rpartition(".")
    if kind not in ("intra", "nic", "fabric"):
        raise _err(spec, f"unknown link kind '{kind}'", "use intra, nic or fabric")

    def apply(case: Case) -> Case:
        if kind == "fabric":
            try:
                over = float(value)
            except ValueError:
                raise _err(spec, f"cannot read oversubscription '{value}'", "e.g. fabric=2") from None
            if over < 1:
                raise _err(spec, "oversubscription must be >= 1", "1 = non-blocking")
            return dataclasses.replace(case, cluster=_rebuild(case.cluster, _copy_nodes(case.cluster), oversub=over))
        bw_text, _, lat_text = value.partition(",")
        bw = parse_bandwidth(bw_text, spec)
        nodes = _copy_nodes(case.cluster)
        hit = [n for n in nodes if not nodes_sel or n.name == nodes_sel or n.name.startswith(nodes_sel)]
        if not hit:
            raise _err(spec, f"no node named or starting with '{nodes_sel}'",
                       f"nodes: {', '.join(n.name for n in nodes[:8])}{' ...' if len(nodes) > 8 else ''}")
        for n in hit:
            old = n.intra if kind == "intra" else n.nic
            if old is None:
                if len(nodes) == 1:
                    raise _err(spec, "a single-node cluster has no network link", "change its intra link instead")
                old = _named_link("IB-HDR", spec)
            lat = parse_latency(lat_text, spec) if lat_text else old.latency_s
            new = LinkSpec(bw, lat, "")
            if kind == "intra":
                n.intra = new
            else:
                n.nic = new
        return dataclasses.replace(case, cluster=_rebuild(case.cluster, nodes))
    return apply


def slow(spec: str) -> Callable[[Case], Case]:
    dev, sep, factor = spec.partition("=")
    try:
        f = float(factor)
    except ValueError:
        f = -1.0
    if not sep or f <= 0:
        raise _err(spec, "expected DEVICE=FACTOR with FACTOR > 0", "e.g. --slow a100/3=2 (twice as slow)")

    def apply(case: Case) -> Case:
        cl = case.cluster
        if dev not in cl.device_by_id:
            raise _err(spec, f"no device '{dev}'", f"devices look like {cl.devices[0].id}")
        base = cl.device_types[cl.device(dev).type]
        name = f"{base.name}@x{f:g}"
        derived = DeviceType(name, base.vendor, base.peak_tflops / f, base.memory_gib,
                             base.mem_bandwidth_gbps / f, base.cost_per_hour_usd,
                             f"{base.name} slowed {f:g}x (what-if)")
        nodes = [Node(n.name, [Device(d.id, name, d.node, d.local_index) if d.id == dev else d for d in n.devices],
                      n.intra, n.nic, n.compute_slots, n.share_efficiency) for n in cl.nodes]
        cg = case.cg.with_tables({name: _scaled_table(case.cg, base, f, case.global_batch)})
        return dataclasses.replace(case, cluster=_rebuild(cl, nodes, {**cl.device_types, name: derived}), cg=cg)
    return apply


def _scaled_table(cg: CostGraph, base: DeviceType, factor: float, max_batch: int) -> TimeTable:
    """The base type's times x factor, exact at every whole batch size up to max_batch."""
    if base.name in cg.tables:
        t = cg.tables[base.name]
        return t.scaled(factor, "what-if straggler")
    sizes = list(range(1, max(1, max_batch) + 1))
    cols = [cg.layer_times(base, b) for b in sizes]
    fwd = [[float(c[0][i]) * factor for c in cols] for i in range(cg.num_layers)]
    bwd = [[float(c[1][i]) * factor for c in cols] for i in range(cg.num_layers)]
    return TimeTable(sizes, fwd, bwd, "what-if straggler")


def fail(spec: str) -> Callable[[Case], Case]:
    target = spec.removeprefix("node:")

    def apply(case: Case) -> Case:
        cl = case.cluster
        if target in cl.device_by_id and not spec.startswith("node:"):
            nodes = [Node(n.name, [d for d in n.devices if d.id != target], n.intra, n.nic, n.compute_slots, n.share_efficiency)
                     for n in cl.nodes]
        elif target in cl.node_by_name:
            nodes = [n for n in _copy_nodes(cl) if n.name != target]
        else:
            raise _err(spec, f"no device or node '{target}'",
                       f"e.g. --fail {cl.devices[0].id} or --fail {cl.nodes[0].name}")
        return dataclasses.replace(case, cluster=_rebuild(cl, nodes))
    return apply


def batch(spec: str) -> Callable[[Case], Case]:
    n = _positive_int(spec, "batch")

    def apply(case: Case) -> Case:
        out = dataclasses.replace(case, global_batch=n)
        p = case.old_plan
        if p is not None:
            per_round = p.global_batch // p.num_microbatches
            if n % per_round:
                out.old_plan = None
                out.old_invalid = (f"global batch {n} is not a multiple of the old plan's {per_round} samples per "
                                   "micro-batch round")
            else:
                q = _copy(p)
                q.global_batch, q.num_microbatches = n, n // per_round
                out.old_plan = q
        return out
    return apply


def seq(spec: str) -> Callable[[Case], Case]:
    n = _positive_int(spec, "seq")

    def apply(case: Case) -> Case:
        cg = case.cg
        if cg.tables:
            raise _err(spec, "the cost graph has measured tables for one sequence length",
                       "profile at the new length (hetalloc profile --seq) instead")
        new = (analytic_cost_graph(cg.shape(), n, cg.precision).with_efficiency(cg.efficiency)
               .with_tp_efficiency(cg.tp_efficiency))
        out = dataclasses.replace(case, cg=new)
        if case.old_plan is not None:
            q = _copy(case.old_plan)
            q.seq_len = n
            out.old_plan = q
        return out
    return apply


def tp(spec: str) -> Callable[[Case], Case]:
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n not in TP_DEGREES:
        raise _err(spec, f"a tensor-parallel degree is one of {', '.join(map(str, TP_DEGREES))}", "e.g. --tp 4")

    def apply(case: Case) -> Case:
        if case.old_plan is None:
            return case
        q = _copy(case.old_plan)
        for ri, r in enumerate(q.replicas):
            for si, s in enumerate(r.stages):
                groups = regroup(s.groups, n, case.cluster)
                if isinstance(groups, str):
                    return dataclasses.replace(case, old_plan=None,
                                               old_invalid=f"tp {n}: replicas[{ri}].stages[{si}]: {groups}; re-plan")
                s.groups = groups
        return dataclasses.replace(case, old_plan=q)
    return apply


def regroup(groups: list[Group], n: int, cluster: Cluster) -> list[Group] | str:
    """A stage's groups as groups of n: the devices of each type in each node, in order,
    cut into groups of n; the shares they served together split among the new groups
    evenly (each at least 1). A reason (str) when that cannot be done."""
    pools: dict[tuple[str, str], tuple[list[str], int]] = {}
    for g in groups:
        d = cluster.device(g.lead)
        devs, share = pools.get((d.node, d.type), ([], 0))
        pools[(d.node, d.type)] = (devs + list(g.devices), share + g.share)
    out: list[Group] = []
    for (node, dtype), (devs, share) in pools.items():
        if len(devs) % n:
            return f"{len(devs)} {dtype} on node {node} do not make groups of {n}"
        k = len(devs) // n
        shares = largest_remainder(share, [1.0] * k, minimum=1)
        if not shares:
            return f"{share} samples per micro-batch cannot feed {k} groups on node {node}"
        out += [Group(devs[i * n:(i + 1) * n], sh) for i, sh in enumerate(shares)]
    return out


def recompute(spec: str) -> Callable[[Case], Case]:
    if spec not in RECOMPUTE:
        raise _err(spec, f"unknown recompute choice '{spec}'", f"use one of {', '.join(RECOMPUTE)}")

    def apply(case: Case) -> Case:
        if case.old_plan is None:
            return case
        q = _copy(case.old_plan)
        for r in q.replicas:
            for s in r.stages:
                s.recompute = spec
        return dataclasses.replace(case, old_plan=q)
    return apply


def optimizer_sharding(spec: str) -> Callable[[Case], Case]:
    if spec not in OPTIMIZER_SHARDING:
        raise _err(spec, f"unknown optimizer sharding '{spec}'", f"use one of {', '.join(OPTIMIZER_SHARDING)}")

    def apply(case: Case) -> Case:
        if case.old_plan is None:
            return case
        q = _copy(case.old_plan)
        q.optimizer_sharding = spec
        return dataclasses.replace(case, old_plan=q)
    return apply


def _positive_int(spec: str, what: str) -> int:
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise _err(spec, f"{what} must be a whole number >= 1", f"e.g. --{what} 512")
    return n


def _copy(p: Plan) -> Plan:
    return plan_from_dict(p.to_dict(), "old plan")


BUILDERS: dict[str, Callable[[str], Callable[[Case], Case]]] = {
    "swap": swap, "add": add, "remove": remove, "link": link, "slow": slow, "fail": fail,
    "batch": batch, "seq": seq, "tp": tp, "recompute": recompute, "optimizer_sharding": optimizer_sharding,
}


def _as_flag(e: SpecError, flag: str) -> SpecError:
    """The error with the flag it came from as its source (the builders say 'whatif')."""
    return SpecError(flag, e.path, e.problem, e.fix) if e.source == "whatif" else e


def scenario(kind: str, spec: str) -> Scenario:
    """The scenario of one flag (--swap SPEC, ...); its errors, on parsing now or on
    applying later, name the flag."""
    flag = f"--{kind}"
    try:
        transform = BUILDERS[kind](spec)
    except SpecError as e:
        raise _as_flag(e, flag) from None

    def apply(case: Case) -> Case:
        try:
            return transform(case)
        except SpecError as e:
            raise _as_flag(e, flag) from None
    return Scenario(f"{kind} {spec}", [apply])


def apply_scenario(sc: Scenario, base: Case) -> Case:
    case = dataclasses.replace(base, old_plan=_copy(base.old_plan) if base.old_plan else None)
    for t in sc.transforms:
        case = t(case)
    if case.old_plan is not None:
        case.old_invalid = old_plan_problem(case.old_plan, base.cluster, case)
        if case.old_invalid:
            case.old_plan = None
    return case


def old_plan_problem(plan: Plan, base_cluster: Cluster, case: Case) -> str:
    """Why the old plan cannot run on the scenario's cluster ('' if it can)."""
    for d in plan.device_ids():
        if d not in case.cluster.device_by_id:
            return f"device {d} is not in the scenario's cluster (failed or removed); re-plan"
        was, now = base_cluster.device(d).type, case.cluster.device(d).type
        if was != now.split("@")[0]:
            return f"device {d} is now a {now} (was {was}); re-plan"
    try:
        validate_plan(plan, case.cluster, case.cg, source="old plan")
    except SpecError as e:
        return str(e)
    return ""


def with_prices(cluster: Cluster, prices: dict[str, float]) -> Cluster:
    types = dict(cluster.device_types)
    for t, usd in prices.items():
        name = _resolve_type(t, types, f"--price {t}={usd}", cluster)
        types[name] = with_price(types[name], usd)
    return Cluster(cluster.name, _copy_nodes(cluster), types, cluster.fabric_oversubscription, cluster.source,
                   collectives=cluster.collectives)


def cost_per_hour(cluster: Cluster) -> float:
    return sum(cluster.device_types[d.type].cost_per_hour_usd for d in cluster.devices)


# ---- sweeps ----------------------------------------------------------------------------

def parse_sweep(text: str) -> tuple[str, list[str], str]:
    """'nic=10,25,100Gb/s' or 'nic=10..400Gb/s:6' (log-spaced) -> (knob, values, unit)."""
    knob, sep, rest = text.partition("=")
    if not sep or not knob:
        raise _err(text, "expected KNOB=VALUES", "e.g. --sweep nic=10..400Gb/s:6 or --sweep batch=256,512,1024")
    m = re.fullmatch(r"([0-9.]+)\.\.([0-9.]+)([A-Za-z/µ]*)(?::(\d+))?", rest.strip())
    if m:
        lo, hi, unit, n = float(m.group(1)), float(m.group(2)), m.group(3), int(m.group(4) or 6)
        if lo <= 0 or hi <= lo or n < 2:
            raise _err(text, "need 0 < LO < HI and at least 2 points", "e.g. nic=10..400Gb/s:6")
        vals = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
        return knob, [f"{v:.4g}" for v in vals], unit
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    m = re.fullmatch(r"([0-9.]+)([A-Za-z/µ]*)", parts[-1]) if parts else None
    if not m:
        raise _err(text, f"cannot read values '{rest}'", "e.g. nic=10,25,100Gb/s")
    unit = m.group(2)
    return knob, [p.removesuffix(unit) for p in parts], unit


def sweep_scenarios(text: str) -> tuple[str, list[float], str, list[Scenario]]:
    try:
        knob, values, unit = parse_sweep(text)
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            raise _err(text, f"cannot read values '{','.join(values)}'", "e.g. nic=10,25,100Gb/s") from None
        out = []
        for v, x in zip(values, numbers):
            if knob in ("batch", "seq"):
                sc = scenario(knob, str(int(x)) if x == int(x) else v)
            elif knob.startswith("slow:"):
                sc = scenario("slow", f"{knob[5:]}={v}")
            else:
                sc = scenario("link", f"{knob}={v}{unit}")
            sc.name = f"{knob}={v}{unit}"
            out.append(sc)
    except SpecError as e:
        raise SpecError("--sweep", text, e.problem, e.fix) from None
    return knob, numbers, unit, out
