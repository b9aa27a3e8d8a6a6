"""Straggler detection: each rank's measured compute time against what its plan predicted.

Every step, each rank's forward + backward seconds (``StepTimes.compute_s``: its 2M ops)
are divided by what the plan predicts for them (``runtime.metrics.predicted_by_device``):
the *ratio*. Predictions are rarely right in absolute terms (an analytic cost graph on
CPUs is off by 30x), and a busy host slows every rank alike, so a rank is judged against
two references:

- the *calibration* c0: the median ratio over all ranks during the first
  ``calibration_steps`` steps after warm-up (what "as predicted" looks like on this
  machine, this launch); its *own* level is the median of its last ``window`` ratios / c0;
- its *peers*: its ratio over the median ratio of the other ranks at the same step (each
  divided by its accepted level): a load that slows every rank alike cancels out. Its
  *relative* level is the median of the last ``window`` of those.

A rank's accepted level starts at 1 (as predicted). A step counts against it when both
its relative level and its own level (over the accepted one) depart from 1 in the same
direction, the relative one by more than the threshold, the own one by more than
``threshold``; after ``consecutive`` such steps in a row (a change point) the rank is
reported, slower or faster, with its new level: the accepted level times the median of
those steps' relative ratios (against its peers, so the speed that matters for sharing
work). That level becomes the accepted one: a rank is reported once per change, and
again when it changes back. ``levels()`` gives every rank's current level.

The threshold on the relative level is ``threshold`` (10 %) or, where the relative
ratios scatter more than that from step to step (ranks time-sharing cores),
``noise_factor`` times that scatter (1.4826 x the median absolute deviation from each
rank's relative level, pooled over ranks and the last ``noise_steps`` steps), whichever
is larger: a change is reported when it stands out of the noise. Events say which
threshold held.

After a layout change (new shares or a new plan, ``set_predicted``), predictions embed the
speeds the decision assumed: levels restart at 1 and the first ``warmup_steps`` are left
out again. Pure Python, no torch: the live runtime (runtime.adaptive) and the simulated
episodes (workflows.episode) run the same detector.

Never: decide anything here (what to do about a straggler is the workflow's), or read
clocks; it is fed numbers.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass(kw_only=True, slots=True)
class MonitorConfig:
    threshold: float = 0.10
    """Relative departure from the predicted compute time that counts (0.10: 10 %)."""
    consecutive: int = 3
    """Steps in a row that must depart (same direction) before a rank is reported."""
    window: int = 3
    """Steps in the robust moving estimate (median) of each rank's level."""
    calibration_steps: int = 5
    """Steps after warm-up whose median ratio (over all ranks) is the calibration c0, and
    whose scatter is the noise."""
    noise_factor: float = 2.0
    """The threshold is at least this many times the measured noise."""
    noise_steps: int = 20
    """Steps whose scatter is the noise."""
    warmup_steps: int = 1
    """Steps left out after a launch or a layout change (shape inference, allocator)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 10.0:
            raise ValueError("threshold must be in (0, 10), e.g. 0.1 for 10 %.")
        if self.consecutive < 1:
            raise ValueError("consecutive must be at least 1.")
        if self.window < 1:
            raise ValueError("window must be at least 1.")
        if self.calibration_steps < 1:
            raise ValueError("calibration_steps must be at least 1.")
        if self.noise_factor < 0:
            raise ValueError("noise_factor must be >= 0.")
        if self.noise_steps < 1:
            raise ValueError("noise_steps must be at least 1.")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0.")


@dataclass(frozen=True, slots=True)
class Straggler:
    """One change point of one rank."""

    step: int
    rank: int
    device: str
    direction: str
    """'slower' or 'faster' than its accepted level."""
    level: float
    """New level: its compute time over the predicted, relative to the calibration (3.0:
    three times as long as the plan says, compared with the other ranks at launch)."""
    previous: float
    """The level accepted before (1.0: as predicted)."""
    measured_op_s: float
    """Its measured seconds per op (forward or backward of one micro-batch), median of the steps."""
    predicted_op_s: float
    """What the plan predicts per op."""

    threshold: float
    """The threshold that held (module doc)."""

    def to_record(self, cfg: MonitorConfig, levels: dict[str, float]) -> dict:
        return {"event": "straggler", "step": self.step, "rank": self.rank, "device": self.device,
                "direction": self.direction, "level": round(self.level, 4), "previous": round(self.previous, 4),
                "departure": round(self.level / self.previous - 1.0, 4),
                "measured_op_s": self.measured_op_s, "predicted_op_s": self.predicted_op_s,
                "threshold": round(self.threshold, 4), "consecutive": cfg.consecutive,
                "levels": {d: round(v, 4) for d, v in levels.items()}}

    def line(self) -> str:
        return (f"monitor: step {self.step}: rank {self.rank} ({self.device}) {self.direction}: "
                f"{self.level:.2f}x its predicted compute time (was {self.previous:.2f}x) for the last steps, "
                f"{self.measured_op_s * 1e3:.2f} ms per op against {self.predicted_op_s * 1e3:.2f} ms predicted")


@dataclass
class StragglerMonitor:
    """The detector of the module doc, fed one step at a time."""

    cfg: MonitorConfig
    devices: list[str]
    """devices[rank]."""
    predicted_s: list[float]
    """Predicted compute seconds per step of each rank (its 2M ops)."""
    ops_per_step: int = 1
    """Ops in a rank's step (2 x micro-batches), to report seconds per op."""
    calibration: float | None = None
    """c0 once known."""
    noise: float = 0.0
    """Relative scatter of a rank's ratio from step to step (module doc)."""
    accepted: list[float] = field(init=False)
    _skip: int = field(init=False)
    _calib: list[list[float]] = field(init=False, default_factory=list)
    _recent: list[deque] = field(init=False)
    """Per rank: its last relative ratios (against its peers, over its accepted level)."""
    _own: list[deque] = field(init=False)
    """Per rank: its last ratios over c0."""
    _run: list[list[tuple[float, float]]] = field(init=False)
    """Per rank: the current streak of departing steps (relative ratio, measured seconds)."""
    _sign: list[int] = field(init=False)
    _devs: deque = field(init=False)
    _own_devs: deque = field(init=False)
    own_noise: float = 0.0
    """The same scatter of each rank's own ratio (over c0), common load included."""

    def __post_init__(self) -> None:
        if len(self.predicted_s) != len(self.devices):
            raise ValueError("one prediction per rank is needed")
        self._devs = deque(maxlen=self.cfg.noise_steps * len(self.devices))
        self._own_devs = deque(maxlen=self.cfg.noise_steps * len(self.devices))
        self._reset(self.cfg.warmup_steps)

    def _reset(self, skip: int) -> None:
        n = len(self.devices)
        self.accepted = [1.0] * n
        self._skip = skip
        self._recent = [deque(maxlen=self.cfg.window) for _ in range(n)]
        self._own = [deque(maxlen=self.cfg.window) for _ in range(n)]
        self._run = [[] for _ in range(n)]
        self._sign = [0] * n

    def set_predicted(self, predicted_s: list[float], ops_per_step: int | None = None) -> None:
        """A new layout: its predictions; levels restart at 1 after a warm-up."""
        if len(predicted_s) != len(self.devices):
            raise ValueError("one prediction per rank is needed")
        self.predicted_s = list(predicted_s)
        if ops_per_step is not None:
            self.ops_per_step = ops_per_step
        self._reset(self.cfg.warmup_steps)

    def levels(self) -> dict[str, float]:
        """device -> its current level: accepted level x median of its last relative
        ratios (1.0 before calibration)."""
        return {d: a * (statistics.median(r) if r else 1.0) for d, a, r in zip(self.devices, self.accepted, self._recent)}

    @property
    def threshold(self) -> float:
        return max(self.cfg.threshold, self.cfg.noise_factor * self.noise)

    def observe(self, step: int, measured_s: list[float]) -> list[Straggler]:
        """Feed every rank's measured compute seconds of one step; returns the ranks
        reported at this step (usually none)."""
        if len(measured_s) != len(self.devices):
            raise ValueError("one measurement per rank is needed")
        if self._skip > 0:
            self._skip -= 1
            return []
        ratios = [m / p if p > 0 else 1.0 for m, p in zip(measured_s, self.predicted_s)]
        if self.calibration is None:
            self._calib.append(ratios)
            if len(self._calib) >= self.cfg.calibration_steps:
                self.calibration = statistics.median(r for row in self._calib for r in row)
                rel = [self._relative(row) for row in self._calib]
                for k in range(len(ratios)):
                    mid = statistics.median(row[k] for row in rel)
                    self._devs.extend(abs(row[k] / mid - 1.0) for row in rel if mid > 0)
                    mid = statistics.median(row[k] for row in self._calib)
                    self._own_devs.extend(abs(row[k] / mid - 1.0) for row in self._calib if mid > 0)
                self.noise = 1.4826 * statistics.median(self._devs) if self._devs else 0.0
                self.own_noise = 1.4826 * statistics.median(self._own_devs) if self._own_devs else 0.0
            return []
        c0 = self.calibration
        rel = self._relative(ratios)
        for k, r in enumerate(ratios):
            self._own[k].append(r / c0)
            self._recent[k].append(rel[k])
        own = [statistics.median(q) for q in self._own]
        levels = [statistics.median(q) for q in self._recent]
        self._devs.extend(abs(q / x - 1.0) for q, x in zip(rel, levels) if x > 0)
        self._own_devs.extend(abs(r / c0 / x - 1.0) for r, x in zip(ratios, own) if x > 0)
        self.noise = 1.4826 * statistics.median(self._devs)
        self.own_noise = 1.4826 * statistics.median(self._own_devs)
        out: list[Straggler] = []
        th = self.threshold
        th_own = max(self.cfg.threshold, self.cfg.noise_factor * self.own_noise)
        for k, x in enumerate(levels):
            mine = own[k] / self.accepted[k] - 1.0
            sign = (1 if x - 1.0 > th and mine > th_own else -1 if x - 1.0 < -th and mine < -th_own else 0)
            if sign == 0 or sign != self._sign[k]:
                self._run[k] = []
            self._sign[k] = sign
            if sign == 0:
                continue
            self._run[k].append((rel[k], measured_s[k]))
            if len(self._run[k]) < self.cfg.consecutive:
                continue
            level = self.accepted[k] * statistics.median(v for v, _ in self._run[k])
            per_op = statistics.median(m for _, m in self._run[k]) / max(1, self.ops_per_step)
            out.append(Straggler(step, k, self.devices[k], "slower" if sign > 0 else "faster", level,
                                 self.accepted[k], per_op, self.predicted_s[k] / max(1, self.ops_per_step), th))
            self.accepted[k] = level
            self._recent[k].clear()  # its ratios are read against the new level from now on
            self._own[k].clear()
            self._run[k] = []
            self._sign[k] = 0
        return out

    def _relative(self, ratios: list[float]) -> list[float]:
        """Each rank's ratio over the median of the other ranks' (each over its accepted
        level); 1 for a rank alone."""
        scaled = [r / a for r, a in zip(ratios, self.accepted)]
        if len(scaled) < 2:
            return [1.0] * len(scaled)
        return [x / statistics.median(scaled[:k] + scaled[k + 1:]) for k, x in enumerate(scaled)]
