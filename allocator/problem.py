"""The planner's model: device classes, count-level plans and their exact objective.

A *count-level plan* fixes the number of identical replicas R, the number of
micro-batches M, and for every stage its layer range and how many devices of each
*device class* serve it (the same in every replica). A device class is one device type
in one group of interchangeable nodes (same GPUs, same links). Per-device shares are
then the best integer split of the per-replica micro-batch b = B / (R M); it is found
exactly (a device's time is monotone in its share).

The model's objective (what the ILP minimises and the brute-force test enumerates):

    (M - 1) * max_s t_s + sum_s t_s + max_s (AR_s + max over its devices of opt)

- t_s: the slowest device of stage s on one micro-batch, forward + backward compute
  plus its blocking sends (activations forward, input gradients backward) at its
  class's *p2p bandwidth*: the path out of its node (its NIC path) when the cluster
  has several nodes, its intra-node link otherwise. The planner does not know which
  node the neighbouring stage lands on; the prediction of the placed plan does.
- the pipeline term is the flow-shop time of identical micro-batches (exact for GPipe
  with proportional forward/backward costs, an upper bound for 1F1B);
- AR_s: ring all-reduce of the stage's gradients among its R * n_s devices; inside one
  node when all of them are in a single-node group, else over the slowest NIC path
  among the groups it uses (hetalloc.costs.ring_allreduce_time);
- opt: optimizer step of the stage's parameters on that device type;
- memory: every device's weights, gradients, optimizer state and its share's saved
  activations for the micro-batches in flight at its stage position must fit
  (hetalloc.costs.stage_memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import numpy as np

from hetalloc.catalog import DeviceType
from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.schedule import flow_shop_time
from hetalloc.costs import (TP_DEGREES, grad_bytes_per_param, in_flight_microbatches, max_share_for_memory,
                            max_shares_for_memory, param_bytes, usable_memory,
                            optimizer_time, ring_allreduce_time, tp_comm_time, zero1_halves, zero1_params)


@dataclass(frozen=True)
class NodeGroup:
    index: int
    nodes: tuple[str, ...]
    intra_bw: float
    intra_lat: float
    inter_bw: float
    """Bandwidth of the path from one of its nodes through its NIC (min(intra, NIC))."""
    inter_lat: float

    @property
    def single_node(self) -> bool:
        return len(self.nodes) == 1


@dataclass(frozen=True)
class DeviceClass:
    """Devices of one type in one node group, in units of ``tp`` devices of one node (a
    tensor-parallel group; 1: single devices). The planner's "devices" of a class are its
    units: counts, shares and budgets are per unit."""

    index: int
    dtype: DeviceType
    group: int
    devices: tuple[str, ...]
    """Device ids in cluster order (node by node)."""
    p2p_bw: float
    p2p_lat: float
    tp: int = 1
    tp_bw: float = math.inf
    """Link between two devices of a unit (its tensor-parallel all-reduces)."""
    tp_lat: float = 0.0

    @property
    def count(self) -> int:
        return len(self.devices) // self.tp

    @cached_property
    def units(self) -> list[tuple[str, ...]]:
        """The tensor-parallel groups, consecutive devices of one node each."""
        t = self.tp
        return [self.devices[k:k + t] for k in range(0, len(self.devices), t)]

    @property
    def name(self) -> str:
        return f"{self.dtype.name}@g{self.group}" + (f"x{self.tp}" if self.tp > 1 else "")


def total_state_bytes(cg: CostGraph, optimizer: str) -> float:
    """Bytes of one copy of the model's weights, gradients and optimizer state."""
    return cg.total_params * param_bytes(cg.precision, optimizer).total


def total_usable_memory(cluster: Cluster) -> float:
    return sum(usable_memory(cluster.device_types[d.type]) for d in cluster.devices)


def tp_priced(cg: CostGraph, type_name: str) -> bool:
    """Can the cost graph price a layer of this type split over several devices? Analytic
    types yes; measured ones only with a measured (or given) ``tp_efficiency``."""
    return type_name not in cg.tables or type_name in cg.tp_efficiency or "*" in cg.tp_efficiency


def divisors(n: int) -> list[int]:
    """The divisors of n in increasing order (trial division up to sqrt(n))."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def unit_degree(per_node: int, tp: int) -> int:
    """Tensor-parallel degree of a type with ``per_node`` devices in each node when the plan
    asks for up to ``tp``: the largest degree of ``TP_DEGREES`` <= tp dividing per_node (no
    device of the type is left out)."""
    return max(t for t in TP_DEGREES if t <= tp and per_node % t == 0)


def device_classes(cluster: Cluster, group_identical_nodes: bool = True, tp: int = 1,
                   tp_ok: Callable[[str], bool] | None = None) -> tuple[list[NodeGroup], list[DeviceClass]]:
    """Split the cluster into node groups and device classes (type x group), each class in
    units of up to ``tp`` devices of one node (``unit_degree``; only types ``tp_ok`` accepts
    when given)."""
    by_sig: dict[tuple, list[str]] = {}
    for n in cluster.nodes:
        key = n.signature() if group_identical_nodes else (n.name,)
        by_sig.setdefault(key, []).append(n.name)
    multi = len(cluster.nodes) > 1
    groups: list[NodeGroup] = []
    classes: list[DeviceClass] = []
    for gi, names in enumerate(by_sig.values()):
        n0 = cluster.node_by_name[names[0]]
        intra = n0.intra
        if n0.nic is not None:
            inter_bw = min(intra.bandwidth_bytes_per_s, n0.nic.bandwidth_bytes_per_s)
            inter_lat = max(intra.latency_s, n0.nic.latency_s)
        else:
            inter_bw, inter_lat = intra.bandwidth_bytes_per_s, intra.latency_s
        groups.append(NodeGroup(gi, tuple(names), intra.bandwidth_bytes_per_s, intra.latency_s, inter_bw, inter_lat))
        types = []
        for name in names:
            for d in cluster.node_by_name[name].devices:
                if d.type not in types:
                    types.append(d.type)
        for t in types:
            devs = tuple(d.id for name in names for d in cluster.node_by_name[name].devices if d.type == t)
            bw, lat = (inter_bw, inter_lat) if multi else (intra.bandwidth_bytes_per_s, intra.latency_s)
            deg = unit_degree(len(devs) // len(names), tp if tp_ok is None or tp_ok(t) else 1)
            tp_bw, tp_lat = math.inf, 0.0
            if deg > 1:
                link = cluster.path(devs[0], devs[1])  # as hetalloc.evaluate.group_tp_times
                tp_bw, tp_lat = link.bandwidth_bytes_per_s, link.latency_s
            classes.append(DeviceClass(len(classes), cluster.device_types[t], gi, devs, bw, lat, deg, tp_bw, tp_lat))
    return groups, classes


@dataclass
class Problem:
    """Everything fixed about a planning request."""

    cluster: Cluster
    cg: CostGraph
    global_batch: int
    schedule: str = "1f1b"
    optimizer: str = "adamw"
    group_identical_nodes: bool = True
    max_replicas: int | None = None
    microbatch_counts: list[int] | None = None
    """Restrict M to these values (None: every divisor)."""
    replica_counts: list[int] | None = None
    tp: int = 1
    """Largest tensor-parallel degree of a unit (``device_classes``); 1: no tensor parallelism."""
    recompute: str = "auto"
    """Per-stage recomputation: auto (each stage chooses), none, or full."""
    tp_priced_only: bool = False
    """Units of more than one device only for types whose split times the cost graph can
    price: analytic ones, or measured ones with a measured ``tp_efficiency`` (a profile
    that never timed a split layer says nothing about it)."""
    optimizer_sharding: str = "none"
    """none, or zero1: each stage's optimizer state sharded over the R x units that hold its
    layers (so a stage's memory depends on how many units serve it), and only stages whose
    units have one tensor-parallel size (what the runtime shards)."""

    def __post_init__(self) -> None:
        if self.tp > 1 and not self.cg.supports_tp:
            raise ValueError("this cost graph does not say how its layers split (tensor parallelism)")

    @cached_property
    def groups_and_classes(self) -> tuple[list[NodeGroup], list[DeviceClass]]:
        return device_classes(self.cluster, self.group_identical_nodes, self.tp,
                              (lambda t: tp_priced(self.cg, t)) if self.tp_priced_only else None)

    @cached_property
    def recompute_options(self) -> tuple[str, ...]:
        """Recomputation choices of a stage (full only where some layer can be recomputed)."""
        can = any(l.checkpoint_bytes > 0 for l in self.cg.layers)
        if self.recompute == "auto":
            return ("none", "full") if can else ("none",)
        if self.recompute == "full" and not can:
            return ("none",)
        return (self.recompute,)

    @property
    def groups(self) -> list[NodeGroup]:
        return self.groups_and_classes[0]

    @property
    def classes(self) -> list[DeviceClass]:
        return self.groups_and_classes[1]

    @property
    def L(self) -> int:
        return self.cg.num_layers

    @property
    def precision(self) -> str:
        return self.cg.precision

    @cached_property
    def interchangeable_blocks(self) -> bool:
        """Are all layers between the first and the last identical (same sizes, same times
        on every device type)? Then inner stages of equal length cost the same anywhere."""
        inner = self.cg.layers[1:-1]
        if len(inner) < 2 or any(l.kind != inner[0].kind for l in inner):
            return False
        key = lambda l: (l.params, l.fwd_flops, l.out_act_bytes, l.saved_act_bytes)  # noqa: E731
        if any(key(l) != key(inner[0]) for l in inner):
            return False
        for t in self.cg.tables.values():
            rows = list(zip(t.fwd_s[1:-1], t.bwd_s[1:-1]))
            if any(r != rows[0] for r in rows):
                return False
        return True

    def candidates(self) -> list[tuple[int, int]]:
        """(R, M) pairs: R identical replicas, M micro-batches, R * M divides B."""
        return list(self._candidates)

    @cached_property
    def _candidates(self) -> tuple[tuple[int, int], ...]:
        B = self.global_batch
        total = sum(c.count for c in self.classes)
        divs = divisors(B)
        out = []
        for R in divs:
            if R > total or (self.max_replicas and R > self.max_replicas):
                break
            if self.replica_counts and R not in self.replica_counts:
                continue
            if not any(c.count // R for c in self.classes):
                continue
            out.extend((R, M) for M in divs if (B // R) % M == 0 and M <= B // R
                       and (not self.microbatch_counts or M in self.microbatch_counts))
        return tuple(out)

    # ---- per-layer sizes (prefix sums) -----------------------------------------------------
    @cached_property
    def _prefix(self) -> tuple[np.ndarray, np.ndarray]:
        params = np.concatenate([[0], np.cumsum([l.params for l in self.cg.layers])])
        saved = np.concatenate([[0.0], np.cumsum([l.saved_act_bytes for l in self.cg.layers])])
        return params, saved

    def params(self, i: int, j: int) -> int:
        return int(self._prefix[0][j] - self._prefix[0][i])

    def saved(self, i: int, j: int) -> float:
        return float(self._prefix[1][j] - self._prefix[1][i])

    def out_bytes(self, j: int) -> float:
        """Activation bytes per sample leaving layer j-1 (the boundary at j)."""
        return self.cg.layers[j - 1].out_act_bytes

    @cached_property
    def state_fits(self) -> bool:
        """Can the cluster hold the model's weights, gradients and optimizer state at all?
        Every parameter keeps them on some device in every plan (tensor parallelism and
        zero1 split them, never below one copy), activations aside."""
        return total_state_bytes(self.cg, self.optimizer) <= total_usable_memory(self.cluster)

    @property
    def zero1(self) -> bool:
        return self.optimizer_sharding == "zero1"

    def kmem(self, c: DeviceClass, i: int, j: int, in_flight: int, recompute: str = "none", dp: int = 1) -> int:
        """Largest share a unit of class c can take holding layers [i, j) (hetalloc.costs,
        as hetalloc.plan.device_memory computes it for a placed plan); ``dp``: units that
        hold the layers (all replicas), which shard the optimizer state under zero1."""
        key = (c.index, i, j, in_flight, recompute, dp if self.zero1 else 1)
        k = self._kmem_memo.get(key)
        if k is None:
            k = self._kmem_memo[key] = self._kmem(c, i, j, in_flight, recompute, dp)
        return k

    @cached_property
    def _kmem_memo(self) -> dict[tuple, int]:
        return {}

    def _kmem(self, c: DeviceClass, i: int, j: int, in_flight: int, recompute: str, dp: int) -> int:
        params, saved, working = self._range_bytes(i, j, c.tp, recompute)
        opt = zero1_params(params, dp) if self.zero1 else None
        if c.tp == 1 and recompute == "none":
            return max_share_for_memory(params, saved, self.out_bytes(j), in_flight,
                                        self.precision, self.optimizer, c.dtype, optimizer_params=opt)
        return max_share_for_memory(params, saved, self.out_bytes(j), in_flight, self.precision, self.optimizer,
                                    c.dtype, optimizer_params=opt, working_act_bytes_per_sample=working)

    def kmem_grid(self, c: DeviceClass, ranges: list[tuple[int, int]], in_flight: np.ndarray, dp: np.ndarray,
                  recompute: str = "none") -> np.ndarray:
        """``kmem`` of many ranges (axis 0) at every in-flight count (axis 1) and number of
        units holding the layers (axis 2; its length is 1 without zero1) at once; shares
        beyond 2^30 read as 2^30."""
        by = np.array([self._range_bytes(i, j, c.tp, recompute) for i, j in ranges]).reshape(-1, 3, 1, 1)
        params, saved, working = by[:, 0], by[:, 1], by[:, 2]
        out = np.array([self.out_bytes(j) for _, j in ranges]).reshape(-1, 1, 1)
        infl = np.asarray(in_flight, dtype=np.float64).reshape(1, -1, 1)
        opt = zero1_params(params, np.asarray(dp).reshape(1, 1, -1)) if self.zero1 else None
        return max_shares_for_memory(params, saved, out, infl, self.precision, self.optimizer, c.dtype,
                                     optimizer_params=opt, working_act_bytes_per_sample=working)

    def _range_bytes(self, i: int, j: int, tp: int, recompute: str) -> tuple[float, float, float]:
        """(parameters of one rank, saved bytes per sample, working bytes per sample) of
        layers [i, j) split tp ways (the cost graph's sums, remembered per range)."""
        key = (i, j, tp, recompute)
        hit = self._bytes_memo.get(key)
        if hit is None:
            if tp == 1 and recompute == "none":
                hit = (self.params(i, j), self.saved(i, j), 0.0)
            else:
                cg = self.cg
                hit = (self.rank_params(i, j, tp), cg.range_saved_bytes(i, j, tp, recompute),
                       cg.range_working_bytes(i, j, tp, recompute))
            self._bytes_memo[key] = hit
        return hit

    @cached_property
    def _bytes_memo(self) -> dict[tuple, tuple[float, float, float]]:
        return {}

    def most_units(self, budget: list[int], R: int = 1) -> int:
        """The most units (all replicas) that can hold one range: the largest zero1 degree."""
        return R * sum(budget)

    def recompute_helps(self, budget: list[int], i: int, j: int, b: int, in_flight: int, dp: int = 1) -> bool:
        """Can recomputation make a stage on [i, j) faster? Only where memory caps some
        usable class's share below b at the deepest position (else a recomputing stage has
        the same caps and a longer backward: dominated). ``dp``: the fewest units that may
        hold it (zero1's smallest saving)."""
        return any(budget[c.index] > 0 and self.kmem(c, i, j, in_flight, "none", dp) < b for c in self.classes)

    def opt_time(self, c: DeviceClass, i: int, j: int, dp: int = 1) -> float:
        params = self.rank_params(i, j, c.tp)
        if self.zero1:
            params = zero1_params(params, dp)
        return optimizer_time(params, c.dtype, self.precision, self.optimizer)

    def zero1_mixes(self, counts: tuple[int, ...]) -> bool:
        """Does a stage of these counts mix tensor-parallel sizes (not a zero1 stage)?"""
        return self.zero1 and len({c.tp for c in self.classes if counts[c.index]}) > 1

    def rank_params(self, i: int, j: int, tp: int) -> float:
        if tp == 1:
            return self.params(i, j)
        key = (i, j, tp)
        hit = self._params_memo.get(key)
        if hit is None:
            hit = self._params_memo[key] = self.cg.range_params(i, j, tp)
        return hit

    @cached_property
    def _prefix_memo(self) -> dict[tuple[int, int, str], np.ndarray]:
        """StageTimer._prefix's arrays, per (class, share, recomputation)."""
        return {}

    @cached_property
    def _rows_memo(self) -> dict[tuple[int, str], np.ndarray]:
        """StageTimer's prefix arrays of shares 1.. as rows, per (class, recomputation)."""
        return {}

    @cached_property
    def _share_memo(self) -> dict[tuple, np.ndarray]:
        """allocator.problem.StageTimer.share_times' values, per (class, range, recomputation)."""
        return {}

    @cached_property
    def _tail_memo(self) -> dict[tuple, float]:
        """allocator.problem.stage_tail's values, per (range, units in all, classes used)."""
        return {}

    @cached_property
    def _params_memo(self) -> dict[tuple[int, int, int], float]:
        return {}

    def grad_bytes(self, i: int, j: int, tp: int = 1) -> float:
        """Gradient bytes of one parameter slice of layers [i, j) (1/tp of the split ones)."""
        return self.rank_params(i, j, tp) * grad_bytes_per_param(self.precision)


class StageTimer:
    """Unit times f_c(range, k) for one per-replica micro-batch size b."""

    def __init__(self, prob: Problem, b: int):
        self.prob, self.b = prob, b
        L = prob.L
        # prefix arrays (L+1) of fwd+bwd compute at share k, per (class, k, recompute)
        # (a unit's times do not depend on the micro-batch size: the prefix arrays are the
        # space's, shared by its timers)
        self._px: dict[tuple[int, int, str], np.ndarray] = prob._prefix_memo
        self._rows: dict[tuple[int, str], np.ndarray] = prob._rows_memo  # per (class, recompute): _prefix of k = 1.. as rows
        self.memo: dict = {}
        """What the builds at this micro-batch size share (allocator.columns._grid)."""
        self._out = np.array([0.0] + [l.out_act_bytes for l in prob.cg.layers])  # out_bytes at boundary j = _out[j]
        self.L = L
        layers = prob.cg.layers
        self._ckpt = np.array([l.checkpoint_bytes > 0 for l in layers], dtype=float)
        if any(c.tp > 1 for c in prob.classes):  # prefix sums of tp_allreduces' counts and bytes
            nf = np.array([l.tp_allreduces_fwd for l in layers], dtype=float)
            bf = np.array([l.tp_allreduces_fwd * l.tp_allreduce_bytes for l in layers], dtype=float)
            nb = np.array([l.tp_allreduces_bwd for l in layers], dtype=float)
            bb = np.array([l.tp_allreduces_bwd * l.tp_allreduce_bytes for l in layers], dtype=float)
            cum = lambda a: np.concatenate([[0.0], np.cumsum(a)])  # noqa: E731
            self._tp = {"none": (cum(nf), cum(bf), cum(nb), cum(bb)),
                        "full": (cum(nf), cum(bf), cum(nb + nf * self._ckpt), cum(bb + bf * self._ckpt))}

    def _prefix(self, c: DeviceClass, k: int, recompute: str) -> np.ndarray:
        key = (c.index, k, recompute)
        px = self._px.get(key)
        if px is None:
            f, b = self.prob.cg.layer_times(c.dtype, k, c.tp)
            per = f + b + (f * self._ckpt if recompute == "full" else 0.0)
            px = self._px[key] = np.concatenate([[0.0], np.cumsum(per)])
        return px

    def _terms(self, c: DeviceClass, I, J, k, compute, recompute: str):
        """The unit time's terms after its compute, in one place for ``time``, ``times`` and
        ``share_times``: the ops' fixed cost (as CostGraph.range_time), the tensor-parallel
        all-reduces (hetalloc.costs.tp_comm_time) and the blocking sends in front and behind
        (module doc of allocator.problem). I, J, k: numbers or arrays (broadcast)."""
        t = compute + 2 * c.dtype.op_overhead_s
        if c.tp > 1:
            nf, bf, nb, bb = self._tp[recompute]
            for n, by in ((nf, bf), (nb, bb)):
                t = t + tp_comm_time(np.rint(n[J] - n[I]), (by[J] - by[I]) * k, c.tp, c.tp_bw, c.tp_lat)
        t = t + np.where(J < self.L, c.p2p_lat + k * self._out[np.minimum(J, self.L)] / c.p2p_bw, 0.0)
        return t + np.where(I > 0, c.p2p_lat + k * self._out[I] / c.p2p_bw, 0.0)

    def time(self, c: DeviceClass, i: int, j: int, k: int, recompute: str = "none") -> float:
        """Seconds for a unit of class c to run layers [i, j) forward and backward on k
        samples: compute (CostGraph.range_time, with recomputation's extra forward) and
        ``_terms``."""
        px = self._prefix(c, k, recompute)
        return float(self._terms(c, i, j, k, px[j] - px[i], recompute))

    def share_times(self, c: DeviceClass, i: int, j: int, kmax: int, recompute: str = "none") -> np.ndarray:
        """``time`` of range [i, j) at every share k = 1..kmax at once. (A unit's time does
        not depend on the micro-batch size: remembered per space, for every timer.)"""
        if kmax < 1:
            return np.zeros(0)
        memo = self.prob._share_memo
        key = (c.index, i, j, recompute)
        hit = memo.get(key)
        if hit is not None and len(hit) >= kmax:
            return hit[:kmax]
        t = self._share_times(c, i, j, kmax, recompute)
        memo[key] = t
        return t

    def fetch_shares(self, c: DeviceClass, ranges: list[tuple[int, int]], kmax: list[int],
                     recompute: str = "none") -> None:
        """Remember ``share_times`` of many ranges (range s up to share kmax[s]) with one
        ``share_matrix`` (the same values, elementwise: a build asks for every range)."""
        memo = self.prob._share_memo
        todo = [(i, j) for (i, j), k in zip(ranges, kmax)
                if k >= 1 and len(memo.get((c.index, i, j, recompute), ())) < k]
        if len(todo) < 2:
            return
        top = max(kmax)
        T = self.share_matrix(c, np.array([i for i, _ in todo]), np.array([j for _, j in todo]), top, recompute)
        for s, (i, j) in enumerate(todo):
            memo[(c.index, i, j, recompute)] = np.ascontiguousarray(T[:, s])

    def _share_times(self, c: DeviceClass, i: int, j: int, kmax: int, recompute: str) -> np.ndarray:
        rows = self._rows.get((c.index, recompute))
        if rows is None or len(rows) < kmax:
            start = 0 if rows is None else len(rows)
            more = [self._prefix(c, k, recompute) for k in range(start + 1, max(kmax, min(2 * start, self.b)) + 1)]
            rows = np.vstack(([rows] if rows is not None else []) + [np.array(more)])
            self._rows[(c.index, recompute)] = rows
        k = np.arange(1, kmax + 1, dtype=np.float64)
        return self._terms(c, i, j, k, rows[:kmax, j] - rows[:kmax, i], recompute)

    def share_matrix(self, c: DeviceClass, I: np.ndarray, J: np.ndarray, kmax: int,
                     recompute: str = "none") -> np.ndarray:
        """``share_times`` of many ranges [I, J) at once: row k - 1 holds share k."""
        self._share_times(c, 0, 1, kmax, recompute)  # (the prefix rows up to kmax)
        rows = self._rows[(c.index, recompute)][:kmax]
        k = np.arange(1, kmax + 1, dtype=np.float64)[:, None]
        return self._terms(c, I[None, :], J[None, :], k, rows[:, J] - rows[:, I], recompute)

    def times(self, c: DeviceClass, I: np.ndarray, J: np.ndarray, k: int, recompute: str = "none") -> np.ndarray:
        """``time`` of many ranges [I, J) at once."""
        px = self._prefix(c, k, recompute)
        return self._terms(c, I, J, k, px[J] - px[I], recompute)




# ---- count-level plans ------------------------------------------------------------------------

@dataclass
class CountStage:
    start: int
    stop: int
    counts: tuple[int, ...]
    """Units of each class per replica."""
    recompute: str = "none"


@dataclass
class CountPlan:
    R: int
    M: int
    stages: list[CountStage]
    objective_s: float = math.inf
    stage_times_s: list[float] = field(default_factory=list)
    shares: list[list[list[int]]] = field(default_factory=list)
    """shares[stage][class] = share of each device of that class (per replica)."""
    tail_s: float = 0.0


def in_flight(prob: Problem, stage: int, num_stages: int, M: int) -> int:
    return in_flight_microbatches(prob.schedule, stage, num_stages, M)


def best_shares(prob: Problem, timer: StageTimer, i: int, j: int, counts: tuple[int, ...], infl: int,
                recompute: str = "none", R: int = 1) -> tuple[float, list[list[int]]] | None:
    """Exact min-max split of b samples over the stage's devices (each >= 1 sample).

    Returns (stage time, shares per class) or None if the devices cannot take the
    micro-batch within memory (R: replicas, for zero1's sharding degree)."""
    b = timer.b
    classes = prob.classes
    ndev = sum(counts)
    if ndev == 0 or ndev > b:
        return None
    caps = {}
    for c in classes:
        if counts[c.index]:
            km = min(b, prob.kmem(c, i, j, infl, recompute, R * ndev))
            if km < 1:
                return None
            caps[c.index] = km
    if sum(counts[ci] * caps[ci] for ci in caps) < b:
        return None
    left = b - ndev
    if left > GREEDY_MAX_STEPS:
        shares = _threshold_shares(timer, classes, i, j, counts, caps, left, recompute)
    else:
        shares = _greedy_shares(timer, classes, i, j, counts, caps, left, recompute)
    t = max(timer.time(classes[ci], i, j, k, recompute) for ci in shares for k in set(shares[ci]))
    return t, [sorted(shares.get(c.index, []), reverse=True) for c in classes]


GREEDY_MAX_STEPS = 48
"""best_shares hands out up to this many samples one by one; more are placed by a
threshold search with the same result (one heuristic on fleet-1024 x GPT-2 XL spent 28 s
handing out samples one by one, 5 s with the search)."""


def _greedy_shares(timer: StageTimer, classes: list[DeviceClass], i: int, j: int, counts: tuple[int, ...],
                   caps: dict[int, int], left: int, recompute: str = "none") -> dict[int, list[int]]:
    """Every device starts with one sample; each further sample goes to the device that
    would finish it soonest (ties: lower class index, then lower device index). Optimal for
    min-max with times that do not fall as the share grows."""
    import heapq
    shares = {ci: [1] * counts[ci] for ci in caps}
    heap = []
    for ci in caps:
        if caps[ci] > 1:
            t2 = timer.time(classes[ci], i, j, 2, recompute)  # devices of a class are identical
            heap.extend((t2, ci, d) for d in range(counts[ci]))
    heapq.heapify(heap)
    while left > 0:
        t, ci, d = heapq.heappop(heap)
        shares[ci][d] += 1
        left -= 1
        k = shares[ci][d]
        if k < caps[ci]:
            heapq.heappush(heap, (timer.time(classes[ci], i, j, k + 1, recompute), ci, d))
    return shares


def within(time_of: Callable[[int, int], float], ci: int, first: int, cap: int, t: float,
           strict: bool = False) -> int:
    """How many shares k in first..cap of class ci run within t (< t if strict); the times
    time_of(ci, k) do not fall as k grows (binary search)."""
    lo, hi = first, cap
    while lo <= hi:
        mid = (lo + hi) // 2
        v = time_of(ci, mid)
        if v < t or (not strict and v == t):
            lo = mid + 1
        else:
            hi = mid - 1
    return lo - first


def least_time(time_of: Callable[[int, int], float], classes: dict[int, tuple[int, int, int]], need: int,
               limit: float = math.inf) -> float:
    """The smallest time t = time_of(ci, k) at which the units can take ``need`` samples:
    sum over classes of (units) x (shares k in first..cap running within t) >= need.
    ``classes``: ci -> (first, cap, units). inf if none is at most ``limit``. Binary
    searches over the shares: a few hundred time evaluations for millions of samples."""

    def enough(t: float) -> bool:
        return sum(n * within(time_of, ci, first, cap, t) for ci, (first, cap, n) in classes.items()) >= need

    best = math.inf
    for ci, (first, cap, _) in classes.items():  # each class's least entry that suffices; t is the least
        if cap < first or not enough(time_of(ci, cap)):
            continue
        lo, hi = first, cap
        while lo < hi:
            mid = (lo + hi) // 2
            if enough(time_of(ci, mid)):
                hi = mid
            else:
                lo = mid + 1
        t = time_of(ci, lo)
        if t <= min(limit, best):
            best = t
    return best


def _threshold_shares(timer: StageTimer, classes: list[DeviceClass], i: int, j: int, counts: tuple[int, ...],
                      caps: dict[int, int], left: int, recompute: str = "none") -> dict[int, list[int]]:
    """The greedy's result without its steps. The greedy takes, in (time, class, device)
    order, the cheapest `left` of the entries (time of a device's k-th sample, k = 2..cap);
    devices of a class are identical. So: find the smallest time t* at which enough entries
    cost <= t* (binary searches over k, times non-decreasing in k), give every device the
    entries cheaper than t*, and hand the rest out at t* in class, then device, order."""

    def time_of(ci: int, k: int) -> float:
        return timer.time(classes[ci], i, j, k, recompute)

    t_star = least_time(time_of, {ci: (2, caps[ci], counts[ci]) for ci in caps}, left)

    def upto(ci: int, t: float, strict: bool) -> int:
        return within(time_of, ci, 2, caps[ci], t, strict)

    shares = {}
    rest = left
    for ci in caps:
        below = upto(ci, t_star, True)
        shares[ci] = [1 + below] * counts[ci]
        rest -= counts[ci] * below
    for ci in sorted(caps):  # at t*: a device takes all its entries of that time before the next
        at = upto(ci, t_star, False) - upto(ci, t_star, True)
        for d in range(counts[ci]):
            if rest <= 0:
                break
            take = min(at, rest)
            shares[ci][d] += take
            rest -= take
    return shares


def stage_tail(prob: Problem, R: int, i: int, j: int, counts: tuple[int, ...]) -> float:
    """Gradient all-reduce of the stage's group plus the slowest optimizer step in it."""
    n = R * sum(counts)  # one member per unit in each parameter slice's group (hetalloc.evaluate.sync_groups)
    # (it depends on which classes serve the stage and how many units in all: remembered)
    key = (i, j, n, tuple(x > 0 for x in counts))
    hit = prob._tail_memo.get(key)
    if hit is None:
        hit = prob._tail_memo[key] = _stage_tail(prob, n, i, j, counts)
    return hit


def _stage_tail(prob: Problem, n: int, i: int, j: int, counts: tuple[int, ...]) -> float:
    used = [c for c in prob.classes if counts[c.index]]
    slices = max(c.tp for c in used)
    groups = {c.group for c in used}
    if len(groups) == 1 and prob.groups[next(iter(groups))].single_node:
        g = prob.groups[next(iter(groups))]
        bw, lat = g.intra_bw, g.intra_lat
    else:
        bw = min(prob.groups[g].inter_bw for g in groups)
        lat = max(prob.groups[g].inter_lat for g in groups)
    ar = ring_allreduce_time(prob.grad_bytes(i, j, slices), n, bw, lat)
    if prob.zero1:  # reduce-scatter before the step, all-gather after it
        ar = sum(zero1_halves(ar))
    return ar + max(prob.opt_time(c, i, j, n) for c in used)


def evaluate_counts(prob: Problem, plan: CountPlan, timer: StageTimer | None = None) -> CountPlan:
    """Fill in shares, stage times and the model objective (inf if infeasible)."""
    b = prob.global_batch // (plan.R * plan.M)
    timer = timer or StageTimer(prob, b)
    S = len(plan.stages)
    times, shares, tail = [], [], 0.0
    for si, s in enumerate(plan.stages):
        for c in prob.classes:
            if plan.R * s.counts[c.index] > 0 and c.count < plan.R * sum(
                    st.counts[c.index] for st in plan.stages):
                plan.objective_s = math.inf
                return plan
        if prob.zero1_mixes(s.counts):
            plan.objective_s = math.inf
            return plan
        res = best_shares(prob, timer, s.start, s.stop, s.counts, in_flight(prob, si, S, plan.M), s.recompute,
                          plan.R)
        if res is None:
            plan.objective_s = math.inf
            return plan
        times.append(res[0])
        shares.append(res[1])
        tail = max(tail, stage_tail(prob, plan.R, s.start, s.stop, s.counts))
    plan.stage_times_s, plan.shares, plan.tail_s = times, shares, tail
    plan.objective_s = pipeline_time(prob, plan, timer) + tail
    return plan


def pipeline_time(prob: Problem, plan: CountPlan, timer: StageTimer) -> float:
    """The pipeline part of the planner model: the flow shop of M identical micro-batches
    through stages of fixed times, sum(t) + (M - 1) max(t) (hetalloc.schedule.flow_shop_time).
    For GPipe it is the schedule's makespan when forward and backward are slowest on the
    same stage; for 1F1B it is never below the schedule's makespan, and equal when the
    slowest stage is the last one or the stages behind it are as slow."""
    del timer
    return flow_shop_time(plan.stage_times_s, plan.M)
