"""Many training iterations of a plan while device speeds change and devices fail.

A *speed trace* gives, per device, changes of its speed from a step or a time on:
``DEV=FACTOR@T`` makes device DEV's compute take FACTOR times as long from T on (a factor
of 1 ends a slow-down), T a step number (``@300``) or a time since the start (``@90s``,
``@15m``, ``@2h``). A *failure* ``DEV@T`` removes the device at T.

Each iteration runs at the speeds in effect when it starts: a change in the middle of an
iteration takes effect at the next one (slow-downs last from tens of seconds to hours,
iterations well under that). An iteration's time, and each device's compute seconds in
it, are the discrete-event simulation of the plan on the cluster and cost graph with
those speeds (simulator.speeds, simulator.engine): where the profile measured noise, the
mean of a noisy run of iterations (an episode's time is the sum of its steps, so their
mean, not the median a single prediction reports); iterations at the same speeds are
simulated once (``IterationCache``). ``play`` runs a fixed plan until its last step or
the first failure of a device it uses (what a run without adaptation does: it stops);
workflows.episode drives the same pieces with re-planning policies.

Never: re-plan here (the simulator does not call the allocator), or read a clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.errors import SpecError
from hetalloc.plan import Plan

from .api import simulate
from .engine import prediction_iterations
from .speeds import SAME, in_context, rounded, speed_case

_UNITS = {"": None, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Change:
    """From step `step` (or time `time_s`) on, `device` computes `factor` times as long;
    factor None: the device is lost."""

    device: str
    factor: float | None
    step: int | None = None
    time_s: float | None = None

    def due(self, step: int, time_s: float) -> bool:
        return (self.step is not None and step >= self.step) or (self.time_s is not None and time_s >= self.time_s)

    def label(self) -> str:
        at = f"step {self.step}" if self.step is not None else f"{self.time_s:g} s"
        return f"{self.device} lost at {at}" if self.factor is None else f"{self.device} x{self.factor:g} from {at}"


def _when(text: str, flag: str, spec: str) -> tuple[int | None, float | None]:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|min|h)?", text.strip())
    if not m:
        raise SpecError(flag, spec, f"cannot read the time '{text}'", "give a step (@300) or a time (@90s, @15m, @2h)")
    value, unit = float(m.group(1)), _UNITS[m.group(2) or ""]
    if unit is None:
        if not value.is_integer() or value < 1:
            raise SpecError(flag, spec, f"step {text} is not a whole number >= 1", "e.g. @300 or @90s")
        return int(value), None
    return None, value * unit


def parse_straggler(spec: str) -> Change:
    """'DEV=FACTOR@T' (module doc)."""
    head, at, when = spec.rpartition("@")
    dev, eq, factor = head.partition("=")
    try:
        f = float(factor)
    except ValueError:
        f = -1.0
    if not at or not eq or not dev or not 0 < f < float("inf"):
        raise SpecError("--straggler", spec, "expected DEVICE=FACTOR@T with FACTOR > 0",
                        "e.g. --straggler a100/3=3@200 (3x slower from step 200), a100/3=1@500 (back to speed)")
    step, t = _when(when, "--straggler", spec)
    return Change(dev, f, step, t)


def parse_failure(spec: str) -> Change:
    """'DEV@T': the device is lost at T."""
    dev, at, when = spec.rpartition("@")
    if not at or not dev:
        raise SpecError("--lose", spec, "expected DEVICE@T", "e.g. --lose a100/3@400 or --lose a100/3@2h")
    step, t = _when(when, "--lose", spec)
    return Change(dev, None, step, t)


@dataclass
class SpeedTrace:
    """Every device's speed changes and failures, in the order given."""

    changes: list[Change] = field(default_factory=list)

    def check(self, cluster: Cluster) -> None:
        for c in self.changes:
            if c.device not in cluster.device_by_id:
                raise SpecError("--straggler" if c.factor is not None else "--lose", c.device,
                                f"no device '{c.device}' in cluster '{cluster.name}'",
                                f"devices look like {cluster.devices[0].id}")

    def factors(self, step: int, time_s: float) -> dict[str, float]:
        """device -> compute factor in effect at (step, time) (devices not named: 1)."""
        out: dict[str, float] = {}
        for c in sorted((c for c in self.changes if c.factor is not None),
                        key=lambda c: (c.step if c.step is not None else -1, c.time_s or 0.0)):
            if c.due(step, time_s):
                out[c.device] = c.factor  # type: ignore[assignment]
        return out

    def failure(self, used: set[str], step: int, t0: float, t1: float) -> tuple[str, float] | None:
        """The first failure of a used device during the iteration that is step `step`
        and runs from t0 to t1: (device, time)."""
        hits = []
        for c in self.changes:
            if c.factor is not None or c.device not in used:
                continue
            if c.step is not None and c.step == step:
                hits.append((t0, c.device))
            elif c.time_s is not None and t0 <= c.time_s < t1:
                hits.append((c.time_s, c.device))
        if not hits:
            return None
        t, d = min(hits)
        return d, t

    def lost_before(self, step: int, time_s: float) -> set[str]:
        return {c.device for c in self.changes if c.factor is None
                and ((c.step is not None and c.step < step) or (c.time_s is not None and c.time_s < time_s))}


@dataclass(frozen=True, slots=True)
class Iteration:
    time_s: float
    """The mean iteration: many steps take their sum, so a noisy simulation's slow
    iterations count in full (a single prediction's median would leave their tails out)."""
    compute_s: dict[str, float]
    """device -> its forward and backward seconds in the iteration."""


class IterationCache:
    """Simulated iterations of plans on a base (cluster, cost graph) at given speeds."""

    def __init__(self, cluster: Cluster, cg: CostGraph, sim: dict[str, Any] | None = None):
        # where the profile measured noise, an iteration is the mean of a noisy run of them
        self.cluster, self.cg, self.sim = cluster, cg, {"iterations": prediction_iterations(cluster), **(sim or {})}
        self._hits: dict[tuple, Iteration] = {}
        self.simulations = 0

    def run(self, plan: Plan, factors: dict[str, float], lost: frozenset[str] = frozenset()) -> Iteration:
        used = plan.device_ids()
        speeds = tuple(sorted((d, rounded(f)) for d, f in factors.items() if d in used and abs(f - 1.0) > SAME))
        layout = tuple((s.start, s.stop, tuple((tuple(g.devices), g.share) for g in s.groups))
                       for r in plan.replicas for s in r.stages)
        key = (layout, plan.num_microbatches, plan.schedule, plan.grad_sync, speeds, tuple(sorted(lost)))
        hit = self._hits.get(key)
        if hit is None:
            cluster, cg = speed_case(self.cluster, self.cg, dict(speeds), lost)
            rep = simulate(in_context(plan, cluster, cg), cluster, cg, compare=False, **self.sim)
            mean_s = rep.iteration_ends_s[-1] / len(rep.iteration_ends_s)
            hit = Iteration(mean_s, {d: rep.devices[d]["compute_fb_s"] for d in used})
            self._hits[key] = hit
            self.simulations += 1
        return hit


@dataclass
class Played:
    """What a run of one plan did."""

    steps: list[tuple[int, float, float]] = field(default_factory=list)
    """(step, start s, end s) of every finished iteration."""
    failed: tuple[str, float] | None = None
    """(device, time) of the failure that stopped it."""

    @property
    def end_s(self) -> float:
        return self.steps[-1][2] if self.steps else 0.0


def play(plan: Plan, trace: SpeedTrace, cache: IterationCache, *, steps: int, first_step: int = 1,
         start_s: float = 0.0) -> Played:
    """Run `plan` from `first_step` to `steps` at the trace's speeds, until a device it
    uses fails (module doc)."""
    out = Played()
    used = set(plan.device_ids())
    t = start_s
    for step in range(first_step, steps + 1):
        it = cache.run(plan, trace.factors(step, t))
        hit = trace.failure(used, step, t, t + it.time_s)
        if hit is not None:
            out.failed = hit
            return out
        out.steps.append((step, t, t + it.time_s))
        t += it.time_s
    return out
