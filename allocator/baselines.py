"""What users would otherwise do: three baseline planners, in the same Plan format.

- ``even``: Megatron-LM / DeepSpeed style. Pick a pipeline depth p; the devices, in
  cluster order, form floor(N / p) identical pipelines of p devices; layers are split
  evenly over the stages and every pipeline gets an equal share of the batch. The depth
  and number of micro-batches with the best predicted time (and that fit in memory)
  are kept, as a careful user would do by trial.
- ``proportional``: the same pipelines, but each pipeline's layers are split in
  proportion to its devices' peak FLOP/s, and each pipeline's batch share is in
  proportion to its throughput.
- ``pipedream``: PipeDream's partitioner (Narayanan et al., SOSP 2019): dynamic
  programming over layers and consecutive device blocks that picks stage boundaries and
  how many devices replicate each stage, minimising the slowest stage (compute of an
  equal share of the micro-batch, plus the stage's all-reduce amortised over the
  micro-batches). Devices are taken in cluster order; replicas split work equally.
All baselines are scored with hetalloc.evaluate.predict, like the planner's plans.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from hetalloc.apportion import largest_remainder
from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.costs import max_share_for_memory
from hetalloc.evaluate import allreduce_time, predict
from hetalloc.errors import InfeasibleError
from hetalloc.plan import Group, Plan, Replica, Stage, validate_plan
from hetalloc.errors import SpecError

BASELINES = ("even", "proportional", "pipedream")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _plan(cluster: Cluster, cg: CostGraph, B: int, M: int, replicas: list[Replica], schedule: str,
          optimizer: str, grad_sync: str, name: str) -> Plan:
    return Plan(model=cg.model, seq_len=cg.seq_len, global_batch=B, num_microbatches=M, schedule=schedule,
                grad_sync=grad_sync, replicas=replicas, optimizer=optimizer, precision=cg.precision,
                cluster_name=cluster.name, cluster_fingerprint=cluster.fingerprint(),
                cost_graph_fingerprint=cg.fingerprint(), planner=name)


def _score(plan: Plan, cluster: Cluster, cg: CostGraph) -> float:
    try:
        validate_plan(plan, cluster, cg)
    except SpecError:
        return math.inf
    p = predict(plan, cluster, cg)
    plan.predicted = p.to_dict()
    return p.iteration_time_s


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


def _pipelines(cluster: Cluster, p: int) -> list[list[str]]:
    ids = [d.id for d in cluster.devices]
    d = len(ids) // p
    return [ids[k * p:(k + 1) * p] for k in range(d)]


def _m_options(per_replica: int, p: int) -> list[int]:
    ds = divisors(per_replica)
    out = [m for m in ds if p <= m <= 8 * p] or [ds[-1]]
    return sorted(set(out + [ds[0]]))


def even_split(cluster: Cluster, cg: CostGraph, B: int, schedule: str = "1f1b", optimizer: str = "adamw",
               grad_sync: str = "ring") -> Plan:
    N, L = cluster.num_devices, cg.num_layers
    best, best_t = None, math.inf
    for p in range(1, min(L, N) + 1):
        pipes = _pipelines(cluster, p)
        if B % len(pipes):
            continue
        per = B // len(pipes)
        for M in _m_options(per, p):
            mb = per // M
            reps = [Replica([Stage(a, b, [Group([dev], mb)]) for (a, b), dev in zip(even_layers(L, p), pipe)])
                    for pipe in pipes]
            plan = _plan(cluster, cg, B, M, reps, schedule, optimizer, grad_sync, "even")
            t = _score(plan, cluster, cg)
            if t < best_t:
                best, best_t = plan, t
    return _or_infeasible(best, "even")


def _integer_split(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of `total` into integers >= 1 proportional to weights."""
    return largest_remainder(total, weights, minimum=1)


def proportional_split(cluster: Cluster, cg: CostGraph, B: int, schedule: str = "1f1b",
                       optimizer: str = "adamw", grad_sync: str = "ring") -> Plan:
    N, L = cluster.num_devices, cg.num_layers
    work = np.array([l.fwd_flops + 1.0 for l in cg.layers])
    best, best_t = None, math.inf
    for p in range(1, min(L, N) + 1):
        pipes = _pipelines(cluster, p)
        splits, rates = [], []
        for pipe in pipes:
            speeds = [cluster.dtype(d).peak_flops for d in pipe]
            sp = weighted_layers(work, speeds)
            if sp is None:
                break
            splits.append(sp)
            rates.append(min(v / (work[a:b].sum()) for (a, b), v in zip(sp, speeds)))
        if len(splits) != len(pipes):
            continue
        for M in divisors(B):
            if not (p <= M <= 8 * p or M == 1) or B // M < len(pipes):
                continue
            mbs = _integer_split(B // M, rates)
            reps = [Replica([Stage(a, b, [Group([dev], mb)]) for (a, b), dev in zip(sp, pipe)])
                    for sp, pipe, mb in zip(splits, pipes, mbs)]
            plan = _plan(cluster, cg, B, M, reps, schedule, optimizer, grad_sync, "proportional")
            t = _score(plan, cluster, cg)
            if t < best_t:
                best, best_t = plan, t
    return _or_infeasible(best, "proportional")


def pipedream_split(cluster: Cluster, cg: CostGraph, B: int, schedule: str = "1f1b",
                    optimizer: str = "adamw", grad_sync: str = "ring") -> Plan:
    ids = [d.id for d in cluster.devices]
    N, L = len(ids), cg.num_layers
    # Units of consecutive devices: single devices, or whole nodes on large clusters.
    if N <= 64:
        units = [[d] for d in ids]
    else:
        units = [[d.id for d in n.devices] for n in cluster.nodes]
    best, best_t = None, math.inf
    # In-flight micro-batches are not known before the split: check the last stage's
    # (least) need here; the final validation rejects splits that do not fit.
    for M in sorted({m for m in divisors(B) if m in (1, 2, 4, 8, 16, 32, 64) or m == B}):
        b = B // M
        infl = M if schedule == "gpipe" else 1
        caps = {t: _memory_caps(cg, cluster.device_types[t], infl, optimizer) for t in cluster.type_counts()}
        stages = _pipedream_dp(cluster, cg, units, b, M, schedule, optimizer, grad_sync, caps)
        if stages is None:
            continue
        reps = [Replica(stages)]
        plan = _plan(cluster, cg, B, M, reps, schedule, optimizer, grad_sync, "pipedream")
        t = _score(plan, cluster, cg)
        if t < best_t:
            best, best_t = plan, t
    return _or_infeasible(best, "pipedream")


def _affine_allreduce(cluster: Cluster, block: list[str], grad_sync: str) -> tuple[float, float]:
    """All-reduce time of a fixed group is affine in the bytes: (seconds per byte, seconds)."""
    if len(block) <= 1:
        return 0.0, 0.0
    t1 = allreduce_time(cluster, block, 1e6, grad_sync)
    t2 = allreduce_time(cluster, block, 2e6, grad_sync)
    return (t2 - t1) / 1e6, 2 * t1 - t2


def _memory_caps(cg: CostGraph, dtype, in_flight: int, optimizer: str) -> np.ndarray:
    """caps[i, j] = largest share of layers [i, j) that fits on dtype (-1: weights do not fit)."""
    L = cg.num_layers
    caps = np.full((L + 1, L + 1), -1, dtype=np.int64)
    for i in range(L):
        for j in range(i + 1, L + 1):
            caps[i, j] = max_share_for_memory(cg.params(i, j), sum(l.saved_act_bytes for l in cg.layers[i:j]),
                                              cg.layers[j - 1].out_act_bytes, in_flight, cg.precision,
                                              optimizer, dtype)
    return caps


def _pipedream_dp(cluster, cg, units, b, M, schedule, optimizer, grad_sync, caps) -> list[Stage] | None:
    L, U = cg.num_layers, len(units)
    px = {}  # (type, share) -> prefix of fwd+bwd times

    def prefix(t, k):
        key = (t, k)
        if key not in px:
            f, bw = cg.prefix_times(cluster.device_types[t], k)
            px[key] = f + bw
        return px[key]

    gbytes_px = np.concatenate([[0], np.cumsum([l.params for l in cg.layers])]) * (4 if cg.precision == "fp32" else 2)
    sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024} | {U})
    INF = math.inf
    A = np.full((L + 1, U + 1), INF)
    choice: dict[tuple[int, int], tuple[int, int]] = {}
    A[0, 0] = 0.0
    unit_types = [sorted({cluster.device(d).type for d in u}) for u in units]
    for k in range(1, U + 1):
        for m in sizes:
            if m > k:
                break
            block = [d for u in units[k - m:k] for d in u]
            ndev = len(block)
            if ndev > b:
                continue
            share = -(-b // ndev)
            types = sorted({t for u in unit_types[k - m:k] for t in u})
            slope, icpt = _affine_allreduce(cluster, block, grad_sync)
            prev = A[:, k - m]
            for j in range(1, L + 1):
                i = np.arange(j)
                comp = np.max([prefix(t, share)[j] - prefix(t, share)[i]
                               + 2 * cluster.device_types[t].op_overhead_s for t in types], axis=0)
                ar = (slope * (gbytes_px[j] - gbytes_px[i]) + icpt) / M if ndev > 1 else 0.0
                cost = np.maximum(prev[:j], np.maximum(comp, ar))
                for t in types:  # the stage must fit on every device of the block
                    cost = np.where(caps[t][:j, j] >= share, cost, INF)
                ii = int(np.argmin(cost))
                if cost[ii] < A[j, k]:
                    A[j, k] = cost[ii]
                    choice[(j, k)] = (ii, m)
    k = int(np.argmin(A[L, 1:])) + 1
    if not math.isfinite(A[L, k]):
        return None
    stages, j = [], L
    while j > 0:
        i, m = choice[(j, k)]
        block = [d for u in units[k - m:k] for d in u]
        shares = [b // len(block) + (1 if x < b % len(block) else 0) for x in range(len(block))]
        stages.append(Stage(i, j, [Group([d], s) for d, s in zip(block, shares)]))
        j, k = i, k - m
    return stages[::-1]


def _or_infeasible(plan: Plan | None, name: str) -> Plan:
    if plan is None:
        raise InfeasibleError(f"the {name} baseline found no configuration that fits in memory")
    return plan


BASELINE_FUNCS: dict[str, Callable[..., Plan]] = {
    "even": even_split,
    "proportional": proportional_split,
    "pipedream": pipedream_split,
}


def baseline_plan(name: str, cluster: Cluster, cg: CostGraph, B: int, **kw) -> Plan:
    if name not in BASELINE_FUNCS:
        raise SpecError("--baseline", "", f"unknown baseline '{name}'", f"use one of {', '.join(BASELINES)}")
    return BASELINE_FUNCS[name](cluster, cg, B, **kw)
