"""Gradient synchronisation between the devices that hold the same layers.

Gradient groups are ``hetalloc.evaluate.sync_groups``: maximal layer segments held by the
same set of devices (replicas may cut the model at different layers). A rank's
parameters are packed, segment by segment and in backward order, into flat buckets of at
most ``bucket_cap_mb``; parameters and their gradients are views into the bucket's flat
buffers, so a bucket is reduced in place without copies.

During the backward of the last micro-batch, a hook counts each bucket's ready
gradients; a full bucket is reduced at once (asynchronously, in bucket order, so every
member issues the same collectives in the same order) while backward continues.
Algorithms (the plan's ``grad_sync``):
- ``ring``: all-reduce (SUM) over the segment's group.
- ``hierarchical``: reduce to a leader per node, all-reduce among the leaders, broadcast
  inside each node (a single all-reduce when the group is on one node).
- ``param_server``: each bucket is split into one contiguous shard per member; a shard
  is reduced to its owner, the owner alone runs the optimizer on it (so optimizer state
  is sharded), then broadcasts the updated values back.
The losses are already scaled by 1 / (tokens of the global batch), so SUM is the exact
whole-batch gradient: the weighting by shares needs no further factor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.evaluate import sync_groups
from hetalloc.plan import Plan

from .metrics import StepTimes
from .models import StageModule
from .pipeline import StageRole
from .rankmap import RankMap


@dataclass(frozen=True, slots=True)
class Segment:
    start: int
    stop: int
    ranks: tuple[int, ...]
    """Holders, ascending global ranks."""


class ProcessGroups:
    """Every process group the plan's gradient sync needs, created on every rank in the
    same order (torch requires all ranks to take part in creating each group)."""

    def __init__(self, plan: Plan, rm: RankMap, cluster: Cluster, cg: CostGraph, algorithm: str):
        self.segments = [Segment(g.start, g.stop, tuple(sorted(rm.rank_of(d) for d in g.devices)))
                         for g in sync_groups(plan, cluster, cg)]
        self.node_of = rm.device_nodes
        wanted: list[tuple[int, ...]] = []
        for seg in self.segments:
            sets = [seg.ranks]
            if algorithm == "hierarchical":
                by_node = self.split_by_node(seg.ranks)
                if len(by_node) > 1:
                    sets = list(by_node) + [tuple(r[0] for r in by_node)]
            for s in sets:
                if len(s) > 1 and s not in wanted:
                    wanted.append(s)
        self.groups = {s: dist.new_group(list(s)) for s in wanted}

    def split_by_node(self, ranks: tuple[int, ...]) -> list[tuple[int, ...]]:
        nodes: dict[str, list[int]] = {}
        for r in ranks:
            nodes.setdefault(self.node_of[r], []).append(r)
        return [tuple(v) for v in nodes.values()]

    def get(self, ranks: tuple[int, ...]):
        return self.groups.get(ranks)


@dataclass
class Bucket:
    params: list[nn.Parameter]
    ranks: tuple[int, ...]
    param_flat: torch.Tensor
    grad_flat: torch.Tensor
    group: object | None
    """The segment's process group (None when this rank alone holds the segment)."""
    shards: list[tuple[int, int, int]] = field(default_factory=list)
    """param_server: (offset, numel, owner rank) per member."""
    node_group: object | None = None
    """hierarchical across nodes: this rank's node members (None when alone on its node)."""
    node_leader: int = -1
    """hierarchical across nodes: the lowest rank of this node's members (-1: one all-reduce)."""
    leader_group: object | None = None
    """hierarchical across nodes: the node leaders (set on leaders only)."""
    pending: int = 0
    works: list = field(default_factory=list)


def flat_views(params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat buffers, parameters and gradients, in the order given; every parameter's
    data and ``.grad`` become views of its slice (gradients start at zero). A bucket is
    then reduced, and the optimizer steps it, in place without copies; the profile lays
    parameters out the same way to time the optimizer as training runs it."""
    numel = sum(p.numel() for p in params)
    ref = params[0]
    param_flat = torch.empty(numel, dtype=ref.dtype, device=ref.device)
    grad_flat = torch.zeros(numel, dtype=ref.dtype, device=ref.device)
    at = 0
    for p in params:
        n = p.numel()
        param_flat[at:at + n].copy_(p.detach().flatten())
        p.data = param_flat[at:at + n].view_as(p)
        p.grad = grad_flat[at:at + n].view_as(p)
        at += n
    return param_flat, grad_flat


def _split(numel: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(numel, parts)
    out, at = [], 0
    for j in range(parts):
        n = base + (1 if j < extra else 0)
        out.append((at, n))
        at += n
    return out


class GradSync:
    """Buckets, hooks and the reductions of one rank (module doc)."""

    def __init__(self, module: StageModule, role: StageRole, groups: ProcessGroups, rank: int, algorithm: str,
                 bucket_cap_bytes: float):
        self.rank, self.algorithm = rank, algorithm
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[int, int] = {}
        self.armed = False
        self.next_launch = 0
        layers = list(module.layers)
        for seg in groups.segments:
            if not (role.start <= seg.start and seg.stop <= role.stop):
                continue
            params = [p for layer in reversed(layers[seg.start - role.start:seg.stop - role.start])
                      for p in reversed(list(layer.parameters()))]
            chunk: list[nn.Parameter] = []
            size = 0
            for p in params:
                nbytes = p.numel() * p.element_size()
                if chunk and size + nbytes > bucket_cap_bytes:
                    self._add_bucket(chunk, seg, groups)
                    chunk, size = [], 0
                chunk.append(p)
                size += nbytes
            if chunk:
                self._add_bucket(chunk, seg, groups)
        for p in module.parameters():
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _add_bucket(self, params: list[nn.Parameter], seg: Segment, groups: ProcessGroups) -> None:
        param_flat, grad_flat = flat_views(params)
        numel = param_flat.numel()
        for p in params:
            self.bucket_of[id(p)] = len(self.buckets)
        b = Bucket(params, seg.ranks, param_flat, grad_flat, groups.get(seg.ranks))
        if self.algorithm == "param_server":
            b.shards = [(a, n, owner) for (a, n), owner in zip(_split(numel, len(seg.ranks)), seg.ranks) if n > 0]
        by_node = groups.split_by_node(seg.ranks)
        if self.algorithm == "hierarchical" and len(by_node) > 1:
            mine = next(r for r in by_node if self.rank in r)
            b.node_group, b.node_leader = groups.get(mine), mine[0]  # no node group when alone on the node
            b.leader_group = groups.get(tuple(r[0] for r in by_node)) if self.rank == mine[0] else None
        self.buckets.append(b)

    # ---- per step -------------------------------------------------------------------
    def zero_grad(self) -> None:
        for b in self.buckets:
            b.grad_flat.zero_()

    def arm(self) -> None:
        """Called just before the last backward op: from now on full buckets are reduced."""
        self.armed = True
        self.next_launch = 0
        for b in self.buckets:
            b.pending = len(b.params)
            b.works = []

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        self.buckets[self.bucket_of[id(p)]].pending -= 1
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].pending == 0:
            self._launch(self.buckets[self.next_launch])
            self.next_launch += 1

    def _launch(self, b: Bucket) -> None:
        if self.algorithm == "param_server":
            if b.group is not None:
                b.works = [dist.reduce(b.grad_flat[a:a + n], dst=owner, group=b.group, async_op=True)
                           for a, n, owner in b.shards]
        elif b.node_leader != -1:
            if b.node_group is not None:
                b.works = [dist.reduce(b.grad_flat, dst=b.node_leader, group=b.node_group, async_op=True)]
        elif b.group is not None:
            b.works = [dist.all_reduce(b.grad_flat, group=b.group, async_op=True)]

    def finish(self, times: StepTimes) -> None:
        """After the last backward: reduce what is left and wait for every reduction."""
        t0 = time.perf_counter()
        for b in self.buckets[self.next_launch:]:
            self._launch(b)
        self.next_launch = len(self.buckets)
        for b in self.buckets:
            for w in b.works:
                w.wait()
            b.works = []
            if b.node_leader != -1:  # hierarchical across nodes: leaders, then inside the node
                if b.leader_group is not None:
                    dist.all_reduce(b.grad_flat, group=b.leader_group)
                if b.node_group is not None:
                    dist.broadcast(b.grad_flat, src=b.node_leader, group=b.node_group)
        self.armed = False
        times.grad_sync_s += time.perf_counter() - t0

    # ---- optimizer side -------------------------------------------------------------
    def optimizer_tensors(self, module: StageModule) -> list[torch.Tensor]:
        """What this rank's optimizer updates: its parameters, or (parameter server) the
        flat shards it owns, aliasing the bucket buffers."""
        if self.algorithm != "param_server":
            return [p for p in module.parameters()]
        out = []
        for b in self.buckets:
            for a, n, owner in b.shards:
                if owner == self.rank:
                    t = b.param_flat[a:a + n]
                    t.grad = b.grad_flat[a:a + n]
                    out.append(t)
        return out

    def optimizer_layout(self, module: StageModule) -> list[list[tuple[str, int, int, int]]]:
        """What each tensor of ``optimizer_tensors`` holds (same order), as runs of
        whole-model parameters: (name, offset in the flattened parameter, elements, offset
        in the tensor). Checkpoints keep optimizer state by name with it (runtime.reshard)."""
        names = module.param_names
        if self.algorithm != "param_server":
            return [[(names[id(p)], 0, p.numel(), 0)] for p in module.parameters()]
        out = []
        for b in self.buckets:
            starts, at = [], 0
            for p in b.params:  # flat_views lays the bucket out in this order
                starts.append(at)
                at += p.numel()
            for a, n, owner in b.shards:
                if owner != self.rank:
                    continue
                runs = []
                for p, s0 in zip(b.params, starts):
                    lo, hi = max(a, s0), min(a + n, s0 + p.numel())
                    if lo < hi:
                        runs.append((names[id(p)], lo - s0, hi - lo, lo - a))
                out.append(runs)
        return out

    def after_optimizer(self) -> None:
        """Parameter server: owners send the updated shards back to the other members."""
        if self.algorithm != "param_server":
            return
        works = [dist.broadcast(b.param_flat[a:a + n], src=owner, group=b.group, async_op=True)
                 for b in self.buckets if b.group is not None for a, n, owner in b.shards]
        for w in works:
            w.wait()
