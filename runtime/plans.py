"""Plans written by hand (tests, benchmarks, what-if runs): a compact description turned
into a validated, self-contained Plan with its predictions. Never imports torch."""

from __future__ import annotations

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph, analytic_cost_graph
from hetalloc.evaluate import predict
from hetalloc.models import resolve_model
from hetalloc.plan import Group, Plan, Replica, Stage, attach_context, validate_plan

StageSpec = tuple
"""((start, stop), [(device, share), ...]) or ((start, stop), [(device, share), ...], recompute):
device is a device id, or a tuple of ids for a tensor-parallel group; recompute 'none'
(the default) or 'full'."""


def hand_plan(cluster: Cluster, cg: CostGraph, replicas: list[list[StageSpec]], *, num_microbatches: int,
              schedule: str = "1f1b", grad_sync: str = "ring", optimizer: str = "adamw",
              optimizer_sharding: str = "none", name: str = "hand") -> Plan:
    def group(d: str | tuple[str, ...], share: int) -> Group:
        return Group([d] if isinstance(d, str) else list(d), share)

    reps = [Replica([Stage(spec[0][0], spec[0][1], [group(d, s) for d, s in spec[1]], *spec[2:]) for spec in r])
            for r in replicas]
    batch = num_microbatches * sum(r.microbatch for r in reps)
    plan = Plan(model=cg.model, seq_len=cg.seq_len, global_batch=batch, num_microbatches=num_microbatches,
                schedule=schedule, grad_sync=grad_sync, replicas=reps, optimizer=optimizer,
                precision=cg.precision, planner=name, optimizer_sharding=optimizer_sharding)
    attach_context(plan, cluster, cg)
    validate_plan(plan, cluster, cg)
    plan.predicted = predict(plan, cluster, cg).to_dict()
    return plan


def cpu_cost_graph(model: str, seq_len: int) -> CostGraph:
    """The fp32 analytic cost graph the CPU runs use (a built-in name or a config.json)."""
    return analytic_cost_graph(resolve_model(model), seq_len, precision="fp32")


def describe(plan: Plan) -> str:
    """One line: replicas separated by ' | ', stages as [start,stop) device:share,...
    (a tensor-parallel group as device+device+...:share)."""
    return " | ".join(" ".join(f"[{s.start},{s.stop}) " + ",".join(f"{'+'.join(g.devices)}:{g.share}" for g in s.groups)
                               for s in r.stages) for r in plan.replicas) + f"  M={plan.num_microbatches}"
