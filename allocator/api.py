"""Entry point of the allocator: a Plan for (cluster, cost graph, global batch)."""

from __future__ import annotations

import math
import time
from typing import Callable

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph, analytic_cost_graph
from hetalloc.costs import (GRAD_SYNC, OPTIMIZER_SHARDING, OPTIMIZERS, RECOMPUTE, SCHEDULES, TP_DEGREES, param_bytes,
                            usable_memory)
from hetalloc.errors import InfeasibleError, SpecError
from hetalloc.evaluate import predict
from hetalloc.plan import Plan, attach_context, mixed_tp_segments, validate_plan

from .baselines import BASELINES, BaselineStopped, baseline_plan, limits_for
from .milp import available_backends
from .placement import place
from .problem import Problem, total_state_bytes, total_usable_memory, tp_priced, unit_degree
from .search import search
from .seeds import seeds_of


def check_request(cluster: Cluster, cg: CostGraph, global_batch: int, schedule: str, optimizer: str,
                  grad_sync: str) -> None:
    if not isinstance(global_batch, int) or global_batch < 1:
        raise SpecError("--global-batch", "", f"must be a whole number >= 1, got {global_batch!r}",
                        "give the number of samples per iteration")
    if schedule not in SCHEDULES:
        raise SpecError("--schedule", "", f"unknown schedule '{schedule}'", f"use one of {', '.join(SCHEDULES)}")
    if optimizer not in OPTIMIZERS:
        raise SpecError("--optimizer", "", f"unknown optimizer '{optimizer}'", f"use one of {', '.join(OPTIMIZERS)}")
    if grad_sync not in GRAD_SYNC + ("auto",):
        raise SpecError("--grad-sync", "", f"unknown algorithm '{grad_sync}'",
                        f"use auto or one of {', '.join(GRAD_SYNC)}")


def tp_degrees(cluster: Cluster, cg: CostGraph, tp: str | int) -> list[int]:
    """Largest tensor-parallel unit sizes to search: the one asked for, or (auto) every
    degree that gives another split of the cluster into units (``Problem.tp``) among the
    types whose split times the cost graph can price (``allocator.problem.tp_priced``)."""
    if tp != "auto":
        t = int(tp)
        if t not in TP_DEGREES:
            raise SpecError("--tp", "", f"{tp} is not a tensor-parallel degree", f"use auto or one of {TP_DEGREES}")
        if t > 1 and not cg.supports_tp:
            raise SpecError("--tp", "", "this cost graph does not say how its layers split",
                            "re-profile or use a built-in model, or --tp 1")
        return [t]
    if not cg.supports_tp:
        return [1]
    per_node = sorted({k for n in cluster.nodes for t, k in n.type_counts().items() if tp_priced(cg, t)})
    out, seen = [], set()
    for t in TP_DEGREES:
        key = tuple(unit_degree(k, t) for k in per_node)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def plan_spaces(cluster: Cluster, cg: CostGraph, global_batch: int, degrees: list[int], sharding: str,
                auto_tp: bool = True, **kw) -> list[Problem]:
    """The plan spaces searched together: one per tensor-parallel unit size and optimizer
    sharding. zero1 shards the optimizer state at no extra communication in the planner's
    model (a reduce-scatter and an all-gather are one all-reduce), so with ``auto`` its
    space replaces the unsharded one, which is kept only where zero1 excludes stages
    (units of different tensor-parallel sizes in one stage, which the runtime does not
    shard)."""
    out = []
    for t in degrees:
        for s in (("zero1", "none") if sharding == "auto" else (sharding,)):
            prob = Problem(cluster, cg, global_batch, tp=t, optimizer_sharding=s, tp_priced_only=auto_tp, **kw)
            if sharding == "auto" and s == "none" and len({c.tp for c in prob.classes}) == 1:
                continue
            out.append(prob)
    return out


FIT_CHECK_SECONDS = 2.0
"""Search budget of each change fit_suggestions tries (work, not a clock, as every search)."""


def fit_suggestions(cluster: Cluster, cg: CostGraph, global_batch: int, *, schedule: str, optimizer: str,
                    tp: str | int, recompute: str, optimizer_sharding: str, group_identical_nodes: bool) -> str:
    """The changes to an infeasible request that the planner finds a plan for (each tried
    on its own, in this order: the plan-space options the request turned off, the 1F1B
    schedule, SGD, shorter sequences); '' if none."""
    tries: list[tuple[str, dict, CostGraph]] = []
    base = dict(schedule=schedule, optimizer=optimizer, tp=tp, recompute=recompute, sharding=optimizer_sharding)
    if str(tp) != "auto" and cg.supports_tp:
        tries.append(("--tp auto", dict(base, tp="auto"), cg))
    if recompute == "none":
        tries.append(("--recompute auto", dict(base, recompute="auto"), cg))
    if optimizer_sharding == "none":
        tries.append(("--optimizer-sharding auto", dict(base, sharding="auto"), cg))
    if schedule != "1f1b":
        tries.append(("--schedule 1f1b", dict(base, schedule="1f1b"), cg))
    if optimizer != "sgd":
        tries.append(("--optimizer sgd", dict(base, optimizer="sgd"), cg))
    try:
        shape = cg.shape()
    except SpecError:
        shape = None
    if shape is not None:
        for seq in (cg.seq_len // 2, cg.seq_len // 4):
            if seq >= 16:
                short = analytic_cost_graph(shape, seq, precision=cg.precision)
                tries.append((f"--seq {seq}", base, short))
    fits = []
    for flag, o, g in tries:
        degrees = tp_degrees(cluster, g, o["tp"])
        probs = plan_spaces(cluster, g, global_batch, degrees, o["sharding"], auto_tp=str(o["tp"]) == "auto",
                            schedule=o["schedule"],
                            optimizer=o["optimizer"], group_identical_nodes=group_identical_nodes,
                            recompute=o["recompute"])
        if search(probs, time_limit=FIT_CHECK_SECONDS).best is not None:
            fits.append(flag)
            if flag.startswith("--seq"):
                break  # the longest sequence that fits is enough
    if not fits:
        return ""
    return "; a plan fits with " + " or ".join(fits)


def memory_shortfall(cluster: Cluster, cg: CostGraph, optimizer: str) -> str:
    """A sentence saying why the model cannot fit, with the smallest memory that would."""
    pb = param_bytes(cg.precision, optimizer)
    biggest = max((cluster.device_types[t] for t in cluster.type_counts()), key=lambda t: t.memory_bytes)
    # the least a layer can need on one device: split over the largest tensor-parallel group
    # of the biggest type one node holds, recomputing where that keeps less
    per_node = max(n.type_counts().get(biggest.name, 0) for n in cluster.nodes)
    degrees = [t for t in TP_DEGREES if t <= per_node] if cg.supports_tp else [1]
    t_max = max(degrees, default=1)

    def need(i: int) -> float:
        l = cg.layers[i]
        return min(cg.range_params(i, i + 1, t_max) * pb.total + cg.range_saved_bytes(i, i + 1, t_max, rc)
                   + cg.range_working_bytes(i, i + 1, t_max, rc) + 2 * l.out_act_bytes for rc in RECOMPUTE)

    worst_i = max(range(cg.num_layers), key=need)
    need_layer, worst = need(worst_i), cg.layers[worst_i]
    cap = usable_memory(biggest)
    if need_layer > cap:
        split = f" even split over {t_max} {biggest.name} devices" if t_max > 1 else ""
        return (f"layer '{worst.name}' alone needs {need_layer / 2**30:.2f} GiB per device{split} (weights, "
                f"gradients and {optimizer} state, one sample of activations); the largest device "
                f"({biggest.name}) has {cap / 2**30:.2f} GiB usable — use devices with at least "
                f"{need_layer / 2**30 / 0.9:.1f} GiB, a shorter --seq, or another optimizer")
    total_state = total_state_bytes(cg, optimizer)
    total_cap = total_usable_memory(cluster)
    if total_state > total_cap:
        return (f"the model's weights, gradients and {optimizer} state need {total_state / 2**30:.1f} GiB; the "
                f"cluster has {total_cap / 2**30:.1f} GiB usable in all — add devices")
    return ("no split fits: activations of the micro-batches in flight exceed device memory even at one "
            "sample per micro-batch")


def make_plan(cluster: Cluster, cg: CostGraph, global_batch: int, *, schedule: str = "1f1b",
              optimizer: str = "adamw", grad_sync: str = "auto", time_limit: float = 30.0, gap: float = 0.0,
              backend: str = "highs", baseline: str | None = None, compare_baselines: bool = True,
              group_identical_nodes: bool = True, msg: bool = False, tp: str | int = "auto",
              recompute: str = "auto", optimizer_sharding: str = "auto",
              progress: Callable[[str], None] | None = None) -> Plan:
    """Plan `global_batch` samples per iteration of model `cg` on `cluster`.

    baseline: return that baseline's plan instead of solving. Otherwise the integer
    program is solved (time-limited); the result records the solver status, objective,
    proven bound and gap. With compare_baselines the baselines are scored too and noted.
    tp: largest tensor-parallel unit (auto: search each useful size); recompute: auto (per
    stage), none or full; optimizer_sharding: auto (search with and without zero1 where
    they differ), none or zero1.
    """
    started = time.perf_counter()
    check_request(cluster, cg, global_batch, schedule, optimizer, "ring" if grad_sync == "auto" else grad_sync)
    sync = "ring" if grad_sync == "auto" else grad_sync
    if baseline is not None:
        if baseline not in BASELINES:
            raise SpecError("--baseline", "", f"unknown baseline '{baseline}'", f"use one of {', '.join(BASELINES)}")
        work, deadline = limits_for(time_limit, started)
        try:
            plan = baseline_plan(baseline, cluster, cg, global_batch, schedule=schedule, optimizer=optimizer,
                                 grad_sync=sync, work=work, deadline=deadline)
        except InfeasibleError:
            raise InfeasibleError(memory_shortfall(cluster, cg, optimizer)) from None
        except BaselineStopped:
            raise InfeasibleError(f"the {baseline} baseline did not finish within --time-limit {time_limit:g} s "
                                  "— raise the limit") from None
        return _finish(plan, cluster, cg, grad_sync)
    if backend not in available_backends():
        raise SpecError("--solver", "", f"solver back end '{backend}' is not available",
                        f"available here: {', '.join(available_backends()) or 'none'}; "
                        "'pip install highspy' gives HiGHS")
    if recompute not in RECOMPUTE + ("auto",):
        raise SpecError("--recompute", "", f"unknown choice '{recompute}'", f"use auto or one of {', '.join(RECOMPUTE)}")
    if optimizer_sharding not in OPTIMIZER_SHARDING + ("auto",):
        raise SpecError("--optimizer-sharding", "", f"unknown choice '{optimizer_sharding}'",
                        f"use auto or one of {', '.join(OPTIMIZER_SHARDING)}")
    degrees = tp_degrees(cluster, cg, tp)
    probs = plan_spaces(cluster, cg, global_batch, degrees, optimizer_sharding, auto_tp=str(tp) == "auto",
                        schedule=schedule, optimizer=optimizer, group_identical_nodes=group_identical_nodes,
                        recompute=recompute)
    # The baselines first (each within its work bound): those in a searched space are the
    # search's first incumbents, so its plan is never worse than theirs in its model.
    scored = run_baselines(cluster, cg, global_batch, schedule, optimizer, sync, time_limit, started) \
        if compare_baselines else []
    # (not plans of more than FALLBACK_MAX_M micro-batches: neither good starting points nor
    # cheap to time exactly)
    # Not on clusters of more than SEED_DEVICES: on 100,000 GPUs at a batch of 1e8 a seed
    # led the search to an 87.07 s/iteration plan where it finds 66.63 s without (not
    # understood yet; benchmarks/RESULTS.md).
    seeds = [(cp, q) for cp, q in seeds_of([bp for _, bp in scored if isinstance(bp, Plan)], probs)
             if cp.M <= FALLBACK_MAX_M] if cluster.num_devices <= SEED_DEVICES else []
    res = search(probs, time_limit=SEARCH_SHARE * time_limit, gap=gap, backend=backend, msg=msg, progress=progress,
                 seeds=seeds, deadline=started + DEADLINE_SHARE * time_limit)
    prob = res.prob
    best = res.best
    if best is None and res.status != "infeasible":
        best = fallback_plan(prob, time_limit)  # a plan the heuristics can build within its budget
    best_base = fastest(scored)
    if best is None and res.status != "infeasible" and best_base is not None:
        # the search found no plan in time (the baseline is in none of its spaces): the
        # fastest baseline, saying so
        best_base.solver = {"status": "time_limit", "objective_s": None, "bound_s": res.bound, "gap": None,
                            "seconds": res.seconds, "backend": "none", "stopped_by_clock": res.stopped_by_clock}
        plan = _finish(best_base, cluster, cg, grad_sync)
        plan.notes.extend([f"the search found no plan within --time-limit {time_limit:g} s; returning the "
                           f"fastest baseline ({best_base.planner})"] + baseline_notes(scored, None))
        return plan
    if best is None:
        if res.status == "infeasible":
            raise InfeasibleError(memory_shortfall(cluster, cg, optimizer) + fit_suggestions(
                cluster, cg, global_batch, schedule=schedule, optimizer=optimizer, tp=tp, recompute=recompute,
                optimizer_sharding=optimizer_sharding, group_identical_nodes=group_identical_nodes))
        raise InfeasibleError(f"no plan found within --time-limit {time_limit:g} s — raise the limit")
    plan, chosen, prob, rank = placed_best(res.pool if best is res.best else [(best, prob)], cluster, cg, sync,
                                           grad_sync)
    gap_ = max(0.0, (chosen.objective_s - res.bound) / chosen.objective_s) if math.isfinite(res.bound) else math.inf
    status = res.status if best is res.best else "time_limit"
    if chosen is not best and status == "optimal":
        status = "feasible"  # the model's optimum is proven; the plan returned predicts faster than it
    plan.solver = {
        "status": status,
        "objective_s": chosen.objective_s,
        "model_optimum_s": best.objective_s,
        "bound_s": res.bound,
        "gap": gap_,
        "seconds": res.seconds,
        "backend": "dp" if prob.interchangeable_blocks or not res.solves else backend,
        "replicas": chosen.R,
        "stopped_by_clock": res.stopped_by_clock,
        "seeded_by_baselines": len(seeds),
        "model": "planner model (allocator/problem.py): flow shop of the stage times + largest gradient "
                 "sync and optimizer step; 'predicted' is the placed plan's schedule-exact estimate",
    }
    if chosen is not best:
        plan.notes.append(
            f"returned the plan that predicts fastest among the {len(res.pool)} best plans of the planner's "
            f"model (its rank {rank + 1}): model objective {chosen.objective_s:.4g} s against the model optimum "
            f"{best.objective_s:.4g} s; the model's pipeline sends cross the sender's NIC, the prediction uses "
            "the placed devices' links")
    if len(probs) > 1:
        plan.notes.append(f"searched {len(probs)} plan spaces together (tensor-parallel units up to "
                          f"{', '.join(map(str, degrees))} devices; optimizer sharding {optimizer_sharding}); the "
                          f"plan's: units up to {prob.tp}, optimizer sharding {prob.optimizer_sharding}")
    if compare_baselines:
        notes = baseline_notes(scored, plan.predicted["iteration_time_s"])
        if best_base is not None and best_base.predicted["iteration_time_s"] < plan.predicted["iteration_time_s"]:
            notes.append(f"the {best_base.planner} baseline predicts faster than the planner's model optimum "
                         "(the model's link assumptions differ from the placed plan's); returning it")
            best_base.solver = dict(plan.solver)
            plan = _finish(best_base, cluster, cg, grad_sync)
        plan.notes.extend(notes)
    return plan


def placed_best(pool: list, cluster: Cluster, cg: CostGraph, sync: str, grad_sync: str):
    """The plans of ``pool`` (count-level plans with their spaces, best model objective
    first) placed and predicted: (the plan that predicts fastest, its count-level plan, its
    space, its rank in the pool). Ties go to the better model objective."""
    out = None
    if cluster.num_devices > POOL_PLACEMENTS:
        pool = pool[:1]  # placing and predicting cost per device: the best plan only
    cp0, q0 = pool[0]
    devices = sum(cp0.R * n * q0.classes[c].tp for st in cp0.stages for c, n in enumerate(st.counts))
    pool = pool[:max(1, POOL_PLACEMENTS // max(1, devices))]
    for rank, (cp, q) in enumerate(pool):
        if rank and cp.M * sum(sum(st.counts) for st in cp.stages) > POOL_TIMING_OPS:
            continue  # the exact schedule timing of millions of micro-batches: only for the best
        plan = place(q, cp, grad_sync=sync)
        plan.solver = {}
        plan = _finish(plan, cluster, cg, grad_sync)
        t = plan.predicted["iteration_time_s"]
        if out is None or t < out[0] * (1 - 1e-12):
            out = (t, plan, cp, q, rank)
    return out[1:]


SEED_DEVICES = 20_000
"""Largest cluster whose search starts from the baselines' plans."""

POOL_PLACEMENTS = 20_000
"""Devices placed and predicted, in all, when choosing among the search's best plans (a
10,000-device plan is placed twice, a 25,000-device one once)."""


POOL_TIMING_OPS = 1_000_000
"""Largest micro-batches x units of one replica a plan of the pool other than the best may
have to be placed and predicted (the schedule's exact timing is as long)."""


def run_baselines(cluster: Cluster, cg: CostGraph, global_batch: int, schedule: str, optimizer: str, sync: str,
                  time_limit: float, started: float) -> list[tuple[str, Plan | str]]:
    """Every baseline's plan, within its work bound: (name, plan or why it has none)."""
    out: list[tuple[str, Plan | str]] = []
    work, deadline = limits_for(time_limit, started)
    for name in BASELINES:
        try:
            out.append((name, baseline_plan(name, cluster, cg, global_batch, schedule=schedule, optimizer=optimizer,
                                            grad_sync=sync, work=work, deadline=deadline)))
        except InfeasibleError as e:
            out.append((name, f"not scored — {e}"))
        except BaselineStopped:
            out.append((name, "not scored — it did not finish within the time limit"))
    return out


def fastest(scored: list[tuple[str, Plan | str]]) -> Plan | None:
    plans = [bp for _, bp in scored if isinstance(bp, Plan)]
    return min(plans, key=lambda p: p.predicted["iteration_time_s"], default=None)


def baseline_notes(scored: list[tuple[str, Plan | str]], reference: float | None) -> list[str]:
    """A note per baseline: its predicted time (against ``reference`` seconds when given)."""
    notes = []
    for name, bp in scored:
        if not isinstance(bp, Plan):
            notes.append(f"baseline {name}: {bp}")
            continue
        t = bp.predicted["iteration_time_s"]
        notes.append(f"baseline {name}: {t:.4g} s/iteration"
                     + (f" ({t / reference:.2f}x this plan's time)" if reference else "")
                     + ("; its search stopped at its work bound" if any("work bound" in n for n in bp.notes) else ""))
    return notes


SEARCH_SHARE = 0.8
"""Share of --time-limit the search's work budget is sized for; the rest is for the
baselines, placing and predicting, so the whole command ends within the limit."""

DEADLINE_SHARE = 0.9
"""Share of --time-limit after which the wall clock stops the search (a last resort: its
work budget normally stops it first)."""


FALLBACK_EVALS_PER_SECOND = 10_000
"""Stage-time evaluations the fallback heuristics may spend per second of --time-limit
(~55,000 per second here: about a fifth of the limit). A work budget, not a clock."""


FALLBACK_MAX_M = 1024


def fallback_plan(prob: Problem, time_limit: float):
    """The best of the dealing heuristic's plans (allocator.heuristic) for a few replica and
    micro-batch counts, for when the search ended without a plan, within a work budget."""
    from .heuristic import Work, heuristic_plan
    work = Work(max(1000, int(FALLBACK_EVALS_PER_SECOND * time_limit)))
    best = None
    # smallest micro-batches first, among at most FALLBACK_MAX_M of them (a schedule of
    # millions of micro-batches is neither a good plan nor one the prediction can time)
    order = sorted(prob.candidates(), key=lambda rm: (rm[1] > FALLBACK_MAX_M, prob.global_batch // (rm[0] * rm[1]), rm))
    for R, M in order[:24]:
        if work.left <= 0:
            break
        h = heuristic_plan(prob, R, M, max_stages=8, work=work)
        if h is not None and (best is None or h.objective_s < best.objective_s):
            best = h
    return best


def _finish(plan: Plan, cluster: Cluster, cg: CostGraph, grad_sync: str) -> Plan:
    """Pick the gradient sync algorithm (auto: fastest predicted), validate, predict."""
    attach_context(plan, cluster, cg)
    validate_plan(plan, cluster, cg)
    pred = predict(plan, cluster, cg)
    if grad_sync == "auto":
        times = pred.sync_by_algorithm
        if mixed_tp_segments(plan):  # the parameter server shards only between groups of one size
            times.pop("param_server", None)
        chosen = min(times, key=lambda a: (times[a], a != "ring"))
        if chosen != plan.grad_sync:
            plan.grad_sync = chosen
            pred = predict(plan, cluster, cg)
    plan.predicted = pred.to_dict()
    return plan

