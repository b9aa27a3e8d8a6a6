"""Training configuration of one runtime launch (everything that is not in the plan).

The plan says *where* things run (stages, devices, shares, schedule, gradient sync,
optimizer); this says *what* is trained and for how long. Plain data, validated on
construction; it never imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

from hetalloc.errors import SpecError

FAMILIES = ("gpt", "bert", "llama", "opt", "mlp")
"""Model families the runtime can build (runtime.models)."""
DTYPES = ("float32", "float64")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.05}


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    steps: int = 20
    """Optimizer steps to reach (a resumed run continues up to this step)."""
    dataset: str = "synthetic"
    """'synthetic' (seeded token sequences), 'text' (the shipped corpus, byte tokens), or
    the path of a text file or a pre-tokenized .npy / uint16 .bin file (runtime.tokens)."""
    val_fraction: float = 0.1
    """Share of a dataset file's tokens (its end) kept for validation."""
    eval_every: int = 0
    """Compute the validation loss after every K-th step and after the last (0: never)."""
    eval_batches: int = 1
    """Global batches of validation samples per evaluation."""
    seed: int = 0
    """Seeds the model init and the synthetic data; every rank uses the same seed."""
    lr: float | None = None
    """Learning rate; None takes DEFAULT_LR for the plan's optimizer."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW) or L2 (SGD), on every parameter."""
    momentum: float = 0.9
    """SGD momentum."""
    dropout: float = 0.0
    """Dropout of the Hugging Face models (0 makes runs comparable across plans)."""
    dtype: str = "float32"
    """Parameter and activation dtype; float64 is for exactness checks on CPU."""
    bucket_cap_mb: float = 25.0
    """Gradient bucket size for the all-reduce overlapped with backward, MiB."""
    checkpoint_dir: str | None = None
    """Where checkpoints go; None disables them."""
    checkpoint_every: int = 0
    """Save every K steps (0: never, except when the directory is given and K > 0)."""
    resume: bool = False
    """Continue from the latest checkpoint in checkpoint_dir."""
    out_dir: str = "out/run"
    """metrics.jsonl, per-rank metrics and summary.json go here."""
    slowdown: dict[str, float] = field(default_factory=dict)
    """Rank (as a string) or device id -> factor >= 1 stretching that rank's compute."""
    slowdown_from: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    """Rank or device id -> (first step, factor) changes of its slowdown from a step on
    (``--slowdown 1=3@20``; a factor of 1 ends it), in step order."""
    adaptive: bool = False
    """Monitor every rank against the plan's prediction, report stragglers, and obey the
    workflow's commands in control_dir (runtime.adaptive)."""
    control_dir: str | None = None
    """The control channel of an adaptive run (runtime.control); None: out_dir/control."""
    straggler_threshold: float = 0.10
    """Relative departure from the predicted compute time that counts (runtime.monitor)."""
    straggler_steps: int = 3
    """Consecutive departing steps before a rank is reported."""
    warmup_steps: int = 1
    """Leading steps left out of the measured averages (shape inference, allocator warm-up)."""
    tensorboard: bool = False
    """Also log scalars to TensorBoard when the package is installed."""
    fail_at_step: int = 0
    """Test aid: the rank fail_rank kills itself at the start of this step (first attempt only)."""
    fail_rank: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be at least 1.")
        if not self.dataset:
            raise ValueError("dataset must be 'synthetic', 'text' or a file path.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1).")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0.")
        if self.eval_batches < 1:
            raise ValueError("eval_batches must be at least 1.")
        if self.eval_every and self.val_fraction == 0 and self.dataset != "synthetic":
            raise ValueError("eval_every needs a validation split: val_fraction > 0.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'.")
        if self.lr is not None and self.lr <= 0:
            raise ValueError("lr must be greater than 0.")
        if self.weight_decay < 0:
            raise ValueError("weight_decay must be >= 0.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1).")
        if self.bucket_cap_mb <= 0:
            raise ValueError("bucket_cap_mb must be greater than 0.")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0.")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs checkpoint_dir.")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir.")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0.")
        for key, factor in self.slowdown.items():
            if factor < 1.0:
                raise ValueError(f"slowdown factor of {key} must be >= 1, got {factor}.")
        for key, changes in self.slowdown_from.items():
            if any(s < 1 or f < 1.0 for s, f in changes):
                raise ValueError(f"slowdown of {key}: steps must be >= 1 and factors >= 1.")
        if not 0.0 < self.straggler_threshold < 10.0:
            raise ValueError("straggler_threshold must be in (0, 10), e.g. 0.1 for 10 %.")
        if self.straggler_steps < 1:
            raise ValueError("straggler_steps must be at least 1.")

    def learning_rate(self, optimizer: str) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[optimizer]


def parse_slowdown(items: list[str] | None) -> dict[str, float]:
    """['1=2', 'host/3=1.5'] -> {'1': 2.0, 'host/3': 1.5}; a key is a rank or a device id.
    A malformed item raises SpecError (a ValueError) naming it."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = -1.0
        if not sep or not key or not 1.0 <= factor < float("inf"):
            raise SpecError("--slowdown", item, "expected RANK=FACTOR or DEVICE=FACTOR with a finite FACTOR >= 1",
                            "e.g. --slowdown 1=2 (rank 1 twice as slow)")
        out[key] = factor
    return out


def parse_slowdowns(items: list[str] | None) -> tuple[dict[str, float], dict[str, tuple[tuple[int, float], ...]]]:
    """--slowdown items, with or without a first step: ['1=2', '2=3@20', '2=1@50'] ->
    ({'1': 2.0}, {'2': ((20, 3.0), (50, 1.0))}): KEY=FACTOR from the start, KEY=FACTOR@STEP
    from that step on (a factor of 1 ends a slowdown). A malformed item raises SpecError."""
    out: dict[str, list[tuple[int, float]]] = {}
    for item in items or []:
        if "@" not in item:
            continue
        head, _, step = item.rpartition("@")
        if not step.isdigit() or int(step) < 1:
            raise SpecError("--slowdown", item, "expected RANK=FACTOR@STEP with a whole STEP >= 1",
                            "e.g. --slowdown 1=3@20 (rank 1 three times as slow from step 20 on)")
        for key, factor in parse_slowdown([head]).items():
            out.setdefault(key, []).append((int(step), factor))
    return (parse_slowdown([i for i in items or [] if "@" not in i]),
            {k: tuple(sorted(v)) for k, v in out.items()})


def slowdown_at(base: float, changes: tuple[tuple[int, float], ...], step: int) -> float:
    """A rank's slowdown factor at a step: the last change at or before it, else base."""
    factor = base
    for first, f in changes:
        if first <= step:
            factor = f
    return factor


def check_slowdown(slowdown: dict[str, float], world_size: int, device_ids: Collection[str] | None,
                   what: str = "run") -> None:
    """Every key of a parsed --slowdown names a rank of this run (0..world_size-1) or one
    of `device_ids` (None: ranks only); else SpecError naming it."""
    for key in slowdown:
        if "/" in key and device_ids is not None:
            if key not in device_ids:
                raise SpecError("--slowdown", key, "is not a device of the plan's cluster",
                                f"use a rank (0..{world_size - 1}) or a device id of the plan")
        elif not key.isdigit() or int(key) >= world_size:
            raise SpecError("--slowdown", key, f"is not a rank of this {what} (0..{world_size - 1})",
                            "write RANK=FACTOR" + (" or DEVICE=FACTOR" if device_ids is not None else ""))


def slowdown_for_plan(device_ids: list[str], slowdown: dict[int, float], used: set[str]) -> list[str]:
    """--slowdown arguments of a run: rank r of a profile slows device_ids[r]; given by
    device id, so they follow the device whatever rank a plan gives it (used devices only)."""
    return [f"{device_ids[r]}={f:g}" for r, f in sorted(slowdown.items()) if device_ids[r] in used]


SPIN_S = 300e-6
"""The last stretch of an emulated slowdown is spun, not slept: a sleep overshoots by the
kernel's timer slack (50 µs and more), a sizeable, varying part of sub-millisecond ops."""


class Pace:
    """The emulated slowdown of one op, held as the op goes (``stretch``'s rule at any
    point of it). ``hold()`` holds the caller until a device `slowdown` times slower would
    have reached this point of the op, and returns the stretched time since the op began.
    Called where the op lets others see its progress (a gradient bucket ready, whose
    all-reduce it launches) and at its end: a single hold at the end would let the
    collectives launched inside the op run during the hold, hidden, which they never are
    on a device that is really slower. Only the op's own compute is stretched: what
    earlier holds spent holding is not counted again.

    On CPUs (cpu=True) the compute is stretched in this thread's CPU time: it spins until
    it has used (slowdown) x the CPU time the compute used, as a core that much slower
    would; alone on its core this takes the same wall time as the wall-clock rule, and on
    a host where ranks share cores the slowed rank keeps its share of the cores busy as a
    slower core would, where a sleep would hand them to the others. Otherwise (GPUs: the
    compute is not on this thread) it sleeps, then spins the last SPIN_S."""

    __slots__ = ("slowdown", "t0", "cpu0", "held")

    def __init__(self, slowdown: float, cpu: bool, t0: float | None = None, cpu0: float | None = None):
        self.slowdown = slowdown
        self.t0 = time.perf_counter() if t0 is None else t0
        self.cpu0 = (time.thread_time() if cpu0 is None else cpu0) if cpu else None
        self.held = 0.0
        """Seconds (CPU seconds on CPUs) spent holding so far."""

    def hold(self) -> float:
        now = time.perf_counter()
        if self.slowdown <= 1.0:
            return now - self.t0
        if self.cpu0 is not None:
            used = time.thread_time() - self.cpu0
            work = used - self.held
            end = self.cpu0 + self.slowdown * work
            while time.thread_time() < end:
                pass
            self.held = time.thread_time() - self.cpu0 - work
            return time.perf_counter() - self.t0
        work = now - self.t0 - self.held
        end = self.t0 + self.slowdown * work
        if end - now > SPIN_S:
            time.sleep(end - now - SPIN_S)
        while time.perf_counter() < end:
            pass
        self.held = time.perf_counter() - self.t0 - work
        return time.perf_counter() - self.t0


def stretch(t0: float, slowdown: float, cpu0: float | None = None) -> float:
    """Emulated slowdown of a piece of compute that began at t0 (with cpu0, this thread's
    ``time.thread_time()`` then: CPU devices): hold the caller until a device `slowdown`
    times slower would have finished it (``Pace``, held once at its end); returns the
    stretched elapsed time (wall clock since t0)."""
    return Pace(slowdown, cpu0 is not None, t0, cpu0).hold()


def parse_batch_sizes(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8] (sorted, without repeats); SpecError naming --batch-sizes
    unless they are whole numbers >= 1."""
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SpecError("--batch-sizes", "", f"expected comma-separated integers, got '{text}'",
                        "e.g. --batch-sizes 1,2,4,8") from None
    if not sizes or sizes[0] < 1:
        raise SpecError("--batch-sizes", "", "needs at least one size, each >= 1", "e.g. --batch-sizes 1,2,4,8")
    return sizes
