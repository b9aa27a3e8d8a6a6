"""Straggler detection: each rank's measured compute time against what its plan predicted.

Every step, each rank's forward + backward seconds (``StepTimes.compute_s``: its 2M ops)
are divided by what the plan predicts for them (``runtime.metrics.predicted_by_device``):
the *ratio*. Predictions are rarely right in absolute terms (an analytic cost graph on
CPUs is off by 30x), so ratios are read against two references:

- the *calibration* c0: the median ratio over all ranks during the first
  ``calibration_steps`` steps after warm-up (what "as predicted" looks like on this
  machine, this launch);
- the *peers* at the same step: the median over ranks of ratio / (c0 x accepted level).
  A load that slows every rank alike (a busy host) moves the peers too and is not a
  straggler.

Each rank's *level* is a robust moving estimate: the median of its last ``window`` values
of ratio / c0. Its *departure* is level / accepted level - 1, where the accepted level
starts at 1 (as predicted). A step counts against the rank when its level departs by
more than the threshold from both references in the same direction; after
``consecutive`` such steps in a row (a change point), the rank is reported: slower or
faster, with its new level, which becomes its accepted level (so it is reported once
per change, and again when it changes back). ``levels()`` gives every rank's level,
which a decision uses as the measured speeds.

The threshold is ``threshold`` (10 %) or, on a machine whose step times scatter more
than that (a shared host), ``noise_factor`` times the measured scatter, whichever is
larger: a change is reported when it stands out of the noise. The scatter is 1.4826 x
the median absolute deviation of each step's ratio from its rank's level, pooled over
ranks and the last ``noise_steps`` steps (from calibration on). Events say which
threshold held, and the new level is the median of the departing steps' own ratios.

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
    _run: list[list[tuple[float, float]]] = field(init=False)
    """Per rank: the current streak of departing steps (level, measured seconds)."""
    _sign: list[int] = field(init=False)
    _devs: deque = field(init=False)

    def __post_init__(self) -> None:
        if len(self.predicted_s) != len(self.devices):
            raise ValueError("one prediction per rank is needed")
        self._devs = deque(maxlen=self.cfg.noise_steps * len(self.devices))
        self._reset(self.cfg.warmup_steps)

    def _reset(self, skip: int) -> None:
        n = len(self.devices)
        self.accepted = [1.0] * n
        self._skip = skip
        self._recent = [deque(maxlen=self.cfg.window) for _ in range(n)]
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
        """device -> moving estimate of its level (median of the last `window` steps);
        1.0 before calibration."""
        return {d: statistics.median(r) if r else 1.0 for d, r in zip(self.devices, self._recent)}

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
                self.calibration = statistics.median(r for step in self._calib for r in step)
                own = [statistics.median(step[k] for step in self._calib) for k in range(len(ratios))]
                self._devs.extend(abs(step[k] / own[k] - 1.0) for step in self._calib
                                  for k in range(len(ratios)) if own[k] > 0)
                self.noise = 1.4826 * statistics.median(self._devs) if self._devs else 0.0
            return []
        c0 = self.calibration
        for k, r in enumerate(ratios):
            self._recent[k].append(r / c0)
        levels = [statistics.median(q) for q in self._recent]
        self._devs.extend(abs(r / c0 / x - 1.0) for r, x in zip(ratios, levels) if x > 0)
        self.noise = 1.4826 * statistics.median(self._devs)
        peers = statistics.median(x / a for x, a in zip(levels, self.accepted))
        out: list[Straggler] = []
        th = self.threshold
        for k, x in enumerate(levels):
            own = x / self.accepted[k] - 1.0
            other = x / (self.accepted[k] * peers) - 1.0
            sign = 1 if own > th and other > th else -1 if own < -th and other < -th else 0
            if sign == 0 or sign != self._sign[k]:
                self._run[k] = []
            self._sign[k] = sign
            if sign == 0:
                continue
            self._run[k].append((ratios[k] / c0, measured_s[k]))
            if len(self._run[k]) < self.cfg.consecutive:
                continue
            level = statistics.median(v for v, _ in self._run[k])
            per_op = statistics.median(m for _, m in self._run[k]) / max(1, self.ops_per_step)
            out.append(Straggler(step, k, self.devices[k], "slower" if sign > 0 else "faster", level,
                                 self.accepted[k], per_op, self.predicted_s[k] / max(1, self.ops_per_step), th))
            self.accepted[k] = level
            self._run[k] = []
            self._sign[k] = 0
        return out
