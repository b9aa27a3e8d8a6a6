"""Simulated episodes: many training steps of a plan under a speed trace and failures
(simulator.episode), with and without re-planning, to show when adapting pays
(``hetalloc whatif --straggler DEV=FACTOR@T --policy none|shares|replan``).

Each step is the simulated iteration of the current plan at the speeds in effect when it
starts. The runtime's own monitor (runtime.monitor) is fed every device's simulated
compute seconds against the current plan's predictions, and what it reports goes to the
same decisions a live adaptive run takes (workflows.adaptive): re-balanced shares take
effect ``apply_delay_steps`` steps after the report, or later where the decision takes
``decision_s`` seconds to reach the ranks (the live controller's command is obeyed at a
step boundary); a re-plan costs ``switch_cost_s`` (checkpoint, restart,
warm-up) and starts a new launch (the monitor calibrates again). A device lost during a
step ends the run under policy ``none`` (what a run without adaptation does); under the
others the run re-plans for the devices left, pays the switch cost, and goes back to its
last checkpoint (every ``checkpoint_every`` steps): the steps since are done again.

Never: print; the CLI shows the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.plan import Plan
from runtime.metrics import predicted_by_device
from runtime.monitor import MonitorConfig, StragglerMonitor
from runtime.plans import describe
from simulator.episode import IterationCache, SpeedTrace
from simulator.speeds import in_context

from .adaptive import AdaptOptions, Beliefs, Decision, decide_lost, decide_replan, decide_shares, take_reports


@dataclass(kw_only=True, slots=True)
class EpisodeOptions:
    steps: int
    """Training steps to reach."""
    switch_cost_s: float = 60.0
    """Seconds a restart under another plan costs (checkpoint, restart, warm-up)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (a lost device sends the run back to the last one)."""
    apply_delay_steps: int = 1
    """Steps between a report and its shares change taking effect, at least."""
    decision_s: float = 0.0
    """Seconds from the end of the step a report came with to its command being there for
    the ranks to read (the live controller's poll and its decision: workflows.adaptive);
    the runtime obeys it at the end of the first step that ends after that (0: the
    step after the report, as ``apply_delay_steps`` says)."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be at least 1.")
        if self.switch_cost_s < 0:
            raise ValueError("switch_cost_s must be >= 0.")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1.")
        if self.apply_delay_steps < 0:
            raise ValueError("apply_delay_steps must be >= 0.")
        if self.decision_s < 0:
            raise ValueError("decision_s must be >= 0.")


def _monitor(plan: Plan, opts: EpisodeOptions) -> tuple[StragglerMonitor, list[str]]:
    devices = plan.device_ids()
    return StragglerMonitor(opts.monitor, devices, _predicted(plan, devices), 2 * plan.num_microbatches), devices


def _predicted(plan: Plan, devices: list[str]) -> list[float]:
    from hetalloc.plan import plan_context
    cluster, cg = plan_context(plan)
    pred = predicted_by_device(plan, cluster, cg)
    return [pred[d]["compute_s"] for d in devices]


def run_episode(plan: Plan, cluster: Cluster, cg: CostGraph, trace: SpeedTrace, policy: str,
                opts: EpisodeOptions, adapt: AdaptOptions | None = None,
                cache: IterationCache | None = None) -> dict[str, Any]:
    """One episode (module doc): per step its start and end, the decisions, and totals."""
    adapt = AdaptOptions(**{**_fields(adapt or AdaptOptions()), "policy": policy})
    cache = cache or IterationCache(cluster, cg)
    trace.check(cluster)
    beliefs = Beliefs(cluster, cg)
    plan = in_context(plan, cluster, cg)
    embedded: dict[str, float] = {}
    monitor, devices = _monitor(plan, opts)
    pending: list[tuple[int, float, Plan]] = []
    """(first step it may take effect from, time from which it may, plan)"""
    t, step, last_ckpt = 0.0, 1, 0
    steps: dict[int, tuple[float, float]] = {}
    decisions: list[dict[str, Any]] = []
    redone = shares = restarts = 0
    ended = ""

    def adopt(new: Plan) -> None:
        nonlocal plan, embedded
        plan, embedded = new, dict(beliefs.factors)

    def record(d: Decision, at: int) -> None:
        decisions.append({**d.record, "step": at, "time_s": t, "kind": d.kind})

    while step <= opts.steps:
        while pending and pending[0][0] <= step and pending[0][1] <= t:
            adopt(pending.pop(0)[2])
            monitor.set_predicted(_predicted(plan, devices))
        factors = trace.factors(step, t)
        it = cache.run(plan, factors, frozenset(beliefs.lost))
        failed = trace.failure(set(plan.device_ids()), step, t, t + it.time_s)
        if failed is not None:
            dev, t = failed
            beliefs.lost.add(dev)
            d = decide_lost(plan, beliefs, adapt, f"{dev} lost")
            record(d, step - 1)
            if d.kind != "restart":
                ended = f"{dev} lost at {t:.4g} s (step {step})"
                break
            redone += step - 1 - last_ckpt
            for s in range(last_ckpt + 1, step):
                steps.pop(s, None)
            step = last_ckpt + 1
            t += opts.switch_cost_s
            restarts += 1
            pending.clear()
            adopt(d.plan)  # type: ignore[arg-type]
            monitor, devices = _monitor(plan, opts)
            continue
        steps[step] = (t, t + it.time_s)
        t += it.time_s
        if step % opts.checkpoint_every == 0:
            last_ckpt = step
        reports = monitor.observe(step, [it.compute_s[d] for d in devices])
        if (reports and policy != "none" and not pending
                and take_reports(beliefs, [r.to_record(opts.monitor, {}) for r in reports], embedded)):
            trigger = "; ".join(f"{r.device} {r.direction}, {r.level:.2f}x predicted" for r in reports)
            d = decide_shares(plan, beliefs, adapt, trigger)
            record(d, step)
            candidate = d.plan if d.kind == "shares" else plan
            if d.kind == "shares":
                pending.append((step + 1 + opts.apply_delay_steps, t + opts.decision_s, d.plan))  # type: ignore[arg-type]
                shares += 1
            if policy == "replan":
                d2 = decide_replan(candidate, beliefs, adapt, trigger, steps_left=opts.steps - step,
                                   step_time_s=it.time_s, switch_cost_s=opts.switch_cost_s)
                record(d2, step)
                if d2.kind == "restart":
                    pending.clear()
                    t += opts.switch_cost_s
                    restarts += 1
                    adopt(d2.plan)  # type: ignore[arg-type]
                    monitor, devices = _monitor(plan, opts)
                elif d2.kind == "shares":
                    pending = [(step + 1 + opts.apply_delay_steps, t + opts.decision_s, d2.plan)]  # type: ignore[list-item]
        step += 1
    done = sorted(steps)
    global_batch = plan.global_batch
    return {
        "policy": policy, "steps_done": len(done), "total_s": t if not ended else t,
        "samples_per_s": len(done) * global_batch / t if t > 0 else 0.0,
        "step_times_s": [steps[s][1] - steps[s][0] for s in done], "step_starts_s": [steps[s][0] for s in done],
        "decisions": decisions, "shares_switches": shares, "restarts": restarts, "steps_redone": redone,
        "ended": ended, "final_layout": describe(plan), "simulations": cache.simulations,
    }


def _fields(opts: AdaptOptions) -> dict[str, Any]:
    return {f: getattr(opts, f) for f in AdaptOptions.__slots__}  # type: ignore[attr-defined]


def replay_episode(plan: Plan, cluster: Cluster, cg: CostGraph, trace: SpeedTrace, switches: list[tuple[int, Plan]],
                   steps: int, cache: IterationCache | None = None) -> dict[str, Any]:
    """The episode of a run whose decisions are known (a live adaptive run's: the plans
    it switched to between two steps, as (first step under it, plan)): every step the
    simulated iteration of the plan in effect at the trace's speeds; no monitor, no
    decisions. What separates the simulator's timing from the decisions it would take
    (``run_episode``) when both are compared with the run."""
    cache = cache or IterationCache(cluster, cg)
    trace.check(cluster)
    pending = sorted(switches, key=lambda s: s[0])
    current = in_context(plan, cluster, cg)
    t, times = 0.0, []
    for step in range(1, steps + 1):
        while pending and pending[0][0] <= step:
            current = in_context(pending.pop(0)[1], cluster, cg)
        it = cache.run(current, trace.factors(step, t))
        times.append(it.time_s)
        t += it.time_s
    return {"step_times_s": times, "total_s": t, "final_layout": describe(current)}
