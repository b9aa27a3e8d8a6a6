"""Micro-batch shares re-balanced for measured speeds (simulator.speeds gives the case).

``rebalance_shares``: the same stages and groups, other shares. For every stage of a
replica the shares of its groups are filled one sample at a time, each to the group
whose op would then take least (water-filling): for times that grow with the share this
minimises the slowest group of the stage exactly (a min-max resource allocation); a
group whose memory would not hold another sample gets none. Replicas' micro-batch sizes
are filled the same way, by their slowest stage. The number of micro-batches and the
global batch stay; the result is predicted (hetalloc.evaluate) and validated.

Never: plan stages or choose devices here (the allocator does), or import torch.
"""

from __future__ import annotations

import math

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.costs import in_flight_microbatches, stage_memory, usable_memory
from hetalloc.errors import InfeasibleError
from hetalloc.plan import Group, Plan, Replica, Stage, plan_from_dict
from simulator.speeds import in_context

def _op_time(cg: CostGraph, cluster: Cluster, s: Stage, g: Group, share: int) -> float:
    f, b = cg.range_time(s.start, s.stop, cluster.dtype(g.lead), share, g.tp, s.recompute)
    return f + b


def _fits(plan: Plan, cluster: Cluster, cg: CostGraph, si: int, num_stages: int, s: Stage, g: Group,
          share: int) -> bool:
    infl = in_flight_microbatches(plan.schedule, si, num_stages, plan.num_microbatches)
    mem = stage_memory(cg.range_params(s.start, s.stop, g.tp), cg.range_saved_bytes(s.start, s.stop, g.tp, s.recompute),
                       cg.layers[s.stop - 1].out_act_bytes, share, infl, plan.precision, plan.optimizer,
                       working_act_bytes_per_sample=cg.range_working_bytes(s.start, s.stop, g.tp, s.recompute))
    return mem.total <= usable_memory(cluster.dtype(g.lead))


def _fill_stage(plan: Plan, cluster: Cluster, cg: CostGraph, si: int, num_stages: int, s: Stage,
                total: int) -> tuple[list[int], float] | None:
    """Water-filled shares of one stage for `total` samples, and its slowest op."""
    shares = [1] * len(s.groups)
    if total < len(shares):
        return None
    for _ in range(total - len(shares)):
        best, best_t = -1, math.inf
        for k, g in enumerate(s.groups):
            t = _op_time(cg, cluster, s, g, shares[k] + 1)
            if t < best_t and _fits(plan, cluster, cg, si, num_stages, s, g, shares[k] + 1):
                best, best_t = k, t
        if best < 0:
            return None
        shares[best] += 1
    return shares, max(_op_time(cg, cluster, s, g, x) for g, x in zip(s.groups, shares))


def rebalance_shares(plan: Plan, cluster: Cluster, cg: CostGraph) -> Plan:
    """The plan's stages and groups with shares re-balanced for (cluster, cg) (module
    doc); carries that context and its predictions. Raises InfeasibleError when no
    shares fit in memory."""
    per_round = plan.global_batch // plan.num_microbatches

    def replica_time(r: Replica, m: int) -> tuple[float, list[list[int]]] | None:
        out, worst = [], 0.0
        for si, s in enumerate(r.stages):
            hit = _fill_stage(plan, cluster, cg, si, len(r.stages), s, m)
            if hit is None:
                return None
            out.append(hit[0])
            worst = max(worst, hit[1])
        return worst, out

    sizes = [max(len(s.groups) for s in r.stages) for r in plan.replicas]
    if sum(sizes) > per_round:
        raise InfeasibleError("the replicas' groups outnumber the samples of a micro-batch round")
    for _ in range(per_round - sum(sizes)):
        best, best_t = -1, math.inf
        for ri, r in enumerate(plan.replicas):
            hit = replica_time(r, sizes[ri] + 1)
            if hit is not None and hit[0] < best_t:
                best, best_t = ri, hit[0]
        if best < 0:
            raise InfeasibleError("no re-balanced shares fit in memory")
        sizes[best] += 1
    replicas = []
    for ri, r in enumerate(plan.replicas):
        hit = replica_time(r, sizes[ri])
        if hit is None:
            raise InfeasibleError("no re-balanced shares fit in memory")
        replicas.append(Replica([Stage(s.start, s.stop, [Group(list(g.devices), x) for g, x in zip(s.groups, xs)],
                                       s.recompute) for s, xs in zip(r.stages, hit[1])]))
    new = plan_from_dict(plan.to_dict(), "plan")
    new.replicas = replicas
    new.planner = f"{plan.planner.split(' +')[0]} + re-balanced shares" if plan.planner else "re-balanced shares"
    return in_context(new, cluster, cg)
