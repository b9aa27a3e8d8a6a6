"""Turn a count-level plan into a concrete Plan: which device serves which stage.

Units of a class (single devices, or tensor-parallel groups of one node) are taken in cluster order (node by node). Stages take their devices
in pipeline order, and within a stage the R replicas' devices are one contiguous block
per class, so a stage's gradient group stays inside as few nodes as possible and
consecutive stages tend to share a node.
"""

from __future__ import annotations

from hetalloc.plan import Group, Plan, Replica, Stage

from .problem import CountPlan, Problem


def place(prob: Problem, cp: CountPlan, *, grad_sync: str = "ring", planner: str = "ilp") -> Plan:
    classes = prob.classes
    cursor = {c.index: 0 for c in classes}
    replicas = [Replica([]) for _ in range(cp.R)]
    for si, s in enumerate(cp.stages):
        per_replica: list[list[Group]] = [[] for _ in range(cp.R)]
        for c in classes:
            n = s.counts[c.index]
            if not n:
                continue
            shares = cp.shares[si][c.index]
            for k in range(cp.R):
                start = cursor[c.index] + k * n
                for unit, share in zip(c.units[start:start + n], shares):
                    per_replica[k].append(Group(list(unit), int(share)))
            cursor[c.index] += cp.R * n
        for k in range(cp.R):
            replicas[k].stages.append(Stage(s.start, s.stop, per_replica[k], s.recompute))
    return Plan(
        model=prob.cg.model, seq_len=prob.cg.seq_len, global_batch=prob.global_batch,
        num_microbatches=cp.M, schedule=prob.schedule, grad_sync=grad_sync, replicas=replicas,
        optimizer=prob.optimizer, precision=prob.cg.precision, cluster_name=prob.cluster.name,
        cluster_fingerprint=prob.cluster.fingerprint(), cost_graph_fingerprint=prob.cg.fingerprint(),
        planner=planner,
        # zero1 where some stage has data-parallel peers to shard over (else it changes nothing)
        optimizer_sharding=prob.optimizer_sharding if any(cp.R * sum(s.counts) > 1 for s in cp.stages) else "none",
    )
