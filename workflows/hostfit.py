"""A shared host's compute efficiency, fitted to a run of all its ranks at once.

Where a host has more ranks than compute slots (CPU ranks on fewer cores), the profile
measures each rank in turns, a slot each (runtime.profile), and the simulator shares the
slots among the ranks that compute at one time (simulator.compute: processor sharing).
What turns cannot show is what the operating system takes when the ranks share: switching
between processes, the caches each switch leaves cold, the communication threads' share
of the cores, a rank woken by its data waiting for a core. (On this 2-core host a
training pass's CPU time grew 5-12 % with three processes on the two cores, and a
ping-pong whose peer was woken beside busy cores took milliseconds against 40 µs.)

``fit_efficiency``: the profile's calibration pipeline run with every rank at once
(runtime.profile.overhead.TOGETHER: the larger micro-batch count, a stage per rank) is
simulated on the profiled cluster with the node's share efficiency e
(``Node.share_efficiency``: the fraction of a slot's speed the ranks get while more of
them compute than there are slots), and e is chosen (bisection) so that the simulated
mean step equals the run's mean step after warm-up; 1 when the simulation at full speed
is already as slow, at least ``MIN_EFFICIENCY``; not applied (1) where other processes
took more than ``DISTURBED`` of the host during the profile, and by default (it
over-corrects other plans: ``fit_efficiency``). Written into the profile's cluster.yaml
when applied.
A host where every rank has a slot has no such run and keeps 1.

Never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from hetalloc.cluster import Cluster, load_cluster
from hetalloc.costgraph import load_cost_graph
from hetalloc.fileio import atomic_write_json
from hetalloc.plan import load_plan
from runtime.profile.files import write_cluster
from runtime.profile.overhead import MICROBATCHES, TOGETHER, WARMUP_STEPS
from simulator import simulate
from simulator.engine import prediction_iterations

from .hostload import DISTURBED

MIN_EFFICIENCY = 0.5
"""The bisection's lower end: sharing that halved the cores' speed would be something
else (a busy host: other processes), not the switching between ranks; the fit says so
(``clamped``)."""
TOLERANCE = 0.002
"""Relative step-time difference at which the bisection stops."""
FIT_FILE = "share_efficiency.json"
"""The fit's figures, next to the profile's cluster.yaml."""


def with_efficiency(cluster: Cluster, efficiency: float) -> Cluster:
    """The cluster with every node that shares its compute slots at `efficiency`."""
    nodes = [dataclasses.replace(n, share_efficiency=round(efficiency, 4)) if n.shares_compute else n
             for n in cluster.nodes]
    return dataclasses.replace(cluster, nodes=nodes, _path_cache={})


def measured_step_s(run_dir: Path) -> float:
    """Mean step time after warm-up of a run (rank 0's metrics.jsonl)."""
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_time_s"] for r in recs if "event" not in r and r["step"] > WARMUP_STEPS]
    return statistics.fmean(steps)


def simulated_step_s(plan, cluster: Cluster, cg) -> float:
    """The mean simulated iteration (noisy where the profile measured noise)."""
    rep = simulate(plan, cluster, cg, compare=False, iterations=prediction_iterations(cluster))
    return rep.iteration_ends_s[-1] / len(rep.iteration_ends_s)


def fit_efficiency(profile_dir: str | Path, write: bool = True,
                   foreign_share: float | None = None, apply: bool = False) -> dict[str, Any] | None:
    """Fit the shared host's compute efficiency to the profile's run of every rank at
    once (module doc) and, with `write`, put it into DIR/cluster.yaml; None when the
    profile has no such run (a slot per rank, or profiled without the runtime's
    calibration runs). foreign_share: the share of the host's CPU other processes took
    during the profile (workflows.hostload); above ``DISTURBED`` the fit is reported but
    not applied: it would measure them, not the ranks' sharing. Applied only with
    ``apply`` (``hetalloc profile --fit-share-efficiency``): measured on this 2-core host
    (benchmarks/RESULTS.md), one efficiency fitted to the pipeline run (0.55-0.76)
    over-corrects other plans (a data-parallel plan 27 % too slow, the adaptive
    benchmark's 3-rank runs 14-40 % under-predicted), so by default it is reported only."""
    out = Path(profile_dir)
    tag = f"m{MICROBATCHES[-1]}{TOGETHER}"
    plan_path, run_dir = out / "overhead" / f"plan-{tag}.json", out / "overhead" / f"run-{tag}"
    if not plan_path.exists() or not (run_dir / "metrics.jsonl").exists():
        return None
    cluster, cg = load_cluster(out / "cluster.yaml"), load_cost_graph(out / "cost_graph.json")
    if not any(n.shares_compute for n in cluster.nodes):
        return None
    plan = load_plan(plan_path)
    measured = measured_step_s(run_dir)

    def sim(e: float) -> float:
        return simulated_step_s(plan, with_efficiency(cluster, e), cg)

    full = sim(1.0)
    lo, hi = MIN_EFFICIENCY, 1.0
    if full >= measured:
        lo = 1.0
    elif sim(MIN_EFFICIENCY) <= measured:
        hi = MIN_EFFICIENCY
    else:
        for _ in range(40):
            mid = (lo + hi) / 2
            s = sim(mid)
            if abs(s / measured - 1) <= TOLERANCE:
                lo = hi = mid
                break
            lo, hi = (lo, mid) if s < measured else (mid, hi)
    efficiency = round((lo + hi) / 2, 4)
    applied = apply and (foreign_share is None or foreign_share <= DISTURBED)
    fit = {"share_efficiency": efficiency if applied else 1.0, "fitted": efficiency, "applied": applied,
           "measured_step_s": measured, "simulated_full_speed_s": full, "simulated_s": sim(efficiency),
           "clamped": efficiency == MIN_EFFICIENCY, "foreign_cpu_share": foreign_share, "run": str(run_dir)}
    if write:
        if applied:
            write_cluster(out, with_efficiency(cluster, efficiency))
        atomic_write_json(out / FIT_FILE, fit)
    return fit
