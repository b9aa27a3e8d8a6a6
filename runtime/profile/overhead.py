"""The runtime's own time per op and per step, measured by running it (the last part of
``hetalloc profile``).

Layer times, optimizer and links are measured in isolation; what the runtime adds around
them (posting transfers, splitting slices, dispatch and bookkeeping per op; inputs,
gradient zeroing and the end-of-step work per step) only shows in a real run, as the
``other`` time every rank records (runtime.metrics). So the profile trains two short
plans on the profiled devices: one pipeline over the ranks (a stage each, layers cut
evenly, 1F1B) with 2 and with 8 micro-batches of SHARE samples, STEPS steps each
(mean over steps: an op now and then loses milliseconds to the operating system, and a
step of many ops has many chances of it, so a run's median step holds about the ops'
mean time, not their median). A rank runs 2M ops a step, so per rank

    other(M) = step_overhead + 2 M op_overhead

(``other`` without the time the rank spent building its inputs, which the runtime
records as ``data_s``: a first or last stage's rank builds SHARE x M samples a step, and
the two runs give a line through them, ``data_us`` per step and ``data_sample_us`` per
sample, ``fit_data``)

and the two runs give both figures; a device type gets the median over its ranks
(negative fits clamp to 0). The same runs give two figures about compute: what a
rank's ops compute beyond the profiled layer times (measured minus profiled compute,
each backward warm or cold as its place in the schedule says, ``profiled_compute``;
per op over both runs: ``op_compute_us``; booked as compute, not as the runtime's own
time), and how much a rank's compute varies from step to step on its own
(``compute_noise``: the spread of log(step compute / the rank's median) once what all
ranks shared in that step is taken out, IQR / 1.349, the standard deviation of a normal
with that IQR; pooled over the type's ranks and both runs), and the distribution of a
rank's log(step compute / its median), tails included, as ``compute_quantiles``, which
the simulator draws from (a sync waits for the late rank, and how late it comes is the
tails' doing; this one keeps what the ranks shared in a step, which lengthens the step
as much as a rank's own: with two ranks the shared part cannot be told from a stall of
one rank, and taking it out mirrored each stall into an equally fast step of the other
rank); and what a collective takes in
a run beyond its measured table (``collective_extra_us``: per step the end-of-step loss
all-reduce's time on the rank that came to it last, which waited for no one, minus the
table's time, averaged over the steps: threads woken from idle, now and then a stall
of milliseconds). Where a host has more ranks
than compute slots, the runs take its ranks in the profile's turns (as many at a time as it has slots), so that each
figure is the rank's own time and not its wait for a shared core (the simulator shares
the cores); there one more run, of the larger count, takes every rank at once
(``TOGETHER``), for workflows.hostfit. ``refit_overheads`` fits the same figures again to the runs an earlier
profile left (no run: ``benchmarks/sim_accuracy.py --resimulate DIR --refit`` judges a
change of these fits on stored measurements). They are written into the profile's cluster.yaml as
``op_overhead_us`` and ``step_overhead_us`` of the device types, where the shared cost
formulas (CostGraph.range_time, costs.optimizer_time) add them.

Never imports torch (the runs are torchrun subprocesses).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.evaluate import loss_reduction_time
from hetalloc.errors import SpecError
from hetalloc.plan import Plan, load_plan
from hetalloc.schedule import stage_op_order, warm_backward

from ..config import slowdown_for_plan
from ..launch import run_local
from ..plans import hand_plan

MICROBATCHES = (2, 8)
TOGETHER = "-together"
"""Suffix of the calibration run of every rank at once, made where a host has more ranks
than compute slots (the others run in turns): workflows.hostfit fits the host's share
efficiency (``Node.share_efficiency``) to it; the figures here are not fitted to it."""
SHARE = 2
STEPS = 40
WARMUP_STEPS = 2


def calibration_plan(cluster: Cluster, cg: CostGraph, num_microbatches: int,
                     devices: list[str] | None = None) -> Plan:
    """One pipeline replica over `devices` (default all): a stage per device (as many as
    there are layers), layers cut evenly, SHARE samples per micro-batch, 1F1B."""
    devices = (devices or [d.id for d in cluster.devices])[:cg.num_layers]
    S = len(devices)
    cuts = [round(k * cg.num_layers / S) for k in range(S + 1)]
    stages = [((cuts[k], cuts[k + 1]), [(devices[k], SHARE)]) for k in range(S)]
    return hand_plan(cluster, cg, [stages], num_microbatches=num_microbatches, schedule="1f1b",
                     name=f"overhead-m{num_microbatches}-{len(devices)}")


def _records(path: Path) -> list[dict[str, Any]]:
    """A rank's per-step records after warm-up."""
    return [json.loads(line) for line in path.read_text().splitlines()][WARMUP_STEPS:]


def _mean_other(path: Path) -> float:
    """Mean 'other' seconds over the steps after warm-up, without the inputs the rank
    built (``data_s``: priced by ``fit_data``). The mean, not the median: now and then an
    op loses milliseconds to the operating system, and a step of many ops has many such
    chances, so its median holds about the ops' mean losses (the median of a sum is near
    the sum of the means, not of the medians; the quiet host's runs measured their median
    steps 2-20 % above the sum of the per-op medians)."""
    return statistics.fmean(r["other_s"] - r.get("data_s", 0.0) for r in _records(path))


def fit_data(data: dict[int, float]) -> tuple[float, float]:
    """data[samples] = a first or last stage rank's mean seconds building its inputs per
    step, at two sample counts -> (seconds per step, seconds per sample), the line
    through them (clamped at 0): ``hetalloc.costs.input_time``'s two figures. (In the
    quiet host's runs a step's inputs took 0.37-1.03 ms for 8-32 samples, along one line
    whatever the number of micro-batches.)"""
    (n1, d1), (n2, d2) = sorted(data.items())[0], sorted(data.items())[-1]
    per = max(0.0, (d2 - d1) / (n2 - n1)) if n2 > n1 else 0.0
    return max(0.0, d1 - n1 * per), per


def log_spread(xs: list[float]) -> float:
    """IQR / 1.349 of log(x / median(x)): the standard deviation of a log-normal step
    time with the same interquartile range (0 for fewer than 4 positive values)."""
    xs = [x for x in xs if x > 0]
    if len(xs) < 4:
        return 0.0
    med = statistics.median(xs)
    q = statistics.quantiles([math.log(x / med) for x in xs], n=4, method="inclusive")
    return (q[2] - q[0]) / 1.349


QUANTILE_LEVELS = 20
"""compute_quantiles are taken at levels 0, 1/20, ..., 1."""


def log_quantiles(logs: list[float], levels: int = QUANTILE_LEVELS) -> tuple[float, ...]:
    """Quantiles of `logs` at levels 0, 1/levels, ..., 1 (linear between order
    statistics; the least and the largest included), rounded to 1e-4; () for fewer than
    4 values (too few to say anything about tails)."""
    xs = sorted(logs)
    n = len(xs)
    if n < 4:
        return ()
    out = []
    for j in range(levels + 1):
        x = j * (n - 1) / levels
        i = min(int(x), n - 2)
        out.append(round(xs[i] + (x - i) * (xs[i + 1] - xs[i]), 4))
    return tuple(out)


def fit_compute(runs: list[tuple[int, float, list[float]]]) -> float:
    """runs: (ops per step, profiled compute seconds per step, measured per-step compute
    seconds) of one rank -> its compute per op beyond the profile (clamped at 0): the
    mean step's (as ``_mean_other``: stalls included)."""
    extra = sum(statistics.fmean(xs) - pred for _, pred, xs in runs)
    ops = sum(n for n, _, _ in runs)
    return max(0.0, extra / ops) if ops else 0.0


def own_variation(steps: list[list[float]]) -> list[list[float]]:
    """steps[rank][k]: the ranks' compute in step k of one run -> per rank, the log ratio
    of each step's compute to the rank's median with what all ranks shared in that step
    taken out (the mean over the ranks of their log ratios: the host slowing everyone
    down at once, which makes no rank wait for another), scaled by 1 / sqrt(1 - 1/n) so
    that its spread is that of one rank's own variation. A run of one rank keeps its
    log ratios as they are (nothing to tell apart)."""
    logs = [[math.log(x / statistics.median(xs)) for x in xs] for xs in steps]
    n = len(logs)
    if n < 2:
        return logs
    shared = [statistics.fmean(col) for col in zip(*logs)]
    scale = 1.0 / math.sqrt(1.0 - 1.0 / n)
    return [[scale * (x - c) for x, c in zip(row, shared)] for row in logs]


def collective_extra(loss_sync_s: list[list[float]], table_s: float) -> float:
    """loss_sync_s[rank][step]: the ranks' end-of-step loss all-reduce times -> the mean
    over the steps of what the rank that came last (the least time: it waited for no
    one) spent in it beyond the table's `table_s` (at least 0)."""
    last = [min(col) for col in zip(*loss_sync_s)]
    return statistics.fmean(max(0.0, x - table_s) for x in last) if last else 0.0


def profiled_compute(cg: CostGraph, plan: Plan, stage_index: int, dtype) -> float:
    """The layer times of one step of a calibration plan's stage (its single group) as
    the profile measured them, without any per-op figure: every forward, and every
    backward warm or cold as it follows its forward or not (hetalloc.schedule)."""
    s = plan.replicas[0].stages[stage_index]
    share = s.groups[0].share
    f, b = cg.range_time(s.start, s.stop, dtype, share)
    bc = cg.range_time(s.start, s.stop, dtype, share, cold=True)[1]
    order = stage_op_order(plan.schedule, stage_index, len(plan.replicas[0].stages), plan.num_microbatches)
    total = sum(f if kind == "F" else (b if warm_backward(order, k) else bc) for k, (kind, _) in enumerate(order))
    return total - len(order) * dtype.op_overhead_s


def fit_overheads(others: dict[int, dict[str, float]]) -> dict[str, tuple[float, float]]:
    """others[M][device] = median 'other' seconds per step -> device -> (op, step) seconds."""
    m1, m2 = sorted(others)
    out = {}
    for dev in others[m1]:
        op = max(0.0, (others[m2][dev] - others[m1][dev]) / (2 * (m2 - m1)))
        out[dev] = (op, max(0.0, others[m1][dev] - 2 * m1 * op))
    return out


def measure_overheads(out_dir: str | Path, cluster: Cluster, cg: CostGraph,
                      slowdown: dict[int, float] | None = None, turns: list[list[int]] | None = None,
                      threads: int | None = None) -> dict[str, Any]:
    """Run the calibration plans; returns per-device and per-type figures (see module doc).
    turns: the profile's groups of ranks (device k is rank k) that run at one time
    (None: all at once); threads: the intra-op threads per rank the profile measured
    with (a turn of fewer ranks would otherwise get more threads per rank)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [d.id for d in cluster.devices]
    groups = [[ids[r] for r in t] for t in (turns or [list(range(len(ids)))])]
    runs = []
    for g, devices in enumerate(groups):
        for M in MICROBATCHES:
            plan = calibration_plan(cluster, cg, M, devices)
            tag = f"m{M}" if len(groups) == 1 else f"m{M}-turn{g}"
            path = out / f"plan-{tag}.json"
            plan.save(path)
            slow = slowdown_for_plan(ids, slowdown or {}, set(plan.device_ids()))
            run_dir = out / f"run-{tag}"
            summary = run_local(path, steps=WARMUP_STEPS + STEPS, slowdown=slow, out_dir=run_dir, capture=True,
                                extra=["--warmup-steps", str(WARMUP_STEPS)], threads=threads)
            runs.append((plan, run_dir, summary))
    if len(groups) > 1:  # more ranks than slots: one run of every rank at once (workflows.hostfit)
        M = MICROBATCHES[-1]
        plan = calibration_plan(cluster, cg, M, ids)
        path = out / f"plan-m{M}{TOGETHER}.json"
        plan.save(path)
        run_local(path, steps=WARMUP_STEPS + STEPS, slowdown=slowdown_for_plan(ids, slowdown or {}, set(ids)),
                  out_dir=out / f"run-m{M}{TOGETHER}", capture=True, extra=["--warmup-steps", str(WARMUP_STEPS)],
                  threads=threads)
    return fit_runs(cluster, cg, runs, groups)


def refit_overheads(out_dir: str | Path, cluster: Cluster, cg: CostGraph) -> dict[str, Any]:
    """The figures of ``measure_overheads`` fitted again, with this code, to the runs an
    earlier profile left in `out_dir` (its plan-*.json and run-*/ folders): so that a
    change of the fits can be judged on stored measurements without running anything.
    `cluster`'s own runtime figures are ignored (the fits start from the layer tables)."""
    out = Path(out_dir)
    cluster = without_overheads(cluster)
    runs = []
    for path in sorted(out.glob("plan-*.json")):
        if path.stem.endswith(TOGETHER):
            continue  # every rank at once: workflows.hostfit's, not these fits'
        run_dir = out / f"run-{path.stem[len('plan-'):]}"
        if (run_dir / "summary.json").exists():
            runs.append((load_plan(path), run_dir, json.loads((run_dir / "summary.json").read_text())))
    if not runs:
        raise SpecError(str(out), "", "holds no calibration runs (plan-*.json with run-*/summary.json)",
                        "give a profile's overhead folder, written by 'hetalloc profile'")
    groups = [list(plan.device_ids()) for plan, _, _ in runs]
    return fit_runs(cluster, cg, runs, list(dict.fromkeys(map(tuple, groups))))


def fit_runs(cluster: Cluster, cg: CostGraph, runs: list[tuple[Plan, Path, dict[str, Any]]],
             groups: list) -> dict[str, Any]:
    """The figures (see module doc) from calibration runs: (plan, its run folder, its
    summary) each; `groups`: the devices that ran at one time (reported as they are)."""
    others: dict[int, dict[str, float]] = {M: {} for M in MICROBATCHES}
    compute: dict[str, list[tuple[int, float, list[float]]]] = {}
    extra: dict[str, list[float]] = {}
    noise: dict[str, list[float]] = {}
    spread: dict[str, list[float]] = {}
    inputs: dict[str, dict[int, float]] = {}
    for plan, run_dir, summary in runs:
        M = plan.num_microbatches
        others[M].update({r["device"]: _mean_other(run_dir / f"metrics.rank{r['rank']}.jsonl")
                          for r in summary["ranks"]})
        series = []
        last = len(plan.replicas[0].stages) - 1
        for r in summary["ranks"]:
            if r["stage"] in (0, last):  # they build inputs (labels), SHARE x M samples a step
                recs = _records(run_dir / f"metrics.rank{r['rank']}.jsonl")
                inputs.setdefault(r["device"], {})[SHARE * M] = statistics.fmean(x.get("data_s", 0.0) for x in recs)
            dt = cluster.dtype(r["device"])
            profiled = profiled_compute(cg, plan, r["stage"], dt)
            steps = [max(x["compute_s"], 1e-9) for x in _records(run_dir / f"metrics.rank{r['rank']}.jsonl")]
            compute.setdefault(r["device"], []).append((2 * M, profiled, steps))
            series.append(steps)
        for r, logs in zip(summary["ranks"], own_variation(series)):
            noise.setdefault(r["device"], []).extend(logs)
        for r, xs in zip(summary["ranks"], series):
            med = statistics.median(xs)
            spread.setdefault(r["device"], []).extend(math.log(x / med) for x in xs)
        if len(summary["ranks"]) > 1:
            table = loss_reduction_time(cluster, list(plan.device_ids()))
            loss = [[x["loss_sync_s"] for x in _records(run_dir / f"metrics.rank{r['rank']}.jsonl")]
                    for r in summary["ranks"]]
            own = collective_extra(loss, table)
            for r in summary["ranks"]:
                extra.setdefault(r["device"], []).append(own)
    per_device = fit_overheads(others)
    fits = {d: fit_compute(rs) for d, rs in compute.items()}
    data_fits = {d: fit_data(v) for d, v in inputs.items() if len(v) > 1}
    per_type: dict[str, dict[str, float]] = {}
    for t in sorted({cluster.device(d).type for d in per_device}):
        mine = [d for d in per_device if cluster.device(d).type == t]
        logs = [x for d in mine for x in noise.get(d, [])]
        # building inputs is the host's work (not stretched by a slowdown): a type whose
        # devices only served middle stages takes the host's other devices' figures
        with_data = [d for d in mine if d in data_fits] or list(data_fits)
        per_type[t] = {"op_overhead_us": 1e6 * statistics.median(per_device[d][0] for d in mine),
                       "step_overhead_us": 1e6 * statistics.median(per_device[d][1] for d in mine),
                       "op_compute_us": 1e6 * statistics.median(fits[d] for d in mine if d in fits)
                       if any(d in fits for d in mine) else 0.0,
                       "compute_noise": log_spread([math.exp(x) for x in logs]),
                       "compute_quantiles": list(log_quantiles([x for d in mine for x in spread.get(d, [])])),
                       "collective_extra_us": 1e6 * statistics.median(x for d in mine for x in extra.get(d, []))
                       if any(d in extra for d in mine) else 0.0,
                       "data_us": 1e6 * statistics.median(data_fits[d][0] for d in with_data) if with_data else 0.0,
                       "data_sample_us": 1e6 * statistics.median(data_fits[d][1] for d in with_data)
                       if with_data else 0.0}
    return {"microbatches": list(MICROBATCHES), "share": SHARE, "steps": STEPS, "groups": groups,
            "other_s": {str(M): v for M, v in others.items()},
            "per_device": {d: {"op_overhead_us": 1e6 * o, "step_overhead_us": 1e6 * s,
                               "op_compute_us": 1e6 * fits[d] if d in fits else 0.0}
                           for d, (o, s) in per_device.items()},
            "per_type": per_type}


RUNTIME_FIGURES = ("op_overhead_us", "step_overhead_us", "op_compute_us", "compute_noise", "collective_extra_us",
                   "data_us", "data_sample_us")
"""The device-type figures this module measures."""


def without_overheads(cluster: Cluster) -> Cluster:
    """The cluster with its device types' RUNTIME_FIGURES at 0 (as before they were measured)."""
    zero = dict.fromkeys(RUNTIME_FIGURES, 0.0)
    return replace(cluster, device_types={k: replace(t, **zero, compute_quantiles=())
                                          for k, t in cluster.device_types.items()},
                   _path_cache={})


def with_overheads(cluster: Cluster, per_type: dict[str, dict[str, float]]) -> Cluster:
    """The cluster with its device types carrying the measured figures (rounded to 0.1 µs)."""
    types = dict(cluster.device_types)
    for t, f in per_type.items():
        types[t] = replace(types[t], op_overhead_us=round(f["op_overhead_us"], 1),
                           step_overhead_us=round(f["step_overhead_us"], 1),
                           op_compute_us=round(f.get("op_compute_us", 0.0), 1),
                           compute_noise=round(f.get("compute_noise", 0.0), 4),
                           compute_quantiles=tuple(f.get("compute_quantiles", ())),
                           collective_extra_us=round(f.get("collective_extra_us", 0.0), 1),
                           data_us=round(f.get("data_us", 0.0), 1), data_sample_us=round(f.get("data_sample_us", 0.0), 2))
    return replace(cluster, device_types=types, _path_cache={})
