"""Plan: how a model is split over a cluster. Machine-written JSON with a schema version.

A plan has one or more pipeline replicas. Each replica is a list of stages; a stage owns
a contiguous layer range ``[start, stop)`` and is served by one or more *groups*. A group
is ``t`` devices of one type inside one node (t in 1, 2, 4, 8) that together take one
share (whole samples) of every micro-batch: with t = 1 it is one device, as in plan
schema 1; with t > 1 the devices split every layer Megatron-style (tensor parallelism)
and all see the same samples. Groups of one stage may differ in type, size and share
(one 4 x A100 group with share 6 next to one 8 x V100 group with share 4). All stages of
a replica see the same micro-batch size (the sum of the shares); the global batch is
``num_microbatches * sum over replicas of the micro-batch size``.

Per stage, ``recompute`` is 'none' or 'full' (keep only each block's input and run the
forward again inside the backward). Per plan, ``optimizer_sharding`` is 'none' or
'zero1' (the optimizer state sharded across the devices that hold the same parameters:
gradients reduce-scattered, parameters all-gathered after the step).

Gradients: the groups that hold the same layers (in any replica) synchronise them,
weighted by their shares. Tensor-parallel rank k of a group of t holds the k-th of t
slices of every split parameter; with groups of different sizes the parameters are cut
into t_max slices and slice j is reduced among one device per group (its rank
j * t / t_max), so every device takes part in t_max / t of them
(``hetalloc.evaluate.sync_groups``).

JSON (schema 2); a one-device group stays short:
    {"layers": [0, 7], "recompute": "none",
     "groups": [{"devices": ["a100/0"], "share": 5},
                {"devices": ["v100/0", "v100/1", "v100/2", "v100/3"], "share": 3}]}
Schema-1 plans (``"devices": [{"id": .., "share": ..}]``) still load: each device becomes
a group of one, recompute 'none', optimizer_sharding 'none'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import Cluster, cluster_from_dict
from .costgraph import CostGraph, analytic_cost_graph, cost_graph_from_dict
from .costs import (GRAD_SYNC, OPTIMIZER_SHARDING, OPTIMIZERS, RECOMPUTE, SCHEDULES, TP_DEGREES, MemoryBreakdown,
                    in_flight_microbatches, stage_memory, usable_memory, zero1_params)
from .errors import SpecError
from .fileio import atomic_write_json, read_json
from .models import get_model

SCHEMA_VERSION = 2
READS = (1, 2)
"""Plan schema versions this hetalloc loads."""


@dataclass(slots=True)
class Group:
    """``len(devices)`` devices of one type in one node taking ``share`` samples of every
    micro-batch together (tensor parallel when more than one). ``devices[k]`` is rank k."""

    devices: list[str]
    share: int

    @property
    def tp(self) -> int:
        """Tensor-parallel degree."""
        return len(self.devices)

    @property
    def lead(self) -> str:
        """Rank 0: the device that stands for the group where one name is needed."""
        return self.devices[0]


@dataclass(slots=True)
class Stage:
    start: int
    stop: int
    groups: list[Group]
    recompute: str = "none"

    @property
    def microbatch(self) -> int:
        return sum(g.share for g in self.groups)

    def device_ids(self) -> list[str]:
        return [d for g in self.groups for d in g.devices]

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
    optimizer_sharding: str = "none"
    """'none' or 'zero1' (see the module doc)."""

    # ---- views ----------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return max(len(r.stages) for r in self.replicas)

    def device_ids(self) -> list[str]:
        return [d for r in self.replicas for s in r.stages for g in s.groups for d in g.devices]

    def placement(self) -> dict[str, tuple[int, int]]:
        """device id -> (replica index, stage index)."""
        return {d: (ri, si) for ri, r in enumerate(self.replicas)
                for si, s in enumerate(r.stages) for g in s.groups for d in g.devices}

    def group_of(self) -> dict[str, Group]:
        """device id -> the group it belongs to."""
        return {d: g for r in self.replicas for s in r.stages for g in s.groups for d in g.devices}

    def options_used(self) -> list[str]:
        """The schema-2 options this plan uses, in words (empty for a schema-1 plan)."""
        out = []
        tps = sorted({g.tp for r in self.replicas for s in r.stages for g in s.groups} - {1})
        if tps:
            out.append("tensor parallelism (t = " + ", ".join(map(str, tps)) + ")")
        if any(s.recompute != "none" for r in self.replicas for s in r.stages):
            out.append("activation recomputation")
        if self.optimizer_sharding != "none":
            out.append(f"optimizer sharding ({self.optimizer_sharding})")
        return out

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
            "optimizer_sharding": self.optimizer_sharding,
            "replicas": [
                {"stages": [{"layers": [s.start, s.stop], "recompute": s.recompute,
                             "groups": [{"devices": list(g.devices), "share": g.share} for g in s.groups]}
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
    version = d.get("schema_version")
    if version not in READS:
        raise err("schema_version", f"unsupported version {version!r}",
                  f"this hetalloc reads versions {', '.join(map(str, READS))}; re-run 'hetalloc plan'")
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
    if not isinstance(d["replicas"], list):
        raise err("replicas", "expected a list of replicas", "re-run 'hetalloc plan'")
    replicas = []
    for ri, r in enumerate(d["replicas"]):
        if not isinstance(r, dict) or not isinstance(r.get("stages", []), list):
            raise err(f"replicas[{ri}]", "expected {stages: [...]}", "re-run 'hetalloc plan'")
        stages = []
        for si, s in enumerate(r.get("stages", [])):
            p = f"replicas[{ri}].stages[{si}]"
            if not isinstance(s, dict):
                raise err(p, "expected {layers, groups}", "re-run 'hetalloc plan'")
            layers = s.get("layers")
            if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) for x in layers)):
                raise err(f"{p}.layers", f"expected [start, stop], got {layers!r}", "give two layer indices")
            groups = _v1_groups(s, p, err) if version == 1 else _groups(s, p, err)
            stages.append(Stage(layers[0], layers[1], groups, s.get("recompute", "none")))
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
        cluster_spec=cl.get("spec"), cost_graph_spec=cg.get("spec"),
        optimizer_sharding=d.get("optimizer_sharding", "none"), source=source,
    )


def _v1_groups(s: dict, p: str, err) -> list[Group]:
    """Schema 1: every device of a stage is a group of one."""
    if not isinstance(s.get("devices", []), list):
        raise err(f"{p}.devices", "expected a list of {id, share}", "re-run 'hetalloc plan'")
    out = []
    for di, dv in enumerate(s.get("devices", [])):
        if not isinstance(dv, dict) or "id" not in dv or "share" not in dv:
            raise err(f"{p}.devices[{di}]", "expected {id, share}", "name the device and its share")
        _check_share(dv["share"], f"{p}.devices[{di}].share", err)
        out.append(Group([str(dv["id"])], dv["share"]))
    return out


def _groups(s: dict, p: str, err) -> list[Group]:
    raw = s.get("groups", [])
    if not isinstance(raw, list):
        raise err(f"{p}.groups", "expected a list of {devices, share}", "re-run 'hetalloc plan'")
    out = []
    for gi, g in enumerate(raw):
        if not isinstance(g, dict) or "devices" not in g or "share" not in g:
            raise err(f"{p}.groups[{gi}]", "expected {devices, share}", "list the group's devices and its share")
        devs = g["devices"]
        if not isinstance(devs, list) or not all(isinstance(x, str) for x in devs):
            raise err(f"{p}.groups[{gi}].devices", f"expected a list of device ids, got {devs!r}",
                      'e.g. ["a100/0", "a100/1"]')
        _check_share(g["share"], f"{p}.groups[{gi}].share", err)
        out.append(Group(list(devs), g["share"]))
    return out


def _check_share(share: Any, path: str, err) -> None:
    if isinstance(share, bool) or not isinstance(share, int) or share < 1:
        raise err(path, f"must be a whole number >= 1, got {share!r}", "re-run 'hetalloc plan'")


def load_plan(path: str | Path) -> Plan:
    d = read_json(path, missing_fix="check the path or run 'hetalloc plan -o' first", invalid_fix="regenerate the plan")
    return plan_from_dict(d, str(path))


def segments(plan: Plan) -> list[tuple[int, int, list[Group]]]:
    """Maximal layer segments [a, b) held by the same groups, with those groups (they
    synchronise the segment's gradients; with zero1 they shard its optimizer state)."""
    cuts = sorted({c for r in plan.replicas for s in r.stages for c in (s.start, s.stop)})
    return [(a, b, [g for r in plan.replicas for s in r.stages if s.start <= a and b <= s.stop for g in s.groups])
            for a, b in zip(cuts[:-1], cuts[1:])]


def mixed_tp_segments(plan: Plan) -> list[tuple[int, int, list[int]]]:
    """Layer segments held by tensor-parallel groups of different sizes, with the sizes
    (the runtime shards optimizer state, zero1 or the parameter server's, only between
    groups of one size)."""
    out = []
    for a, b, holders in segments(plan):
        sizes = sorted({g.tp for g in holders})
        if len(sizes) > 1:
            out.append((a, b, sizes))
    return out


def optimizer_params(plan: Plan, cg: CostGraph) -> dict[str, float]:
    """Parameters whose optimizer state each device keeps (and steps): its tensor-parallel
    share of its stage's layers; with zero1, of every segment divided by the number of
    groups that hold it (``hetalloc.costs.zero1_params``)."""
    out: dict[str, float] = {}
    if plan.optimizer_sharding == "zero1":
        for a, b, holders in segments(plan):
            for g in holders:
                n = zero1_params(cg.range_params(a, b, g.tp), len(holders))
                for d in g.devices:
                    out[d] = out.get(d, 0.0) + n
        return out
    for r in plan.replicas:
        for s in r.stages:
            for g in s.groups:
                n = cg.range_params(s.start, s.stop, g.tp)
                for d in g.devices:
                    out[d] = n
    return out


def device_memory(plan: Plan, cluster: Cluster, cg: CostGraph) -> dict[str, MemoryBreakdown]:
    """Memory of every device of the plan (hetalloc.costs.stage_memory: weights, gradients,
    optimizer state, the activations in flight at its stage's position in the schedule),
    with its group's tensor-parallel share, its stage's recompute choice and zero1."""
    out = {}
    opt = optimizer_params(plan, cg) if plan.optimizer_sharding != "none" else {}
    for r in plan.replicas:
        S = len(r.stages)
        for si, s in enumerate(r.stages):
            outb = cg.layers[s.stop - 1].out_act_bytes
            infl = in_flight_microbatches(plan.schedule, si, S, plan.num_microbatches)
            for g in s.groups:
                params = cg.range_params(s.start, s.stop, g.tp)
                saved = cg.range_saved_bytes(s.start, s.stop, g.tp, s.recompute)
                working = cg.range_working_bytes(s.start, s.stop, g.tp, s.recompute)
                for d in g.devices:
                    out[d] = stage_memory(params, saved, outb, g.share, infl, plan.precision, plan.optimizer,
                                          optimizer_params=opt.get(d), working_act_bytes_per_sample=working)
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
    if plan.optimizer_sharding not in OPTIMIZER_SHARDING:
        raise err("optimizer_sharding", f"unknown choice {plan.optimizer_sharding!r}",
                  f"use one of {', '.join(OPTIMIZER_SHARDING)}")
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
            if s.recompute not in RECOMPUTE:
                raise err(f"{p}.recompute", f"unknown choice {s.recompute!r}", f"use one of {', '.join(RECOMPUTE)}")
            if not s.groups:
                raise err(f"{p}.groups", "no groups", "assign at least one device")
            for gi, g in enumerate(s.groups):
                _check_group(g, f"{p}.groups[{gi}]", cluster, cg, seen, err)
            if s.recompute != "none" and not cg.supports_tp:
                raise err(f"{p}.recompute", "the cost graph does not say what recomputation keeps "
                          "(written before plan schema 2)", "re-run 'hetalloc profile', or use recompute 'none'")
            if s.microbatch != mb:
                raise err(f"{p}.groups", f"shares sum to {s.microbatch}, stage 0 of this replica to {mb}",
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
                          "lower its share, use more stages, tensor parallelism or recomputation, or re-plan")


def _check_group(g: Group, p: str, cluster: Cluster, cg: CostGraph, seen: dict[str, str], err) -> None:
    if not isinstance(g.share, int) or isinstance(g.share, bool) or g.share < 1:
        raise err(f"{p}.share", f"must be a whole number >= 1, got {g.share!r}")
    if g.tp not in TP_DEGREES:
        raise err(f"{p}.devices", f"{g.tp} devices; a tensor-parallel group has {', '.join(map(str, TP_DEGREES))}",
                  "split or merge the group")
    for di, d in enumerate(g.devices):
        if d not in cluster.device_by_id:
            raise err(f"{p}.devices[{di}]", f"device '{d}' is not in cluster '{cluster.name}'",
                      "the plan is for another cluster (or the device failed): re-plan")
        if d in seen:
            raise err(f"{p}.devices[{di}]", f"device '{d}' is used twice (also in {seen[d]})",
                      "each device serves one stage")
        seen[d] = p
    if g.tp > 1:
        first = cluster.device(g.lead)
        for di, d in enumerate(g.devices[1:], 1):
            dev = cluster.device(d)
            if dev.node != first.node:
                raise err(f"{p}.devices[{di}]", f"'{d}' is on node '{dev.node}', rank 0 '{g.lead}' on '{first.node}'",
                          "a tensor-parallel group lives inside one node")
            if dev.type != first.type:
                raise err(f"{p}.devices[{di}]", f"'{d}' is a {dev.type}, rank 0 '{g.lead}' a {first.type}",
                          "a tensor-parallel group has devices of one type")
        if not cg.supports_tp:
            raise err(f"{p}.devices", "the cost graph does not say how its layers split (written before plan "
                      "schema 2)", "re-run 'hetalloc profile', or use groups of one device")


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
