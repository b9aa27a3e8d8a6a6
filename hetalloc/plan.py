"""Plan: how a model is split over a cluster. Machine-written JSON with a schema version.

A plan has one or more pipeline replicas. Each replica is a list of stages; a stage owns
a contiguous layer range ``[start, stop)`` and is served by one or more devices, each with
its share (whole samples) of every micro-batch. All stages of a replica see the same
micro-batch size (the sum of the shares); the global batch is
``num_microbatches * sum over replicas of the micro-batch size``. Devices that serve
the same layers (in any replica) synchronise their gradients, weighted by their shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import Cluster, cluster_from_dict
from .costgraph import CostGraph, analytic_cost_graph, cost_graph_from_dict
from .costs import (GRAD_SYNC, OPTIMIZERS, SCHEDULES, MemoryBreakdown, in_flight_microbatches, stage_memory,
                    usable_memory)
from .errors import SpecError
from .fileio import atomic_write_json, read_json
from .models import get_model

SCHEMA_VERSION = 1


@dataclass(slots=True)
class DeviceShare:
    device: str
    share: int


@dataclass(slots=True)
class Stage:
    start: int
    stop: int
    devices: list[DeviceShare]

    @property
    def microbatch(self) -> int:
        return sum(d.share for d in self.devices)

    def label(self) -> str:
        return f"L{self.start}-{self.stop - 1}"


@dataclass(slots=True)
class Replica:
    stages: list[Stage]

    @property
    def microbatch(self) -> int:
        return self.stages[0].microbatch if self.stages else 0


@dataclass
class Plan:
    model: str
    seq_len: int
    global_batch: int
    num_microbatches: int
    schedule: str
    grad_sync: str
    replicas: list[Replica]
    optimizer: str = "adamw"
    precision: str = "bf16-mixed"
    cluster_name: str = ""
    cluster_fingerprint: str = ""
    cost_graph_fingerprint: str = ""
    planner: str = ""
    predicted: dict[str, Any] = field(default_factory=dict)
    solver: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cluster_spec: dict[str, Any] | None = None
    """The cluster the plan was made for (normalised spec), so a plan file is self-contained."""
    cost_graph_spec: dict[str, Any] | None = None
    """The cost graph the plan was made with."""
    source: str = field(default="", compare=False, repr=False)
    """The file the plan was read from ('' for one made here): errors about it name it."""

    # ---- views ----------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return max(len(r.stages) for r in self.replicas)

    def device_ids(self) -> list[str]:
        return [d.device for r in self.replicas for s in r.stages for d in s.devices]

    def placement(self) -> dict[str, tuple[int, int]]:
        """device id -> (replica index, stage index)."""
        return {d.device: (ri, si) for ri, r in enumerate(self.replicas)
                for si, s in enumerate(r.stages) for d in s.devices}

    # ---- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "plan",
            "planner": self.planner,
            "cluster": {"name": self.cluster_name, "fingerprint": self.cluster_fingerprint,
                        "spec": self.cluster_spec},
            "cost_graph": {"model": self.model, "fingerprint": self.cost_graph_fingerprint,
                           "spec": self.cost_graph_spec},
            "model": self.model,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "global_batch": self.global_batch,
            "num_microbatches": self.num_microbatches,
            "schedule": self.schedule,
            "grad_sync": self.grad_sync,
            "replicas": [
                {"stages": [{"layers": [s.start, s.stop],
                             "devices": [{"id": d.device, "share": d.share} for d in s.devices]}
                            for s in r.stages]}
                for r in self.replicas
            ],
            "predicted": self.predicted,
            "solver": self.solver,
            "notes": self.notes,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())


def plan_from_dict(d: Any, source: str = "<plan>") -> Plan:
    def err(path: str, problem: str, fix: str = "") -> SpecError:
        return SpecError(source, path, problem, fix)

    if not isinstance(d, dict) or d.get("kind") != "plan":
        raise err("kind", "not a plan file", "pass a file written by 'hetalloc plan'")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise err("schema_version", f"unsupported version {d.get('schema_version')!r}",
                  f"this hetalloc reads version {SCHEMA_VERSION}; re-run 'hetalloc plan'")
    for key in ("model", "seq_len", "global_batch", "num_microbatches", "schedule", "grad_sync", "replicas"):
        if key not in d:
            raise err(key, "missing", "re-run 'hetalloc plan'")
    ints = {}
    for key in ("seq_len", "global_batch", "num_microbatches"):
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
            raise err(key, f"must be a whole number >= 1, got {v!r}", "re-run 'hetalloc plan'")
        ints[key] = int(v)
    for key in ("model", "schedule", "grad_sync"):
        if not isinstance(d[key], str):
            raise err(key, f"expected a name, got {d[key]!r}", "re-run 'hetalloc plan'")
    if not isinstance(d["replicas"], list) or not all(isinstance(r, dict) for r in d["replicas"]):
        raise err("replicas", "expected a list of {stages: [...]}", "re-run 'hetalloc plan'")
    replicas = []
    for ri, r in enumerate(d["replicas"]):
        stages = []
        if not isinstance(r.get("stages", []), list) or not all(isinstance(s, dict) for s in r.get("stages", [])):
            raise err(f"replicas[{ri}].stages", "expected a list of {layers, devices}", "re-run 'hetalloc plan'")
        for si, s in enumerate(r.get("stages", [])):
            p = f"replicas[{ri}].stages[{si}]"
            layers = s.get("layers")
            if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) for x in layers)):
                raise err(f"{p}.layers", f"expected [start, stop], got {layers!r}", "give two layer indices")
            devs = []
            if not isinstance(s.get("devices", []), list):
                raise err(f"{p}.devices", "expected a list of {id, share}", "re-run 'hetalloc plan'")
            for di, dv in enumerate(s.get("devices", [])):
                if not isinstance(dv, dict) or "id" not in dv or "share" not in dv:
                    raise err(f"{p}.devices[{di}]", "expected {id, share}", "name the device and its share")
                if isinstance(dv["share"], bool) or not isinstance(dv["share"], int) or dv["share"] < 1:
                    raise err(f"{p}.devices[{di}].share", f"must be a whole number >= 1, got {dv['share']!r}")
                devs.append(DeviceShare(str(dv["id"]), dv["share"]))
            stages.append(Stage(layers[0], layers[1], devs))
        replicas.append(Replica(stages))
    cl = d.get("cluster", {})
    cg = d.get("cost_graph", {})
    if not isinstance(cl, dict) or not isinstance(cg, dict):
        raise err("cluster" if not isinstance(cl, dict) else "cost_graph", "expected a mapping", "re-run 'hetalloc plan'")
    return Plan(
        model=d["model"], seq_len=ints["seq_len"], global_batch=ints["global_batch"],
        num_microbatches=ints["num_microbatches"], schedule=d["schedule"], grad_sync=d["grad_sync"],
        replicas=replicas, optimizer=d.get("optimizer", "adamw"), precision=d.get("precision", "bf16-mixed"),
        cluster_name=cl.get("name", ""), cluster_fingerprint=cl.get("fingerprint", ""),
        cost_graph_fingerprint=cg.get("fingerprint", ""), planner=d.get("planner", ""),
        predicted=d.get("predicted", {}), solver=d.get("solver", {}), notes=d.get("notes", []),
        cluster_spec=cl.get("spec"), cost_graph_spec=cg.get("spec"), source=source,
    )


def load_plan(path: str | Path) -> Plan:
    d = read_json(path, missing_fix="check the path or run 'hetalloc plan -o' first", invalid_fix="regenerate the plan")
    return plan_from_dict(d, str(path))


def device_memory(plan: Plan, cluster: Cluster, cg: CostGraph) -> dict[str, MemoryBreakdown]:
    """Memory of every device of the plan (hetalloc.costs.stage_memory: weights, gradients,
    optimizer state, the activations in flight at its stage's position in the schedule)."""
    out = {}
    for r in plan.replicas:
        S = len(r.stages)
        for si, s in enumerate(r.stages):
            params = cg.params(s.start, s.stop)
            saved = sum(l.saved_act_bytes for l in cg.layers[s.start:s.stop])
            outb = cg.layers[s.stop - 1].out_act_bytes
            infl = in_flight_microbatches(plan.schedule, si, S, plan.num_microbatches)
            for d in s.devices:
                out[d.device] = stage_memory(params, saved, outb, d.share, infl, plan.precision, plan.optimizer)
    return out


def validate_plan(plan: Plan, cluster: Cluster, cg: CostGraph, *, source: str | None = None,
                  check_fingerprints: bool = False, check_memory: bool = True) -> None:
    """Raise SpecError naming the first problem (and the plan's file, unless `source`
    says otherwise); a valid plan passes silently."""
    source = source or plan.source or "plan"

    def err(path: str, problem: str, fix: str = "") -> SpecError:
        return SpecError(source, path, problem, fix)

    if plan.schedule not in SCHEDULES:
        raise err("schedule", f"unknown schedule '{plan.schedule}'", f"use one of {', '.join(SCHEDULES)}")
    if plan.grad_sync not in GRAD_SYNC:
        raise err("grad_sync", f"unknown algorithm '{plan.grad_sync}'", f"use one of {', '.join(GRAD_SYNC)}")
    if plan.optimizer not in OPTIMIZERS:
        raise err("optimizer", f"unknown optimizer '{plan.optimizer}'", f"use one of {', '.join(OPTIMIZERS)}")
    if plan.precision != cg.precision:
        raise err("precision", f"plan is {plan.precision}, cost graph is {cg.precision}", "re-plan with this cost graph")
    if plan.model != cg.model:
        raise err("model", f"plan is for '{plan.model}', cost graph is '{cg.model}'", "re-plan with this cost graph")
    if check_fingerprints:
        if plan.cluster_fingerprint and plan.cluster_fingerprint != cluster.fingerprint():
            raise err("cluster.fingerprint", f"plan was made for a different cluster ('{plan.cluster_name}')",
                      "re-plan for this cluster")
        if plan.cost_graph_fingerprint and plan.cost_graph_fingerprint != cg.fingerprint():
            raise err("cost_graph.fingerprint", "plan was made for a different cost graph", "re-plan")
    if plan.num_microbatches < 1:
        raise err("num_microbatches", f"must be >= 1, got {plan.num_microbatches}")
    if not plan.replicas:
        raise err("replicas", "no replicas", "a plan needs at least one pipeline")
    seen: dict[str, str] = {}
    L = cg.num_layers
    total = 0
    for ri, r in enumerate(plan.replicas):
        if not r.stages:
            raise err(f"replicas[{ri}].stages", "empty", "give each replica at least one stage")
        expect = 0
        mb = r.stages[0].microbatch
        for si, s in enumerate(r.stages):
            p = f"replicas[{ri}].stages[{si}]"
            if s.start != expect or s.stop <= s.start:
                raise err(f"{p}.layers", f"[{s.start}, {s.stop}) does not continue from layer {expect}",
                          "stages must cover the layers in order, without gaps or overlaps")
            expect = s.stop
            if not s.devices:
                raise err(f"{p}.devices", "no devices", "assign at least one device")
            for di, d in enumerate(s.devices):
                if d.device not in cluster.device_by_id:
                    raise err(f"{p}.devices[{di}].id", f"device '{d.device}' is not in cluster '{cluster.name}'",
                              "the plan is for another cluster (or the device failed): re-plan")
                if not isinstance(d.share, int) or isinstance(d.share, bool) or d.share < 1:
                    raise err(f"{p}.devices[{di}].share", f"must be a whole number >= 1, got {d.share!r}")
                if d.device in seen:
                    raise err(f"{p}.devices[{di}].id", f"device '{d.device}' is used twice (also in {seen[d.device]})",
                              "each device serves one stage")
                seen[d.device] = p
            if s.microbatch != mb:
                raise err(f"{p}.devices", f"shares sum to {s.microbatch}, stage 0 of this replica to {mb}",
                          "every stage of a replica must split the same micro-batch")
        if expect != L:
            raise err(f"replicas[{ri}].stages", f"cover layers 0..{expect - 1}, the model has {L}",
                      "the last stage must end at the last layer")
        total += mb * plan.num_microbatches
    if total != plan.global_batch:
        raise err("global_batch", f"{plan.global_batch} != num_microbatches x micro-batch sizes = {total}",
                  "fix the shares or the number of micro-batches")
    if check_memory:
        for dev, mem in device_memory(plan, cluster, cg).items():
            cap = cluster.dtype(dev)
            if mem.total > usable_memory(cap):
                raise err(f"device {dev}", f"needs {mem.total / 2**30:.2f} GiB, {cap.name} has "
                          f"{usable_memory(cap) / 2**30:.2f} GiB usable",
                          "lower its share, use more stages, or re-plan")


def attach_context(plan: Plan, cluster: Cluster, cg: CostGraph) -> Plan:
    """Record the cluster and cost graph in the plan (and their fingerprints)."""
    plan.cluster_name = cluster.name
    plan.cluster_fingerprint = cluster.fingerprint()
    plan.cluster_spec = cluster.to_dict()
    plan.cost_graph_fingerprint = cg.fingerprint()
    plan.cost_graph_spec = cg.to_dict()
    return plan


def plan_context(plan: Plan, source: str | None = None, *, cluster: Cluster | None = None,
                 cg: CostGraph | None = None) -> tuple[Cluster, CostGraph]:
    """The cluster and cost graph of a plan: those given (a user's --cluster / --cost-graph),
    else the ones the plan carries; a plan without its cost graph gets the analytic one of
    its model."""
    source = source or plan.source or "plan"
    if cluster is None:
        if not plan.cluster_spec:
            raise SpecError(source, "cluster.spec", "the plan does not carry its cluster",
                            "pass --cluster where the command takes it, or re-plan with this hetalloc")
        cluster = cluster_from_dict(plan.cluster_spec, f"{source}#cluster")
    if cg is None:
        if plan.cost_graph_spec:
            cg = cost_graph_from_dict(plan.cost_graph_spec, f"{source}#cost_graph")
        else:
            try:
                cg = analytic_cost_graph(get_model(plan.model), plan.seq_len, plan.precision)
            except SpecError as e:  # named after the plan's fields, not the flags of 'hetalloc plan'
                raise SpecError(source, "model, seq_len, precision", e.problem, "re-run 'hetalloc plan'") from None
    return cluster, cg
