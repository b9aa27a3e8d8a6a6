"""What users would otherwise do: five baseline planners, in the same Plan format.

- ``even``: Megatron-LM / DeepSpeed style without tensor parallelism. Pick a pipeline
  depth p and a data-parallel degree d (d divides the batch); the first d * p devices,
  in cluster order, form d identical pipelines of p devices; layers are split evenly
  over the stages and every pipeline gets an equal share of the batch.
- ``proportional``: the same pipelines (d also as many as fit), but each pipeline's
  layers are split in proportion to its devices' peak FLOP/s, and each pipeline's batch
  share is in proportion to its throughput.
- ``pipedream``: PipeDream's partitioner (Narayanan et al., SOSP 2019): dynamic
  programming over layers and consecutive device blocks that picks stage boundaries and
  how many devices replicate each stage, minimising the slowest stage (compute of an
  equal share of the micro-batch, plus the stage's all-reduce amortised over the
  micro-batches). Devices are taken in cluster order; replicas split work equally.
- ``megatron``: Megatron-LM's recipe (Narayanan et al., SC 2021): tensor parallelism
  t = GPUs per node (the largest degree every node's GPUs of each type divide into),
  pipeline stages of one tensor-parallel group each, even layers, d equal data-parallel
  pipelines, full activation recomputation when (and only when) the plan does not fit
  without it.
- ``metis``: Metis's search (Um et al., USENIX ATC 2024, as its paper describes it): one
  pipeline whose stages are device groups of power-of-two sizes laid out over the device
  types in some order; inside a stage, data parallelism first, each data-parallel group's
  share of the micro-batch in proportion to its speed; layers balanced greedily over the
  stages in proportion to their speed (moved away from stages short of memory); a stage
  still short of memory doubles its tensor-parallel degree (halving its data-parallel one).

Every baseline searches its whole space of configurations, micro-batch counts included
(every M that divides the batch), and keeps the one with the best predicted time that
fits: a comparison is only worth what the strongest version of the baseline is.

How configurations are scored. ``hetalloc.evaluate.predict`` costs time in proportion to
the devices; the baselines instead score a configuration with the same formulas applied
once per *distinct* replica and stage: memory exactly (``hetalloc.costs.stage_memory``);
the gradient synchronisation and optimizer tail exactly (``allreduce_time_of`` and
``optimizer_time`` per gradient group and per distinct device); the pipeline first by a
lower bound (a group cannot finish its M forward and backward ops before the first
micro-batch has reached it, nor its last gradients go back to the first stage before
them) and, for configurations whose bound still beats the best found, exactly
(``pipeline_timing`` of one representative per distinct replica, by op durations and
wiring). Configurations are taken in order of bound (ties by the configuration), so the
first one whose exact time no later bound can beat is the baseline's optimum: the one
``predict`` ranks first. ``predict`` then gives the winner's figures.

Bounds on work: each baseline counts its work (units: a device or stage visited, a
pipeline op timed) against a budget (``WORK_LIMIT``, or the caller's). When the budget
ends a search, the best configuration scored so far is returned — the same one on any
machine — and the plan says so in a note. A wall-clock deadline is a last resort: a
baseline that passes it raises ``BaselineStopped`` and nothing it found is used.

Must never: choose between configurations by the clock; return a plan that does not
validate; import torch.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hetalloc.apportion import largest_remainder
from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.costs import (LOSS_BYTES, TP_DEGREES, grad_bytes_per_param, in_flight_microbatches,
                            max_share_for_memory, optimizer_time, small_allreduce_time, stage_memory, usable_memory)
from hetalloc.errors import HetallocError, InfeasibleError, SpecError
from hetalloc.evaluate import (ReplicaPipe, after_flush_time, allreduce_time, allreduce_time_of,
                               loss_reduction_time, predict, replica_pipe, ring_bottleneck, timing_key)
from hetalloc.plan import Group, Plan, Replica, Stage, validate_plan
from hetalloc.schedule import pipeline_timing

BASELINES = ("even", "proportional", "pipedream", "megatron", "metis")

WORK_LIMIT = 3_000_000
"""Work one baseline may spend by default (see the module doc): at most about 1-3 s of this
module's work on the 2-core development machine, whatever the cluster's size."""

WORK_PER_SECOND = 2_000_000
"""Work units per second of that machine (measured 0.3-0.9 us per unit), to turn a time
limit into a work bound."""

TIME_SHARE = 0.03
"""Each baseline's work bound within a planning request: this fraction of its time limit."""

GRACE_S = 2.5
"""Seconds the baselines may run past the request's time limit when the search used it
all (a deadline of last resort; the work bound normally ends them first)."""

PIPEDREAM_MAX_UNITS = 128
"""PipeDream's dynamic program runs over at most this many units (devices, or whole nodes
on clusters of more than 64 devices), the first ones in cluster order; on larger clusters
it uses a prefix of the cluster (its plans may use any prefix anyway)."""


class BaselineStopped(HetallocError):
    """A baseline passed its wall-clock deadline; what it found is discarded."""


class Budget:
    """The work a baseline may still spend, and its wall-clock deadline of last resort."""

    def __init__(self, name: str, work: int | None = None, deadline: float | None = None):
        self.name = name
        self.left = WORK_LIMIT if work is None else work
        self.deadline = deadline
        self.cut = False
        """True once the work bound has ended a search."""

    def spend(self, units: float) -> bool:
        """Charge `units` of work; False once the budget is spent. Past the deadline it raises."""
        self.left -= units
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise BaselineStopped(f"the {self.name} baseline reached its time limit")
        if self.left <= 0:
            self.cut = True
        return not self.cut


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _plan(cluster: Cluster, cg: CostGraph, B: int, M: int, replicas: list[Replica], schedule: str,
          optimizer: str, grad_sync: str, name: str) -> Plan:
    """A configuration as a Plan (the fingerprints are added to the winner only)."""
    return Plan(model=cg.model, seq_len=cg.seq_len, global_batch=B, num_microbatches=M, schedule=schedule,
                grad_sync=grad_sync, replicas=replicas, optimizer=optimizer, precision=cg.precision,
                cluster_name=cluster.name, planner=name)


def _finish(plan: Plan, cluster: Cluster, cg: CostGraph, budget: Budget, searched: str) -> Plan:
    """Validate the winner and attach its prediction (and a note if the work bound cut the search)."""
    plan.cluster_fingerprint, plan.cost_graph_fingerprint = cluster.fingerprint(), cg.fingerprint()
    validate_plan(plan, cluster, cg)
    plan.predicted = predict(plan, cluster, cg).to_dict()
    if budget.cut:
        plan.notes.append(f"the {plan.planner} baseline's search stopped at its work bound after {searched}; "
                          "this is the best configuration scored")
    return plan


def _none_found(name: str, budget: Budget, space: str = "") -> str:
    if budget.cut:
        return f"the {name} baseline found no configuration {space}that fits in memory before its work bound"
    return f"the {name} baseline found no configuration {space}that fits in memory"


def even_layers(L: int, p: int) -> list[tuple[int, int]]:
    cuts = [round(k * L / p) for k in range(p + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def weighted_layers(work: np.ndarray, speeds: list[float]) -> list[tuple[int, int]] | None:
    """Contiguous split of layers (per-layer work) over stages of given speeds that
    minimises the slowest stage's work / speed (binary search on the stage time)."""
    L, p = len(work), len(speeds)
    if p > L:
        return None
    prefix = np.concatenate([[0.0], np.cumsum(work)])

    def fits(T: float) -> list[tuple[int, int]] | None:
        out, i = [], 0
        for s, v in enumerate(speeds):
            left = p - s - 1
            j = int(np.searchsorted(prefix, prefix[i] + T * v, side="right")) - 1
            j = min(j, L - left)
            if j <= i:
                return None
            if s == p - 1:
                j = L
                if prefix[L] - prefix[i] > T * v * (1 + 1e-9):
                    return None
            out.append((i, j))
            i = j
        return out

    lo, hi = 0.0, prefix[-1] / min(speeds)
    best = fits(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        f = fits(mid)
        if f is None:
            lo = mid
        else:
            hi, best = mid, f
    return best


def _tp_degrees(cg: CostGraph) -> tuple[int, ...]:
    """Tensor-parallel degrees the model can be split into (heads and key/value heads divide)."""
    if not cg.supports_tp:
        return (1,)
    try:
        shape = cg.shape()
    except SpecError:
        return TP_DEGREES
    heads, kv = shape.heads, shape.kv_heads or shape.heads
    return tuple(t for t in TP_DEGREES if heads % t == 0 and kv % t == 0)


# ---- scoring shared by the baselines ----------------------------------------------------------

class Pipes:
    """Pipeline times of representative replicas: op durations once per replica key, the
    lower bound from them, the exact ``pipeline_timing`` once per (durations, M)."""

    def __init__(self, cluster: Cluster, cg: CostGraph, schedule: str, budget: Budget):
        self.cluster, self.cg, self.schedule, self.budget = cluster, cg, schedule, budget
        self._pipes: dict = {}
        self._exact: dict = {}

    def pipe(self, key, make: Callable[[], Replica]) -> tuple[ReplicaPipe, int, np.ndarray, np.ndarray]:
        """(durations, stages, before, per_op): per group, the earliest time its first
        forward can start plus the latest its last backward's gradients need to get back
        (``before``), and its forward + backward seconds (``per_op``)."""
        hit = self._pipes.get(key)
        if hit is None:
            r = make()
            pipe = replica_pipe(r, self.cluster, self.cg)
            self.budget.spend(len(pipe.devices))
            S = len(r.stages)
            min_f = [math.inf] * S
            min_b = [math.inf] * S
            for d in pipe.devices:
                min_f[d.stage] = min(min_f[d.stage], d.fwd_s)
                min_b[d.stage] = min(min_b[d.stage], d.bwd_s)
            lead = np.concatenate([[0.0], np.cumsum(np.array(min_f) + np.array(min_b))])
            before = np.array([lead[d.stage] for d in pipe.devices])
            per_op = np.array([d.fwd_s + d.bwd_s for d in pipe.devices])
            hit = self._pipes[key] = (pipe, S, before, per_op)
        return hit

    def lower_bound(self, key, make, M: int) -> float:
        """No group ends its M forward and backward ops before the first micro-batch has
        reached its stage; the last gradients then still go back through the stages before
        it. Sends are part of the op durations."""
        _, _, before, per_op = self.pipe(key, make)
        return float(np.max(before + M * per_op))

    def exact(self, key, make, M: int) -> float:
        pipe, S, _, _ = self.pipe(key, make)
        tkey = (timing_key(pipe), S, M)
        hit = self._exact.get(tkey)
        if hit is None:
            self.budget.spend(2 * len(pipe.devices) * M)
            hit = self._exact[tkey] = pipeline_timing(pipe.devices, S, M, self.schedule).makespan_s
        return hit


@dataclass(order=True)
class Candidate:
    """A configuration with a cheap lower bound on its time; `refine` gives a tighter bound,
    `evaluate` its exact time, `build` its plan."""

    bound: float
    order: tuple
    evaluate: Callable[[], float] = field(compare=False)
    build: Callable[[], Plan] = field(compare=False)
    refine: Callable[[], float] | None = field(default=None, compare=False)


def best_of(cands: list[Candidate], budget: Budget) -> Candidate | None:
    """The candidate with the least exact time: candidates in order of bound, each refined and
    then timed exactly unless a bound shows it cannot beat the best so far; done when no
    remaining bound can (ties: the earlier in order). At least one candidate is timed
    exactly whatever the budget."""
    cands.sort()
    best, best_t = None, math.inf
    for c in cands:
        if c.bound >= best_t:
            break
        if best is not None and (budget.cut or not budget.spend(1)):
            break
        if c.refine is not None and c.refine() >= best_t:
            continue
        t = c.evaluate()
        if t < best_t:
            best, best_t = c, t
    return best


# ---- even, proportional, megatron: d pipelines of p consecutive units ------------------------

@dataclass
class Units:
    """Units of a chain baseline, in cluster order: single devices, or tensor-parallel
    groups of t devices of one type inside one node."""

    devices: "_DeviceIds"
    """unit -> its device ids."""
    types: list[str]
    t: int
    index: np.ndarray
    """[unit, rank] -> device position in cluster order."""
    node: np.ndarray
    """unit -> node index."""
    kind: np.ndarray
    """unit -> class of (type, the node's link class)."""

    @staticmethod
    def of(cluster: Cluster, t: int, limit: int) -> "Units":
        """The first `limit` units (no configuration uses more: d <= B pipelines of p <= L).
        Nodes with the same device types in the same order share one unit layout (device
        offsets in the node), so the work is one pass over the nodes, not over the devices."""
        layouts: dict[tuple, tuple[np.ndarray, list[str]]] = {}
        pos = cluster.device_index
        parts, types, count = [], [], 0
        for n in cluster.nodes:
            if count >= limit:
                break
            key = tuple(d.type for d in n.devices)
            lay = layouts.get(key)
            if lay is None:
                by_type: dict[str, list[int]] = {}
                for i, typ in enumerate(key):
                    by_type.setdefault(typ, []).append(i)
                offs, typs = [], []
                for typ, at in by_type.items():
                    for k in range(0, len(at) - len(at) % t, t):
                        offs.append(at[k:k + t])
                        typs.append(typ)
                lay = layouts[key] = (np.array(offs, dtype=np.int64).reshape(len(offs), t), typs)
            # positions in cluster order: a node's devices are consecutive there
            parts.append(lay[0] + pos[n.devices[0].id])
            types.extend(lay[1])
            count += len(lay[1])
        index = np.concatenate(parts)[:limit] if parts else np.zeros((0, t), dtype=np.int64)
        del types[limit:]
        links = cluster.links
        node = links.node_of[index[:, 0]] if len(index) else np.zeros(0, dtype=np.int64)
        type_code = np.searchsorted(sorted(set(types)), types).astype(np.int64) if types else node
        pairs = type_code * (int(links.class_of.max()) + 1) + links.class_of[node]
        _, kind = np.unique(pairs, return_inverse=True)  # unit -> class of (type, link class)
        return Units(_DeviceIds(cluster, index), types, t, index, node, np.asarray(kind, dtype=np.int64).reshape(-1))


class _Positions:
    """Device ids at cluster positions perm[x] (slices give lists), made on demand."""

    def __init__(self, cluster: Cluster, perm: np.ndarray):
        self.cluster, self.perm = cluster, perm

    def __getitem__(self, x: slice) -> list[str]:
        devs = self.cluster.devices
        return [devs[i].id for i in self.perm[x].tolist()]


class _DeviceIds:
    """Units' device ids, made on demand (only the winning plan's are needed)."""

    def __init__(self, cluster: Cluster, index: np.ndarray):
        self.cluster, self.index = cluster, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, x: int) -> list[str]:
        devs = self.cluster.devices
        return [devs[i].id for i in self.index[x].tolist()]


def node_tp_degree(cluster: Cluster, degrees: tuple[int, ...]) -> int:
    """The largest allowed degree that every node's GPUs of each type divide into."""
    counts = [c for n in cluster.nodes for c in n.type_counts().values()]
    return max(t for t in degrees if all(c % t == 0 for c in counts))


class ChainSearch:
    """even / proportional / megatron: d pipelines of p consecutive units."""

    def __init__(self, name: str, cluster: Cluster, cg: CostGraph, B: int, units: Units, *, schedule: str,
                 optimizer: str, grad_sync: str, budget: Budget, proportional: bool = False,
                 recompute: tuple[str, ...] = ("none",)):
        self.name, self.cluster, self.cg, self.B, self.u = name, cluster, cg, B, units
        self.schedule, self.optimizer, self.grad_sync, self.budget = schedule, optimizer, grad_sync, budget
        self.proportional, self.recompute = proportional, recompute
        self.pipes = Pipes(cluster, cg, schedule, budget)
        self.work = np.array([l.fwd_flops + 1.0 for l in cg.layers])
        self._fit: dict[tuple, bool] = {}
        self._fits: dict[tuple, bool] = {}
        self._weighted: dict[tuple, tuple | None] = {}
        self._compute: dict[tuple, tuple] = {}
        self.per_param = grad_bytes_per_param(cg.precision)

    # -- pipelines of depth p ---------------------------------------------------------------------
    def classify(self, p: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Classes of the first n pipelines of depth p (equal unit classes and equal links
        between consecutive units: they time identically), and each class's first pipeline."""
        u = self.u
        k = u.kind[:n * p].reshape(n, p)
        node = u.node[:n * p].reshape(n, p)
        cls = self.cluster.links.class_of[node]
        C = len(self.cluster.links.intra_bw)
        link = np.where(node[:, 1:] == node[:, :-1], 0, 1 + cls[:, :-1] * C + cls[:, 1:])
        rows = np.concatenate([k, link], axis=1)
        _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        return np.asarray(inverse).reshape(-1), first

    def layers_of(self, units: list[int]) -> tuple[list[tuple[int, int]], float] | None:
        """Layer split of a pipeline of these units, and its throughput weight (proportional)."""
        L, p = self.cg.num_layers, len(units)
        if not self.proportional:
            return even_layers(L, p), 1.0
        speeds = tuple(self.cluster.device_types[self.u.types[x]].peak_flops for x in units)
        if speeds not in self._weighted:
            sp = weighted_layers(self.work, list(speeds))
            self._weighted[speeds] = None if sp is None else \
                (sp, min(v / self.work[a:b].sum() for (a, b), v in zip(sp, speeds)))
        return self._weighted[speeds]

    def compute_bound(self, p: int, k: int, units: list[int], split, share: int, rec: str, M: int) -> float:
        """``Pipes.lower_bound`` with compute alone (no sends, no TP all-reduces): cheaper, lower."""
        key = (p, k, share)
        hit = self._compute.get(key)
        if hit is None:  # forward + backward without recomputation, per stage, by prefix sums
            a = np.array([x for x, _ in split])
            b = np.array([y for _, y in split])
            types = np.array([self.u.types[x] for x in units])
            per = np.zeros(len(units))
            for typ in sorted(set(types.tolist())):
                dt = self.cluster.device_types[typ]
                pf, pb = self.cg.prefix_times(dt, share, self.u.t)
                mask = types == typ
                per[mask] = (pf[b] - pf[a] + pb[b] - pb[a] + 2 * dt.op_overhead_s)[mask]
            per *= 1 - 1e-12  # a bound, whatever the rounding
            hit = self._compute[key] = (np.concatenate([[0.0], np.cumsum(per)[:-1]]), per)
        before, per = hit
        return float(np.max(before + M * per))

    def replica(self, units: list[int], split: list[tuple[int, int]], share: int, rec: str) -> Replica:
        return Replica([Stage(a, b, [Group(list(self.u.devices[x]), share)], rec) for (a, b), x in zip(split, units)])

    def fits(self, units: list[int], split, share: int, rec: str, M: int, k: int = -1) -> bool:
        """Every stage's memory (hetalloc.costs.stage_memory, as validate_plan checks it)."""
        cg, t, p = self.cg, self.u.t, len(units)
        whole = (p, k, share, rec, M if self.schedule == "gpipe" else min(M, p))
        if k >= 0 and whole in self._fits:
            return self._fits[whole]
        ok = self._stages_fit(units, split, share, rec, M)
        if k >= 0:
            self._fits[whole] = ok
        return ok

    def _stages_fit(self, units: list[int], split, share: int, rec: str, M: int) -> bool:
        cg, t, p = self.cg, self.u.t, len(units)
        for s, ((a, b), x) in enumerate(zip(split, units)):
            infl = in_flight_microbatches(self.schedule, s, p, M)
            key = (a, b, rec, share, infl, self.u.types[x])
            ok = self._fit.get(key)
            if ok is None:
                mem = stage_memory(cg.range_params(a, b, t), cg.range_saved_bytes(a, b, t, rec),
                                   cg.layers[b - 1].out_act_bytes, share, infl, cg.precision, self.optimizer,
                                   working_act_bytes_per_sample=cg.range_working_bytes(a, b, t, rec))
                ok = self._fit[key] = mem.total <= usable_memory(self.cluster.device_types[self.u.types[x]])
            if not ok:
                return False
        return True

    def tail(self, p: int, d: int, cls: np.ndarray, splits: dict[int, list[tuple[int, int]]]) -> float:
        """Gradient synchronisation plus optimizer step of the slowest device of the first d
        pipelines, as ``predict`` computes it: per maximal layer segment and rank j, the
        all-reduce among the units holding it (one per pipeline); a device's time is the
        sum over the segments of its stage, plus its optimizer step; then the loss
        reduction over all their devices."""
        cg, u, t = self.cg, self.u, self.u.t
        present = sorted(set(cls[:d].tolist()))
        cuts = sorted({c for k in present for st in splits[k] for c in st})
        K = len(cuts) - 1
        stage_at = np.stack([np.searchsorted([a for a, _ in splits[k]], cuts[:-1], side="right") - 1
                             for k in range(len(splits))])
        which = stage_at[cls[:d]] + (np.arange(d) * p)[:, None]  # [d, K]: the unit of pipeline r holding segment k
        T = np.zeros((K, t))
        for k in range(K):
            nbytes = cg.range_params(cuts[k], cuts[k + 1], t) * self.per_param
            for j in range(t):
                T[k, j] = allreduce_time_of(self.cluster, np.sort(u.index[which[:, k], j]), nbytes, self.grad_sync)
        self.budget.spend(d * K * t)
        worst = 0.0
        at = {c: x for x, c in enumerate(cuts)}
        for k in present:
            first = int(np.flatnonzero(cls[:d] == k)[0]) * p
            for s, (a, b) in enumerate(splits[k]):
                segs = range(at[a], at[b])
                dtype = self.cluster.device_types[u.types[first + s]]
                opt = optimizer_time(cg.range_params(a, b, t), dtype, cg.precision, self.optimizer)
                for j in range(t):
                    sync = 0.0
                    for x in segs:
                        sync += T[x, j]
                    worst = max(worst, sync + opt)
        used = np.sort(u.index[:d * p].ravel())
        if self.cluster.collectives:
            loss = loss_reduction_time(self.cluster, [self.cluster.devices[i].id for i in used.tolist()])
        else:
            loss = small_allreduce_time(LOSS_BYTES, len(used), *ring_bottleneck(self.cluster, used)) \
                if len(used) > 1 else 0.0
        return worst + loss

    # -- the search ---------------------------------------------------------------------------------
    def run(self) -> Plan:
        cands = self.candidates()
        best = best_of(cands, self.budget)
        if best is None:
            raise InfeasibleError(_none_found(self.name, self.budget))
        return _finish(best.build(), self.cluster, self.cg, self.budget, f"{self.searched} configurations")

    def candidates(self) -> list[Candidate]:
        """Every configuration that fits (within the work bound), with its bound."""
        B, L, U = self.B, self.cg.num_layers, len(self.u.devices)
        cands: list[Candidate] = []
        searched = 0
        for p in range(1, min(L, U) + 1):
            D = U // p
            ds = {d for d in divisors(B) if d <= D}
            if self.proportional and D <= B:
                ds.add(D)
            if not ds:
                continue
            ds = sorted(ds)
            cls, first = self.classify(p, ds[-1])
            if not self.budget.spend(ds[-1] * p):
                break
            reps = {k: list(range(int(f) * p, int(f) * p + p)) for k, f in enumerate(first)}
            lay = {k: self.layers_of(units) for k, units in reps.items()}
            if any(v is None for v in lay.values()):
                continue
            splits = {k: v[0] for k, v in lay.items()}
            rates = {k: v[1] for k, v in lay.items()}
            for d in ds:
                tail = self.tail(p, d, cls, splits)
                present = sorted(set(cls[:d].tolist()))
                Ms = divisors(B // d) if not self.proportional else [M for M in divisors(B) if B // M >= d]
                for M in Ms:
                    if self.proportional:
                        shares = largest_remainder(B // M, [rates[k] for k in cls[:d].tolist()], minimum=1)
                        pairs = sorted(set(zip(cls[:d].tolist(), shares)))
                    else:  # equal shares: one pair per class present
                        shares = None  # made by the builder (d equal shares)
                        pairs = [(k, B // (d * M)) for k in present]
                    rec = next((r for r in self.recompute
                                if all(self.fits(reps[k], splits[k], b, r, M, k) for k, b in pairs)), None)
                    searched += 1
                    self.budget.spend(p * len(pairs) + (d if self.proportional else 0))
                    if rec is None:
                        continue
                    bound = tail + max(self.compute_bound(p, k, reps[k], splits[k], b, rec, M) for k, b in pairs)
                    cands.append(Candidate(bound, (p, d, M), self._evaluator(p, pairs, reps, splits, rec, M, tail),
                                           self._builder(p, d, M, cls, shares, splits, rec),
                                           self._refiner(p, pairs, reps, splits, rec, M, tail)))
                if self.budget.cut:
                    break
            if self.budget.cut:
                break
        self.searched = searched
        return cands

    def _key(self, p: int, k: int, share: int, rec: str) -> tuple:
        return (p, k, share, rec)

    def _maker(self, units, split, share, rec):
        return lambda: self.replica(units, split, share, rec)

    def _refiner(self, p, pairs, reps, splits, rec, M, tail):
        def refine() -> float:
            return tail + max(self.pipes.lower_bound(self._key(p, k, b, rec), self._maker(reps[k], splits[k], b, rec), M)
                              for k, b in pairs)
        return refine

    def _evaluator(self, p, pairs, reps, splits, rec, M, tail):
        def evaluate() -> float:
            return tail + max(self.pipes.exact(self._key(p, k, b, rec), self._maker(reps[k], splits[k], b, rec), M)
                              for k, b in pairs)
        return evaluate

    def _builder(self, p, d, M, cls, shares, splits, rec):
        def build() -> Plan:
            each = shares if shares is not None else [self.B // (d * M)] * d
            reps = [self.replica(list(range(r * p, r * p + p)), splits[k], b, rec)
                    for r, (k, b) in enumerate(zip(cls[:d].tolist(), each))]
            return _plan(self.cluster, self.cg, self.B, M, reps, self.schedule, self.optimizer, self.grad_sync,
                         self.name)
        return build


def even_split(cluster: Cluster, cg: CostGraph, B: int, schedule: str = "1f1b", optimizer: str = "adamw",
               grad_sync: str = "ring", *, budget: Budget | None = None) -> Plan:
    budget = budget or Budget("even")
    return ChainSearch("even", cluster, cg, B, Units.of(cluster, 1, B * cg.num_layers),
                       schedule=schedule, optimizer=optimizer, grad_sync=grad_sync, budget=budget).run()


def proportional_split(cluster: Cluster, cg: CostGraph, B: int, schedule: str = "1f1b",
                       optimizer: str = "adamw", grad_sync: str = "ring", *, budget: Budget | None = None) -> Plan:
    budget = budget or Budget("proportional")
    return ChainSearch("proportional", cluster, cg, B, Units.of(cluster, 1, B * cg.num_layers),
                       schedule=schedule, optimizer=optimizer, grad_sync=grad_sync, budget=budget,
                       proportional=True).run()


def megatron_split(cluster: Cluster, cg: CostGraph, B: int, schedule: str = "1f1b", optimizer: str = "adamw",
                   grad_sync: str = "ring", *, budget: Budget | None = None) -> Plan:
    budget = budget or Budget("megatron")
    t = node_tp_degree(cluster, _tp_degrees(cg))
    recompute = ("none", "full") if cg.supports_tp else ("none",)
    return ChainSearch("megatron", cluster, cg, B, Units.of(cluster, t, B * cg.num_layers),
                       schedule=schedule, optimizer=optimizer, grad_sync=grad_sync, budget=budget,
                       recompute=recompute).run()


# ---- pipedream ---------------------------------------------------------------------------------

def pipedream_split(cluster: Cluster, cg: CostGraph, B: int, schedule: str = "1f1b",
                    optimizer: str = "adamw", grad_sync: str = "ring", *, budget: Budget | None = None) -> Plan:
    budget = budget or Budget("pipedream")
    ids = [d.id for d in cluster.devices]
    # Units of consecutive devices: single devices, or whole nodes on large clusters.
    units = [[d] for d in ids] if len(ids) <= 64 else [[d.id for d in n.devices] for n in cluster.nodes]
    capped = len(units) > PIPEDREAM_MAX_UNITS
    units = units[:PIPEDREAM_MAX_UNITS]
    dp = PipeDreamDP(cluster, cg, units, optimizer, grad_sync, budget)
    pipes = Pipes(cluster, cg, schedule, budget)
    cands: list[Candidate] = []
    # PipeDream's own micro-batch counts first (powers of two to 64, and B), then the others.
    Ms = divisors(B)
    Ms = [m for m in Ms if m in (1, 2, 4, 8, 16, 32, 64) or m == B] + [m for m in Ms if m not in (1, 2, 4, 8, 16, 32, 64, B)]
    searched = 0
    for M in Ms:
        if budget.cut:
            break
        searched += 1
        # In-flight micro-batches are not known before the split: check the last stage's
        # (least) need here; the validation rejects splits that do not fit.
        stages = dp.solve(B // M, M, M if schedule == "gpipe" else 1)
        if stages is None:
            continue
        plan = _plan(cluster, cg, B, M, [Replica(stages)], schedule, optimizer, grad_sync, "pipedream")
        try:
            validate_plan(plan, cluster, cg)
        except SpecError:
            continue
        tail = after_flush_time(plan, cluster, cg)
        budget.spend(len(plan.device_ids()))
        make = (lambda r: (lambda: r))(plan.replicas[0])
        cands.append(Candidate(tail + pipes.lower_bound(M, make, M), (M,),
                               (lambda M, make, tail: (lambda: tail + pipes.exact(M, make, M)))(M, make, tail),
                               (lambda plan: (lambda: plan))(plan)))
    best = best_of(cands, budget)
    if best is None:
        raise InfeasibleError(_none_found("pipedream", budget))
    plan = best.build()
    if capped:
        plan.notes.append(f"the pipedream baseline considered the first {PIPEDREAM_MAX_UNITS} nodes of the cluster")
    return _finish(plan, cluster, cg, budget, f"{searched} micro-batch counts")


def _affine_allreduce(cluster: Cluster, block: list[str], grad_sync: str) -> tuple[float, float]:
    """All-reduce time of a fixed group is affine in the bytes: (seconds per byte, seconds)."""
    if len(block) <= 1:
        return 0.0, 0.0
    t1 = allreduce_time(cluster, block, 1e6, grad_sync)
    t2 = allreduce_time(cluster, block, 2e6, grad_sync)
    return (t2 - t1) / 1e6, 2 * t1 - t2


class PipeDreamDP:
    """PipeDream's dynamic program over layers x consecutive unit blocks (see module doc);
    what does not depend on the micro-batch count (blocks, their all-reduce, memory caps)
    is computed once."""

    SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

    def __init__(self, cluster: Cluster, cg: CostGraph, units: list[list[str]], optimizer: str, grad_sync: str,
                 budget: Budget):
        self.cluster, self.cg, self.units, self.optimizer, self.budget = cluster, cg, units, optimizer, budget
        U, L = len(units), cg.num_layers
        self.sizes = sorted(set(self.SIZES) | {U})
        unit_types = [sorted({cluster.device(d).type for d in u}) for u in units]
        self.blocks: dict[tuple[int, int], tuple[list[str], list[str], float, float]] = {}
        for k in range(1, U + 1):
            for m in self.sizes:
                if m > k:
                    break
                block = [d for u in units[k - m:k] for d in u]
                types = sorted({t for u in unit_types[k - m:k] for t in u})
                self.blocks[(k, m)] = (block, types, *_affine_allreduce(cluster, block, grad_sync))
            budget.spend(20 * len(units[k - 1]))
        pbytes = 4 if cg.precision == "fp32" else 2
        self.gbytes = np.concatenate([[0], np.cumsum([l.params for l in cg.layers])]) * pbytes
        ii = np.arange(L + 1)
        self.upper = ii[:, None] < ii[None, :]  # [i, j]: i < j
        self._caps: dict[tuple[str, int], np.ndarray] = {}

    def caps(self, t: str, in_flight: int) -> np.ndarray:
        """caps[i, j] = largest share of layers [i, j) that fits on type t (-1: weights do not fit)."""
        hit = self._caps.get((t, in_flight))
        if hit is None:
            cg, L = self.cg, self.cg.num_layers
            dtype = self.cluster.device_types[t]
            hit = np.full((L + 1, L + 1), -1, dtype=np.int64)
            for i in range(L):
                for j in range(i + 1, L + 1):
                    hit[i, j] = max_share_for_memory(cg.params(i, j), sum(l.saved_act_bytes for l in cg.layers[i:j]),
                                                     cg.layers[j - 1].out_act_bytes, in_flight, cg.precision,
                                                     self.optimizer, dtype)
            self.budget.spend(5 * L * L)
            self._caps[(t, in_flight)] = hit
        return hit

    def solve(self, b: int, M: int, in_flight: int) -> list[Stage] | None:
        cluster, cg = self.cluster, self.cg
        L, U = cg.num_layers, len(self.units)
        A = np.full((L + 1, U + 1), math.inf)
        A[0, 0] = 0.0
        choice_i = np.full((L + 1, U + 1), -1, dtype=np.int64)
        choice_m = np.full((L + 1, U + 1), -1, dtype=np.int64)
        G = self.gbytes
        cols = np.arange(1, L + 1)
        for k in range(1, U + 1):
            for m in self.sizes:
                if m > k:
                    break
                block, types, slope, icpt = self.blocks[(k, m)]
                ndev = len(block)
                if ndev > b:
                    continue
                share = -(-b // ndev)
                comp = None
                for t in types:
                    dt = cluster.device_types[t]
                    f, bw = cg.prefix_times(dt, share)
                    P = f + bw
                    c = P[None, :] - P[:, None] + 2 * dt.op_overhead_s
                    comp = c if comp is None else np.maximum(comp, c)
                ar = (slope * (G[None, :] - G[:, None]) + icpt) / M if ndev > 1 else 0.0
                cost = np.maximum(A[:, k - m][:, None], np.maximum(comp, ar))
                ok = self.upper.copy()
                for t in types:  # the stage must fit on every device of the block
                    ok &= self.caps(t, in_flight) >= share
                cost = np.where(ok, cost, math.inf)[:, 1:]
                ii = np.argmin(cost, axis=0)
                val = cost[ii, cols - 1]
                better = val < A[1:, k]
                A[1:, k] = np.where(better, val, A[1:, k])
                choice_i[1:, k] = np.where(better, ii, choice_i[1:, k])
                choice_m[1:, k] = np.where(better, m, choice_m[1:, k])
            self.budget.spend(20 * (L + 1))
        k = int(np.argmin(A[L, 1:])) + 1
        if not math.isfinite(A[L, k]):
            return None
        stages, j = [], L
        while j > 0:
            i, m = int(choice_i[j, k]), int(choice_m[j, k])
            block = self.blocks[(k, m)][0]
            shares = [b // len(block) + (1 if x < b % len(block) else 0) for x in range(len(block))]
            stages.append(Stage(i, j, [Group([d], s) for d, s in zip(block, shares)]))
            j, k = i, k - m
        return stages[::-1]


# ---- metis -------------------------------------------------------------------------------------

METIS_VARIANCE = 0.5
"""Metis's bound on stage sizes: a stage has at least this fraction of N / S devices."""

METIS_PARTITION_ATTEMPTS = 3
"""Layer re-partitions (speed moved away from stages short of memory) before doubling TP."""

METIS_MAX_ORDERS = 24
"""Orders of the device types tried (all of them up to four types)."""


def _pow2_groups(N: int, S: int, low: float):
    """Non-increasing S-tuples of powers of two, each at least `low`, that sum to N."""
    sizes = [1 << k for k in range(N.bit_length()) if (1 << k) >= low][::-1]  # largest first

    @functools.lru_cache(maxsize=None)
    def possible(left: int, parts: int, cap: int) -> bool:
        if parts == 0:
            return left == 0
        return any(possible(left - g, parts - 1, g) for g in sizes if g <= cap and g <= left)

    def rec(left: int, parts: int, cap: int, acc: tuple):
        if parts == 0:
            yield acc
            return
        for g in sizes:
            if g <= cap and g <= left and possible(left - g, parts - 1, g):
                yield from rec(left - g, parts - 1, g, acc + (g,))

    if sizes:
        yield from rec(N, S, sizes[0], ())


def _stage_orders(groups: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The stage orders tried for a multiset of group sizes: every distinct order of up to
    four groups (Metis permutes at most four), else largest first and smallest first."""
    if len(groups) <= 4:
        return sorted(set(itertools.permutations(groups)), reverse=True)
    return sorted({groups, groups[::-1]}, reverse=True)


class MetisSearch:
    def __init__(self, cluster: Cluster, cg: CostGraph, B: int, *, schedule: str, optimizer: str, grad_sync: str,
                 budget: Budget):
        self.cluster, self.cg, self.B = cluster, cg, B
        self.schedule, self.optimizer, self.grad_sync, self.budget = schedule, optimizer, grad_sync, budget
        self.degrees = _tp_degrees(cg)
        self.pipes = Pipes(cluster, cg, schedule, budget)
        L = cg.num_layers
        # Layer demand: compute seconds of one sample on the fastest type (Metis normalises one
        # type's profiled layer times).
        fastest = max((cluster.device_types[t] for t in cluster.type_counts()), key=lambda d: (d.peak_flops, d.name))
        f, b = cg.layer_times(fastest, 1)
        self.demand = np.concatenate([[0.0], np.cumsum(f + b)])
        self.L = L
        self._speed: dict[tuple[str, int], float] = {}
        self._mem: dict[tuple, float] = {}
        self._comp: dict[tuple, float] = {}
        self._ids = itertools.count()
        self._stages: dict[tuple, tuple | None] = {}
        self._shares: dict[tuple, tuple] = {}
        self.order_index = 0

    def speed(self, typ: str, tp: int) -> float:
        """Samples per second of one data-parallel group (Metis: its profiled time at one sample)."""
        hit = self._speed.get((typ, tp))
        if hit is None:
            f, b = self.cg.range_time(0, self.L, self.cluster.device_types[typ], 1, tp)
            hit = self._speed[(typ, tp)] = 1.0 / (f + b)
        return hit

    def mem_ratio(self, a: int, b: int, tp: int, typ: str, share: int, infl: int) -> float:
        """A group's memory over its usable memory (> 1: does not fit)."""
        key = (a, b, tp, typ, share, infl)
        hit = self._mem.get(key)
        if hit is None:
            cg = self.cg
            m = stage_memory(cg.range_params(a, b, tp), cg.range_saved_bytes(a, b, tp), cg.layers[b - 1].out_act_bytes,
                             share, infl, cg.precision, self.optimizer)
            hit = self._mem[key] = m.total / usable_memory(self.cluster.device_types[typ])
        return hit

    def balance(self, perf: list[float]) -> list[tuple[int, int]]:
        """Layers to stages greedily: each stage ends where the running layer demand is nearest
        its running share of the speed (every stage at least one layer)."""
        S, L, D = len(perf), self.L, self.demand
        targets = D[L] * np.cumsum(perf)[:-1] / sum(perf)
        j = np.searchsorted(D, targets)
        lower = np.maximum(j - 1, 0)
        j = np.where(np.abs(D[lower] - targets) <= np.abs(D[np.minimum(j, L)] - targets), lower, j).tolist()
        out, i = [], 0
        for s in range(S - 1):
            e = max(i + 1, min(j[s], L - (S - 1 - s)))
            out.append((i, e))
            i = e
        out.append((i, L))
        return out

    def stage_groups(self, lo: int, hi: int, tp: int) -> tuple[list[tuple[list[str], str]], list[float], float] | None:
        """The stage's devices devs[lo:hi] as data-parallel groups of tp (one node and one type
        each; None if that cannot be), their speeds and the stage's speed (their sum)."""
        key = (self.order_index, lo, hi, tp)
        if key in self._stages:
            return self._stages[key]
        out = []
        for x in range(lo, hi, tp):
            if self.node[x] != self.node[x + tp - 1] or self.types[x] != self.types[x + tp - 1]:
                out = None
                break
            out.append((self.devs[x:x + tp], self.type_names[self.types[x]]))
        hit = None
        if out is not None:
            speeds = [self.speed(t, tp) for _, t in out]
            hit = (out, speeds, sum(speeds))
        self.budget.spend(3 * (hi - lo) // tp)
        self._stages[key] = hit
        return hit

    def stage_shares(self, lo: int, hi: int, tp: int, b: int) -> tuple[list[int], list[tuple[str, int]]]:
        """Each data-parallel group's share of the micro-batch (in proportion to its speed),
        and the distinct (type, share) pairs."""
        key = (self.order_index, lo, hi, tp, b)
        hit = self._shares.get(key)
        if hit is None:
            groups, speeds, _ = self._stages[(self.order_index, lo, hi, tp)]
            shares = largest_remainder(b, speeds, minimum=1)
            hit = self._shares[key] = (shares, sorted({(t, sh) for (_, t), sh in zip(groups, shares)}))
            self.budget.spend(3 * len(groups))
        return hit

    def configure(self, sizes: tuple[int, ...], M: int):
        """Metis's intra-stage search for one (device groups, M): data parallelism first, TP
        doubled in the stage under the most memory pressure until the layers fit."""
        B, S = self.B, len(sizes)
        b = B // M
        offs = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        tps = [1] * S
        while True:
            self.budget.spend(5 * S + 50)
            infos = [self.stage_groups(offs[s], offs[s + 1], tps[s]) for s in range(S)]
            if any(g is None for g in infos):
                return None
            over = [s for s in range(S) if len(infos[s][0]) > b]
            if over:  # fewer samples than data-parallel groups: double TP where there are the most groups
                s = max(over, key=lambda x: (len(infos[x][0]), -x))
                if not self._double(tps, s, sizes):
                    return None
                continue
            shares = [self.stage_shares(offs[s], offs[s + 1], tps[s], b) for s in range(S)]
            perf = [info[2] for info in infos]
            split, ratio = None, None
            for _ in range(METIS_PARTITION_ATTEMPTS):
                split = self.balance(perf)
                ratio = [max(self.mem_ratio(a, c, tps[s], t, sh, in_flight_microbatches(self.schedule, s, S, M))
                             for t, sh in shares[s][1])
                         for s, (a, c) in enumerate(split)]
                if max(ratio) <= 1.0:
                    return [info[0] for info in infos], [sh[0] for sh in shares], split, tps, [sh[1] for sh in shares]
                perf = self._move_speed(perf, ratio)
                if perf is None:
                    break
            # still short of memory: double TP in the stage under the most pressure that can
            if not any(self._double(tps, s, sizes) for s in sorted(range(S), key=lambda x: (-ratio[x], x))):
                return None

    def _double(self, tps: list[int], s: int, sizes: tuple[int, ...]) -> bool:
        t = tps[s] * 2
        if t not in self.degrees or sizes[s] % t:
            return False
        tps[s] = t
        return True

    @staticmethod
    def _move_speed(perf: list[float], ratio: list[float]) -> list[float] | None:
        """Metis's re-partition: a stage short of memory keeps 0.9 x the speed it can hold,
        the rest goes to stages with memory to spare, in proportion to their speed."""
        new = list(perf)
        freed = 0.0
        spare = [0.0] * len(perf)
        for s, (p, r) in enumerate(zip(perf, ratio)):
            if r > 1.0:
                new[s] = p / r * 0.9
                freed += p - new[s]
            else:
                spare[s] = p / max(r, 1e-12) - p
        if sum(spare) < freed:
            return None
        while freed > 1e-12 * sum(perf):
            open_ = [s for s in range(len(perf)) if spare[s] > 0]
            if not open_:
                return None
            w = sum(perf[s] for s in open_)
            step = freed
            for s in open_:
                give = min(spare[s], step * perf[s] / w)
                new[s] += give
                spare[s] -= give
                freed -= give
        return new

    def run(self) -> Plan:
        cluster, B = self.cluster, self.B
        N, L = cluster.num_devices, self.L
        types = sorted(cluster.type_counts(), key=lambda t: (-cluster.device_types[t].peak_flops, t))
        orders = list(itertools.islice(itertools.permutations(types), METIS_MAX_ORDERS))
        best: tuple[float, tuple] | None = None
        best_plan: Callable[[], Plan] | None = None
        searched = 0
        Ms = divisors(B)[::-1]  # Metis: the most micro-batches first
        # the devices laid out type after type (in cluster order within a type), per order when reached
        self.type_names = sorted(cluster.type_counts())
        code = {t: k for k, t in enumerate(self.type_names)}
        type_of = np.fromiter((code[d.type] for d in cluster.devices), dtype=np.int64, count=N)
        layouts: dict[int, tuple] = {}
        for S in range(1, min(N, L) + 1):
            low = METIS_VARIANCE * max(N // S, S // N)
            groups = list(_pow2_groups(N, S, low))
            self.budget.spend(len(groups) + 1)
            for oi, order in enumerate(orders):
                self.order_index = oi
                if oi not in layouts:
                    rank = np.array([order.index(t) for t in self.type_names], dtype=np.int64)
                    perm = np.argsort(rank[type_of], kind="stable")
                    layouts[oi] = (_Positions(cluster, perm), type_of[perm].tolist(),
                                   cluster.links.node_of[perm].tolist())
                    self.budget.spend(N)
                self.devs, self.types, self.node = layouts[oi]
                for multiset in groups:
                    for sizes in _stage_orders(multiset):
                        for M in Ms:
                            searched += 1
                            conf = self.configure(sizes, M)
                            if conf is not None:
                                key = (S, oi, sizes, M)
                                t = self.score(conf, M, best[0] if best else math.inf)
                                if t is not None and (best is None or (t, key) < best):
                                    best = (t, key)
                                    best_plan = (lambda conf, M: (lambda: self.plan(conf, M)))(conf, M)
                            if self.budget.cut:
                                break
                        if self.budget.cut:
                            break
                    if self.budget.cut:
                        break
                if self.budget.cut:
                    break
            if self.budget.cut:
                break
        if best_plan is None:
            raise InfeasibleError(_none_found("metis", self.budget, "of every device in one pipeline, each "
                                              "data-parallel group with at least one sample, "))
        return _finish(best_plan(), cluster, self.cg, self.budget, f"{searched} configurations")

    def plan(self, conf, M: int) -> Plan:
        stages, shares, split, _, _ = conf
        reps = [Replica([Stage(a, c, [Group(list(ids), sh) for (ids, _), sh in zip(stages[s], shares[s])])
                         for s, (a, c) in enumerate(split)])]
        return _plan(self.cluster, self.cg, self.B, M, reps, self.schedule, self.optimizer, self.grad_sync, "metis")

    def score(self, conf, M: int, incumbent: float) -> float | None:
        """Exact time of a configuration (predict's), or None when a bound shows it cannot
        beat the incumbent."""
        _, _, split, tps, pairs = conf
        cg = self.cg
        lb = 0.0
        for s, (a, c) in enumerate(split):  # compute alone: a first, cheap bound
            for t, sh in pairs[s]:
                key = (a, c, t, sh, tps[s])
                x = self._comp.get(key)
                if x is None:
                    f, bw = cg.range_time(a, c, self.cluster.device_types[t], sh, tps[s])
                    x = self._comp[key] = f + bw
                lb = max(lb, M * x)
        if lb >= incumbent:
            return None
        plan = self.plan(conf, M)
        self.budget.spend(10 * len(plan.device_ids()))
        tail = after_flush_time(plan, self.cluster, cg)
        key = ("metis", next(self._ids))
        make = lambda: plan.replicas[0]  # noqa: E731
        if tail + self.pipes.lower_bound(key, make, M) >= incumbent:
            return None
        return tail + self.pipes.exact(key, make, M)


def metis_split(cluster: Cluster, cg: CostGraph, B: int, schedule: str = "1f1b", optimizer: str = "adamw",
                grad_sync: str = "ring", *, budget: Budget | None = None) -> Plan:
    budget = budget or Budget("metis")
    return MetisSearch(cluster, cg, B, schedule=schedule, optimizer=optimizer, grad_sync=grad_sync,
                       budget=budget).run()


BASELINE_FUNCS: dict[str, Callable[..., Plan]] = {
    "even": even_split,
    "proportional": proportional_split,
    "pipedream": pipedream_split,
    "megatron": megatron_split,
    "metis": metis_split,
}


def limits_for(time_limit: float, started: float) -> tuple[int, float]:
    """(work bound, deadline) of each baseline in a request with `time_limit` seconds that
    started at ``time.perf_counter()`` value `started`: the work bound is a fixed share of
    the limit (so the same request gives the same baselines on any machine); the deadline
    is the request's end, or GRACE_S from now if that has passed."""
    work = min(WORK_LIMIT, max(50_000, int(WORK_PER_SECOND * TIME_SHARE * time_limit)))
    return work, max(started + time_limit, time.perf_counter() + GRACE_S)


def baseline_plan(name: str, cluster: Cluster, cg: CostGraph, B: int, *, work: int | None = None,
                  deadline: float | None = None, **kw) -> Plan:
    """The baseline's best plan. work: its work bound (default ``WORK_LIMIT``); deadline: a
    ``time.perf_counter()`` value past which it raises BaselineStopped (last resort)."""
    if name not in BASELINE_FUNCS:
        raise SpecError("--baseline", "", f"unknown baseline '{name}'", f"use one of {', '.join(BASELINES)}")
    return BASELINE_FUNCS[name](cluster, cg, B, budget=Budget(name, work, deadline), **kw)
