"""Measured device speeds as a cluster and cost graph.

``speed_case``: each device whose compute takes f times what the cost graph predicts (f
measured by the runtime's monitor, or read from a speed trace) becomes a device of a
derived type ``<type>@x<f>`` whose every forward and backward takes f times as long: a
measured type's time table times f; an analytic type's peak FLOP/s and memory bandwidth
divided by f and its fixed costs (per layer, per op) times f, so the analytic model
gives exactly f times. Devices keep their ids (a node that lost one keeps the others'
local indices); lost devices are removed; the nodes' compute slots and the cluster's
measured collectives stay as they were. ``in_context`` puts a plan on such a case, so
that its predictions embed the speeds.

Used by the multi-iteration episodes (simulator.episode) and by adaptive runs
(workflows.adaptive). Never: plan here, or price anything.
"""

from __future__ import annotations

import dataclasses

from hetalloc.cluster import Cluster, Device, Node
from hetalloc.costgraph import CostGraph, TimeTable
from hetalloc.errors import InfeasibleError
from hetalloc.evaluate import predict
from hetalloc.plan import Plan, attach_context, plan_from_dict, validate_plan

SAME = 0.02
"""Factors within 2 % of 1 count as 1 (no derived type): measurement noise."""


def rounded(f: float) -> float:
    """A factor to 3 significant digits (fewer distinct types for the planner)."""
    return float(f"{f:.3g}")


def derived_name(base: str, f: float) -> str:
    return f"{base.split('@x')[0]}@x{rounded(f):g}"


def speed_case(cluster: Cluster, cg: CostGraph, factors: dict[str, float],
               lost: set[str] | frozenset[str] = frozenset()) -> tuple[Cluster, CostGraph]:
    """(cluster, cost graph) with each device d's compute taking factors[d] times as long
    and the lost devices gone (module doc)."""
    types = dict(cluster.device_types)
    tables: dict[str, TimeTable] = {}
    eff = {}
    tp_eff = {}
    kinds = sorted({l.kind for l in cg.layers})
    nodes = []
    for n in cluster.nodes:
        devs = []
        for d in n.devices:
            if d.id in lost:
                continue
            f = factors.get(d.id, 1.0)
            if abs(f - 1.0) <= SAME:
                devs.append(d)
                continue
            f = rounded(f)
            base = cluster.device_types[d.type]
            name = derived_name(base.name, f)
            if name not in types:
                types[name] = dataclasses.replace(
                    base, name=name, peak_tflops=base.peak_tflops / f, mem_bandwidth_gbps=base.mem_bandwidth_gbps / f,
                    op_overhead_us=base.op_overhead_us * f, op_compute_us=base.op_compute_us * f,
                    source=f"{base.name}, measured {f:g}x slower")
                if base.name in cg.tables:
                    t = cg.tables[base.name]
                    tables[name] = t.scaled(f, f"{t.source} x {f:g}")
                else:
                    eff[name] = {k: dataclasses.replace(cg.eff(base, k), overhead_s=cg.eff(base, k).overhead_s * f)
                                 for k in kinds}
                    if base.name in cg.tp_efficiency:
                        tp_eff[name] = dict(cg.tp_efficiency[base.name])
            devs.append(Device(d.id, name, d.node, d.local_index))
        if devs:
            nodes.append(Node(n.name, devs, n.intra, n.nic, n.compute_slots, n.share_efficiency))
    if not nodes:
        raise InfeasibleError("no device is left")
    # the measured parts of the cluster stay: its compute slots and collective tables
    out = Cluster(cluster.name, nodes, types, cluster.fabric_oversubscription, cluster.source,
                  collectives=cluster.collectives)
    g = cg
    if tables:
        g = g.with_tables(tables)
    if eff:
        g = g.with_efficiency(eff)
    if tp_eff:
        g = g.with_tp_efficiency(tp_eff)
    return out, g


def in_context(plan: Plan, cluster: Cluster, cg: CostGraph) -> Plan:
    """A copy of `plan` carrying (cluster, cost graph), validated, with its predictions."""
    p = plan_from_dict(plan.to_dict(), "plan")
    attach_context(p, cluster, cg)
    validate_plan(p, cluster, cg)
    p.predicted = predict(p, cluster, cg).to_dict()
    return p
