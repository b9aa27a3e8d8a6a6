"""The runtime's own time per op and per step, measured by running it (the last part of
``hetalloc profile``).

Layer times, optimizer and links are measured in isolation; what the runtime adds around
them (posting transfers, splitting slices, dispatch and bookkeeping per op; inputs,
gradient zeroing and the end-of-step work per step) only shows in a real run, as the
``other`` time every rank records (runtime.metrics). So the profile trains two short
plans on the profiled devices: one pipeline over the ranks (a stage each, layers cut
evenly, 1F1B) with 2 and with 8 micro-batches of SHARE samples, STEPS steps each
(median over steps). A rank runs 2M ops a step, so per rank

    other(M) = step_overhead + 2 M op_overhead

and the two runs give both figures; a device type gets the median over its ranks
(negative fits clamp to 0). Where a host has more ranks than compute slots, the runs
take its ranks in the profile's turns (as many at a time as it has slots), so that each
figure is the rank's own time and not its wait for a shared core (the simulator shares
the cores). They are written into the profile's cluster.yaml as
``op_overhead_us`` and ``step_overhead_us`` of the device types, where the shared cost
formulas (CostGraph.range_time, costs.optimizer_time) add them.

Never imports torch (the runs are torchrun subprocesses).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.plan import Plan

from ..config import slowdown_for_plan
from ..launch import run_local
from ..plans import hand_plan

MICROBATCHES = (2, 8)
SHARE = 2
STEPS = 16
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


def _median_other(path: Path) -> float:
    """Median 'other' seconds over the steps after warm-up (a step now and then loses a
    few milliseconds to the operating system; the median step is what runs are judged by)."""
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return statistics.median(r["other_s"] for r in recs[WARMUP_STEPS:])


def fit_overheads(others: dict[int, dict[str, float]]) -> dict[str, tuple[float, float]]:
    """others[M][device] = median 'other' seconds per step -> device -> (op, step) seconds."""
    m1, m2 = sorted(others)
    out = {}
    for dev in others[m1]:
        op = max(0.0, (others[m2][dev] - others[m1][dev]) / (2 * (m2 - m1)))
        out[dev] = (op, max(0.0, others[m1][dev] - 2 * m1 * op))
    return out


def measure_overheads(out_dir: str | Path, cluster: Cluster, cg: CostGraph,
                      slowdown: dict[int, float] | None = None, turns: list[list[int]] | None = None) -> dict[str, Any]:
    """Run the calibration plans; returns per-device and per-type figures (see module doc).
    turns: the profile's groups of ranks (device k is rank k) that run at one time
    (None: all at once)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [d.id for d in cluster.devices]
    groups = [[ids[r] for r in t] for t in (turns or [list(range(len(ids)))])]
    others: dict[int, dict[str, float]] = {M: {} for M in MICROBATCHES}
    for g, devices in enumerate(groups):
        for M in MICROBATCHES:
            plan = calibration_plan(cluster, cg, M, devices)
            tag = f"m{M}" if len(groups) == 1 else f"m{M}-turn{g}"
            path = out / f"plan-{tag}.json"
            plan.save(path)
            slow = slowdown_for_plan(ids, slowdown or {}, set(plan.device_ids()))
            run_dir = out / f"run-{tag}"
            summary = run_local(path, steps=WARMUP_STEPS + STEPS, slowdown=slow, out_dir=run_dir, capture=True,
                                extra=["--warmup-steps", str(WARMUP_STEPS)])
            others[M].update({r["device"]: _median_other(run_dir / f"metrics.rank{r['rank']}.jsonl")
                              for r in summary["ranks"]})
    per_device = fit_overheads(others)
    per_type: dict[str, dict[str, float]] = {}
    for t in sorted({cluster.device(d).type for d in per_device}):
        mine = [per_device[d] for d in per_device if cluster.device(d).type == t]
        per_type[t] = {"op_overhead_us": 1e6 * statistics.median(o for o, _ in mine),
                       "step_overhead_us": 1e6 * statistics.median(s for _, s in mine)}
    return {"microbatches": list(MICROBATCHES), "share": SHARE, "steps": STEPS, "groups": groups,
            "other_s": {str(M): v for M, v in others.items()},
            "per_device": {d: {"op_overhead_us": 1e6 * o, "step_overhead_us": 1e6 * s}
                           for d, (o, s) in per_device.items()},
            "per_type": per_type}


def with_overheads(cluster: Cluster, per_type: dict[str, dict[str, float]]) -> Cluster:
    """The cluster with its device types carrying the measured figures (rounded to 0.1 µs)."""
    types = dict(cluster.device_types)
    for t, f in per_type.items():
        types[t] = replace(types[t], op_overhead_us=round(f["op_overhead_us"], 1),
                           step_overhead_us=round(f["step_overhead_us"], 1))
    return replace(cluster, device_types=types, _path_cache={})
