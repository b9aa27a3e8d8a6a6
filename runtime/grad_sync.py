"""Gradient synchronisation between the devices that hold the same layers.

Gradient groups are ``hetalloc.evaluate.sync_groups``: maximal layer segments held by the
same set of devices (replicas may cut the model at different layers), and with tensor
parallelism one group per parameter slice: tensor-parallel rank j of every holder group
reduces slice j (its local shards, runtime.tensor_parallel) with rank j of the others.
A rank's parameters (its local shards) are packed, segment by segment and in backward
order, into flat buckets of at most ``bucket_cap_mb``; parameters and their gradients
are views into the bucket's flat buffers, so a bucket is reduced in place without copies.
Where groups of different sizes hold a segment (t_max slices; ``sync_groups``), a rank of
a group of t < t_max takes part in t_max / t slice groups: its buckets there hold copies
of slice j of its split gradients (``runtime.tensor_parallel.get_slice``) and of its whole
replicated ones, copied in before the reduction and back after it.

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
With zero1 (the plan's ``optimizer_sharding``), whatever the algorithm: each bucket is cut
into d equal shards (d: the segment's holders; the buffers padded to a multiple of d);
its gradients are reduce-scattered (each member gets the sum of its shard), each member
steps the optimizer on its shard alone (1/d of the optimizer state), and the updated
parameters are all-gathered back (``hetalloc.costs.zero1_halves`` prices the two halves).
The losses are already scaled by 1 / (tokens of the global batch), so SUM is the exact
whole-batch gradient: the weighting by shares needs no further factor, also for uneven
shares and for shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

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
from .tensor_parallel import Layout, check_slices, get_slice, local, set_local, set_slice


@dataclass(frozen=True, slots=True)
class Segment:
    start: int
    stop: int
    ranks: tuple[int, ...]
    """Holders, ascending global ranks."""
    slice: int = 0
    """Which of ``slices`` tensor-parallel parameter slices these ranks reduce."""
    slices: int = 1


class ProcessGroups:
    """Every process group the plan's gradient sync needs, created on every rank in the
    same order (torch requires all ranks to take part in creating each group)."""

    def __init__(self, plan: Plan, rm: RankMap, cluster: Cluster, cg: CostGraph, algorithm: str):
        self.segments = [Segment(g.start, g.stop, tuple(sorted(rm.rank_of(d) for d in g.devices)), g.slice, g.slices)
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
    """param_server and zero1: (offset, numel, owner rank) per member."""
    numel: int = 0
    """Elements of its parameters (zero1 pads the flat buffers beyond)."""
    node_group: object | None = None
    """hierarchical across nodes: this rank's node members (None when alone on its node)."""
    node_leader: int = -1
    """hierarchical across nodes: the lowest rank of this node's members (-1: one all-reduce)."""
    leader_group: object | None = None
    """hierarchical across nodes: the node leaders (set on leaders only)."""
    pending: int = 0
    works: list = field(default_factory=list)
    copy: tuple[int, int] | None = None
    """Groups of different sizes: (m, q) — the bucket holds copies of slice q of m of this
    rank's gradients (parameters and gradients live elsewhere)."""
    layouts: list[Layout | None] = field(default_factory=list)
    """With ``copy``: each parameter's split layout (None: whole)."""


def flat_views(params: list[nn.Parameter], multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat buffers, parameters and gradients, in the order given; every parameter's
    data and ``.grad`` (this rank's shard of a tensor-parallel one) become views of its
    slice (gradients start at zero). A bucket is then reduced, and the optimizer steps it,
    in place without copies; the profile lays parameters out the same way to time the
    optimizer as training runs it. The buffers are zero-padded to a multiple of
    `multiple_of` elements (zero1's equal shards)."""
    numel = sum(local(p).numel() for p in params)
    padded = -(-numel // multiple_of) * multiple_of
    ref = local(params[0])
    param_flat = torch.zeros(padded, dtype=ref.dtype, device=ref.device)
    grad_flat = torch.zeros(padded, dtype=ref.dtype, device=ref.device)
    at = 0
    for p in params:
        mine = local(p)
        n = mine.numel()
        param_flat[at:at + n].copy_(mine.detach().flatten())
        set_local(p, param_flat[at:at + n].view_as(mine), grad_flat[at:at + n].view_as(mine))
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
                 bucket_cap_bytes: float, zero1: bool = False, layouts: dict[str, Layout] | None = None):
        """layouts: how tensor parallelism splits each parameter (by whole-model name;
        ``runtime.tensor_parallel.param_layouts``), needed where groups of different sizes
        hold a segment."""
        self.rank, self.algorithm, self.zero1 = rank, algorithm, zero1
        self.names = module.param_names
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[int, list[int]] = {}
        self.homes: list[torch.Tensor] = []
        """Gradient buffers of segments synchronised through copies (zeroed every step)."""
        self.armed = False
        self.next_launch = 0
        self.before_launch: Callable[[], object] | None = None
        """Called before a bucket's reduction is launched during the backward: the
        emulated slowdown holds the rank there until a device that much slower would have
        the bucket ready (runtime.config.Pace), so that the reduction is not hidden in
        the hold at the op's end."""
        layers = list(module.layers)
        homed: set[tuple[int, int]] = set()
        for seg in groups.segments:
            if rank not in seg.ranks:  # another stage's segment, or another slice of this one
                continue
            params = [p for layer in reversed(layers[seg.start - role.start:seg.stop - role.start])
                      for p in reversed(list(layer.parameters()))]
            m = seg.slices // role.tp_size  # slices of this rank's part, each reduced in its own group
            split = [(layouts or {}).get(module.param_names[id(p)]) if m > 1 else None for p in params]
            if m > 1 and (seg.start, seg.stop) not in homed:
                if layouts is None or zero1 or algorithm == "param_server":
                    raise ValueError("groups of different sizes need the parameters' layouts, and neither zero1 "
                                     "nor the parameter server")
                homed.add((seg.start, seg.stop))
                self.homes.append(flat_views(params)[1])  # parameters and gradients in place for the step
            chunk: list[nn.Parameter] = []
            chunk_split: list[Layout | None] = []
            size = 0
            for p, lay in zip(params, split):
                nbytes = local(p).numel() * local(p).element_size() // (m if lay is not None else 1)
                if chunk and size + nbytes > bucket_cap_bytes:
                    self._add_bucket(chunk, seg, groups, m, chunk_split)
                    chunk, chunk_split, size = [], [], 0
                chunk.append(p)
                chunk_split.append(lay)
                size += nbytes
            if chunk:
                self._add_bucket(chunk, seg, groups, m, chunk_split)
        for p in module.parameters():
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _add_bucket(self, params: list[nn.Parameter], seg: Segment, groups: ProcessGroups, m: int = 1,
                    layouts: list[Layout | None] | None = None) -> None:
        d = len(seg.ranks)
        for p in params:
            self.bucket_of.setdefault(id(p), []).append(len(self.buckets))
        if m > 1:  # copies of slice q of m (module doc)
            assert layouts is not None
            if any(local(p) is not p for p in params):  # this rank's group is split too: its parts must split
                for p, lay in zip(params, layouts):
                    check_slices(local(p), lay, m, self.names[id(p)])
            numel = sum(get_slice(local(p), lay, m, seg.slice % m).numel() for p, lay in zip(params, layouts))
            ref = local(params[0])
            grad_flat = torch.zeros(numel, dtype=ref.dtype, device=ref.device)
            b = Bucket(params, seg.ranks, grad_flat.new_empty(0), grad_flat, groups.get(seg.ranks), numel=numel,
                       copy=(m, seg.slice % m), layouts=layouts)
        else:
            param_flat, grad_flat = flat_views(params, d if self.zero1 else 1)
            numel = param_flat.numel()
            b = Bucket(params, seg.ranks, param_flat, grad_flat, groups.get(seg.ranks),
                       numel=sum(local(p).numel() for p in params))
        if self.zero1:
            b.shards = [(j * (numel // d), numel // d, owner) for j, owner in enumerate(seg.ranks)]
        elif self.algorithm == "param_server":
            b.shards = [(a, n, owner) for (a, n), owner in zip(_split(numel, len(seg.ranks)), seg.ranks) if n > 0]
        by_node = groups.split_by_node(seg.ranks)
        if self.algorithm == "hierarchical" and len(by_node) > 1 and not self.zero1:
            mine = next(r for r in by_node if self.rank in r)
            b.node_group, b.node_leader = groups.get(mine), mine[0]  # no node group when alone on the node
            b.leader_group = groups.get(tuple(r[0] for r in by_node)) if self.rank == mine[0] else None
        self.buckets.append(b)

    # ---- per step -------------------------------------------------------------------
    def zero_grad(self) -> None:
        for b in self.buckets:
            b.grad_flat.zero_()
        for g in self.homes:
            g.zero_()

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
        for i in self.bucket_of[id(p)]:
            self.buckets[i].pending -= 1
        while self.next_launch < len(self.buckets) and self.buckets[self.next_launch].pending == 0:
            if self.before_launch is not None:
                self.before_launch()
            self._launch(self.buckets[self.next_launch])
            self.next_launch += 1

    @staticmethod
    def _copies(b: Bucket):
        """For a copying bucket, per parameter: (its gradient's slice, its gradient, its
        layout, the slice's offset in the bucket)."""
        m, q = b.copy
        at = 0
        for p, lay in zip(b.params, b.layouts):
            grad = local(p.grad)
            piece = get_slice(grad, lay, m, q)
            yield piece, grad, lay, at
            at += piece.numel()

    def _launch(self, b: Bucket) -> None:
        if b.copy is not None:
            for piece, _, _, at in self._copies(b):
                b.grad_flat[at:at + piece.numel()].copy_(piece.reshape(-1))
        if self.zero1:
            if b.group is not None:
                a, n = self._own(b)
                b.works = [dist.reduce_scatter_single(b.grad_flat[a:a + n], b.grad_flat, group=b.group,
                                                      async_op=True)]
        elif self.algorithm == "param_server":
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
        for b in self.buckets:  # every copy went in at launch: now the sums come back
            if b.copy is not None:
                m, q = b.copy
                for piece, grad, lay, at in self._copies(b):
                    set_slice(grad, lay, m, q, b.grad_flat[at:at + piece.numel()].view_as(piece))
        self.armed = False
        times.grad_sync_s += time.perf_counter() - t0

    # ---- optimizer side -------------------------------------------------------------
    def _own(self, b: Bucket) -> tuple[int, int]:
        """zero1: (offset, numel) of this rank's shard of bucket b."""
        return next((a, n) for a, n, owner in b.shards if owner == self.rank)

    def optimizer_tensors(self, module: StageModule) -> list[torch.Tensor]:
        """What this rank's optimizer updates: its parameters (their local shards under
        tensor parallelism, aliasing the buckets), or (parameter server, zero1) the flat
        shards it owns, aliasing the bucket buffers."""
        if self.algorithm != "param_server" and not self.zero1:
            out = []
            for p in module.parameters():
                mine = local(p)
                if mine is not p:  # a distributed parameter: step its local tensor directly
                    mine.grad = local(p.grad)
                out.append(mine)
            return out
        out = []
        for b, a, n in self.owned_shards():
            t = b.param_flat[a:a + n]
            t.grad = b.grad_flat[a:a + n]
            out.append(t)
        return out

    @property
    def steps_shards(self) -> bool:
        """Whether the optimizer steps flat bucket shards (parameter server, zero1) rather
        than parameters."""
        return self.zero1 or self.algorithm == "param_server"

    def owned_shards(self) -> list[tuple[Bucket, int, int]]:
        """(bucket, offset, numel) of the shards this rank steps, in optimizer order."""
        return [(b, a, n) for b in self.buckets for a, n, owner in b.shards if owner == self.rank]

    def after_optimizer(self) -> None:
        """Parameter server: owners send the updated shards back to the other members;
        zero1: every member's updated shard is all-gathered."""
        if self.zero1:
            works = []
            for b in self.buckets:
                if b.group is not None:
                    a, n = self._own(b)
                    works.append(dist.all_gather_single(b.param_flat, b.param_flat[a:a + n], group=b.group,
                                                        async_op=True))
            for w in works:
                w.wait()
            return
        if self.algorithm != "param_server":
            return
        works = [dist.broadcast(b.param_flat[a:a + n], src=owner, group=b.group, async_op=True)
                 for b in self.buckets if b.group is not None for a, n, owner in b.shards]
        for w in works:
            w.wait()
