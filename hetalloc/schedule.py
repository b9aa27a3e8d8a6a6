"""Pipeline schedules: the order of forward/backward ops on each stage, and the exact
timing of a pipeline whose ops have fixed durations (the longest path through the
dependency graph). Shared by the cost prediction, the simulator and the runtime.

Orders follow torch.distributed.pipelining: GPipe runs all forwards then all backwards
(micro-batch 0 first); 1F1B runs ``min(M, S - s)`` warm-up forwards on stage s, then
alternates one backward and one forward, then drains the backwards.
"""

from __future__ import annotations

from dataclasses import dataclass

Op = tuple[str, int]  # ("F" | "B", micro-batch)


def stage_op_order(schedule: str, stage: int, num_stages: int, num_microbatches: int) -> list[Op]:
    M = num_microbatches
    if schedule == "gpipe":
        return [("F", m) for m in range(M)] + [("B", m) for m in range(M)]
    if schedule == "1f1b":
        warm = min(M, num_stages - stage)
        ops: list[Op] = [("F", m) for m in range(warm)]
        f, b = warm, 0
        while b < M:
            ops.append(("B", b))
            b += 1
            if f < M:
                ops.append(("F", f))
                f += 1
        return ops
    raise ValueError(f"unknown schedule '{schedule}'")


def warm_backward(order: list[Op], pos: int) -> bool:
    """Whether the backward at order[pos] runs right after its own micro-batch's forward
    (nothing else ran between them on the device), its saved activations still in the
    caches as the profile times a backward; otherwise it reads them back from memory
    (``TimeTable.bwd_cold_s``: the 1F1B warm-up and GPipe's backwards, all but a last
    stage's in 1F1B)."""
    kind, m = order[pos]
    return kind == "B" and pos > 0 and order[pos - 1] == ("F", m)


@dataclass(slots=True)
class PipeDevice:
    """One device of one pipeline for timing: durations include blocking sends."""

    name: str
    stage: int
    fwd_s: float
    bwd_s: float
    inputs: list[int]
    """Indices (into the device list) of the previous stage's devices it receives from."""
    outputs: list[int]
    """Indices of the next stage's devices it sends to."""
    bwd_cold_s: float | None = None
    """A backward that does not follow its own forward (``warm_backward``); None: bwd_s."""
    start_s: float = 0.0
    """When its first op can start: after building its inputs or labels
    (``hetalloc.costs.input_time``; first and last stages)."""


@dataclass(slots=True)
class PipeTiming:
    makespan_s: float
    finish_s: list[float]
    busy_s: list[float]
    events: list[tuple[int, str, int, float, float]] | None
    """(device index, "F"/"B", micro-batch, start, end) when recorded."""


def pipeline_timing(devices: list[PipeDevice], num_stages: int, num_microbatches: int, schedule: str,
                    record: bool = False) -> PipeTiming:
    """Exact start/end of every op: an op starts when its device is free and its inputs
    (forward: all senders' forward; backward: all receivers' backward) have ended.

    Without ``record``, devices that time identically are timed once (``timing_classes``:
    exact), and a schedule of more than LONG_SCHEDULE ops is timed at a few shorter
    micro-batch counts and extended along its steady state where that is seen to have
    set in (``_steady_extension``; within rounding of the full recurrence)."""
    if record or not devices:
        return _timing(devices, num_stages, num_microbatches, schedule, record)
    cls, reps = timing_classes(devices)
    if len(reps) < len(devices):
        small = [PipeDevice(devices[d].name, devices[d].stage, devices[d].fwd_s, devices[d].bwd_s,
                            sorted({cls[j] for j in devices[d].inputs}),
                            sorted({cls[j] for j in devices[d].outputs}), devices[d].bwd_cold_s,
                            devices[d].start_s) for d in reps]
        t = pipeline_timing(small, num_stages, num_microbatches, schedule)
        return PipeTiming(t.makespan_s, [t.finish_s[c] for c in cls], [t.busy_s[c] for c in cls], None)
    if num_microbatches * len(devices) > LONG_SCHEDULE:
        t = _steady_extension(devices, num_stages, num_microbatches, schedule)
        if t is not None:
            return t
    return _timing(devices, num_stages, num_microbatches, schedule, False)


LONG_SCHEDULE = 200_000
"""Ops (micro-batches x devices) beyond which a schedule is extended along its steady state."""


def timing_classes(devices: list[PipeDevice]) -> tuple[list[int], list[int]]:
    """(class of each device, a representative device of each class): devices whose ops
    start and end at the same times in every schedule — same stage and durations, and
    inputs and outputs from the same classes (partition refinement until stable; by
    induction over the ops, such devices time identically)."""
    key = [(d.stage, d.fwd_s, d.bwd_s, d.bwd_cold_s, d.start_s) for d in devices]
    ids: dict = {}
    cls = [ids.setdefault(k, len(ids)) for k in key]
    while True:
        ids = {}
        new = [ids.setdefault((cls[i], tuple(sorted({cls[j] for j in d.inputs})),
                               tuple(sorted({cls[j] for j in d.outputs}))), len(ids))
               for i, d in enumerate(devices)]
        if len(ids) == len(set(cls)):
            break
        cls = new
    reps: dict[int, int] = {}
    for i, c in enumerate(cls):
        reps.setdefault(c, i)
    order = sorted(reps.values())
    renum = {cls[i]: k for k, i in enumerate(order)}
    return [renum[c] for c in cls], order


STEADY_FROM = 64
"""Micro-batch counts (at least, and at least 4 per stage) timed in full before a long
schedule is extended."""

STEADY_WINDOW = 6
"""Consecutive one-more-micro-batch steps that must agree before a schedule is extended."""


def _steady_extension(devices: list[PipeDevice], S: int, M: int, schedule: str) -> PipeTiming | None:
    """A long schedule's timing from shorter ones: once the pipeline is in its steady
    state, one more micro-batch moves every device's finish by the same step (a max-plus
    recurrence with a repeating op pattern). The counts M0 .. M0 + STEADY_WINDOW are timed
    in full; if every device's step is the same across them, the finish times are
    extended to M; else None (time it in full)."""
    M0 = max(STEADY_FROM, 4 * S)
    while 2 * (M0 + STEADY_WINDOW) <= M:  # (the short runs cost well below the full one)
        runs = [_timing(devices, S, m, schedule, False) for m in range(M0, M0 + STEADY_WINDOW + 1)]
        steps = [[b.finish_s[i] - a.finish_s[i] for i in range(len(devices))] for a, b in zip(runs, runs[1:])]
        scale = max(1e-300, max(runs[-1].finish_s))
        if all(abs(x - y) <= 1e-12 * scale for row in steps[1:] for x, y in zip(row, steps[0])):
            last = runs[-1]
            k = M - (M0 + STEADY_WINDOW)
            finish = [f + k * st for f, st in zip(last.finish_s, steps[-1])]
            # (busy time grows by one forward and one backward, warm or cold as in the
            # steady state, per micro-batch)
            busy = [x + k * (x - y) for x, y in zip(last.busy_s, runs[-2].busy_s)]
            return PipeTiming(max(finish), finish, busy, None)
        M0 *= 2
    return None


def _timing(devices: list[PipeDevice], num_stages: int, num_microbatches: int, schedule: str,
            record: bool) -> PipeTiming:
    """The recurrence of ``pipeline_timing``, op by op."""
    orders = [stage_op_order(schedule, d.stage, num_stages, num_microbatches) for d in devices]
    n = len(devices)
    end_f = [[-1.0] * num_microbatches for _ in range(n)]
    end_b = [[-1.0] * num_microbatches for _ in range(n)]
    clock = [d.start_s for d in devices]
    busy = [0.0] * n
    pos = [0] * n
    events = [] if record else None
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for i, d in enumerate(devices):
            order = orders[i]
            while pos[i] < len(order):
                kind, m = order[pos[i]]
                if kind == "F":
                    deps = [end_f[j][m] for j in d.inputs]
                    dur = d.fwd_s
                else:
                    deps = [end_b[j][m] for j in d.outputs] if d.outputs else [end_f[i][m]]
                    dur = d.bwd_s if d.bwd_cold_s is None or warm_backward(order, pos[i]) else d.bwd_cold_s
                if any(t < 0 for t in deps):
                    break
                start = max([clock[i], *deps])
                end = start + dur
                (end_f if kind == "F" else end_b)[i][m] = end
                clock[i] = end
                busy[i] += dur
                if events is not None:
                    events.append((i, kind, m, start, end))
                pos[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocked: inconsistent stage wiring")
    return PipeTiming(max(clock) if clock else 0.0, clock, busy, events)


def flow_shop_time(stage_times: list[float], num_microbatches: int) -> float:
    """Closed form for identical micro-batches through stages of fixed times:
    sum(t) + (M - 1) * max(t). Exact for GPipe when forward and backward times are in the
    same proportion on every stage; an upper bound for 1F1B."""
    if not stage_times:
        return 0.0
    return sum(stage_times) + (num_microbatches - 1) * max(stage_times)
