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
    (forward: all senders' forward; backward: all receivers' backward) have ended."""
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
