"""Pipeline op orders and the exact timing recurrence."""

import pytest

from hetalloc.schedule import PipeDevice, flow_shop_time, pipeline_timing, stage_op_order, warm_backward


def test_orders():
    assert stage_op_order("gpipe", 0, 2, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    assert stage_op_order("1f1b", 0, 2, 3) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert stage_op_order("1f1b", 1, 2, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]


def _two_stages(f0, b0, f1, b1):
    return [PipeDevice("a", 0, f0, b0, [], [1]), PipeDevice("b", 1, f1, b1, [0], [])]


def test_gpipe_two_stages_exact():
    t = pipeline_timing(_two_stages(1.0, 2.0, 1.0, 2.0), 2, 2, "gpipe", record=True)
    ev = {(i, k, m): (s, e) for i, k, m, s, e in t.events}
    assert ev[(0, "F", 0)] == (0.0, 1.0) and ev[(0, "F", 1)] == (1.0, 2.0)
    assert ev[(1, "F", 0)] == (1.0, 2.0) and ev[(1, "F", 1)] == (2.0, 3.0)
    assert ev[(1, "B", 0)] == (3.0, 5.0) and ev[(1, "B", 1)] == (5.0, 7.0)
    assert ev[(0, "B", 0)] == (5.0, 7.0) and ev[(0, "B", 1)] == (7.0, 9.0)
    assert t.makespan_s == 9.0 == flow_shop_time([3.0, 3.0], 2)


def test_1f1b_faster_than_flow_shop_bound_when_unbalanced():
    # the closed form is exact for GPipe, an upper bound for 1F1B
    devs = _two_stages(1.0, 2.0, 2.0, 4.0)
    g = pipeline_timing(devs, 2, 4, "gpipe").makespan_s
    o = pipeline_timing(devs, 2, 4, "1f1b").makespan_s
    assert g == pytest.approx(flow_shop_time([3.0, 6.0], 4))
    assert o <= g


def _random_pipe(rng, S, per_stage, copies):
    """A pipeline of S stages whose devices come in groups of identical copies (same
    durations, wired to the same kinds of neighbours)."""
    devs, first = [], []
    for s in range(S):
        first.append(len(devs))
        for k in range(per_stage):
            f, b = rng.uniform(0.5, 2.0), rng.uniform(1.0, 4.0)
            cold = b * rng.uniform(1.0, 1.3) if s < S - 1 else None  # a backward after other ops
            for _ in range(copies):
                devs.append(PipeDevice(f"s{s}k{k}", s, f, b, [], [], cold, 0.1 if s in (0, S - 1) else 0.0))
    n = per_stage * copies
    for s in range(S - 1):
        for i in range(n):  # device i sends to i and i+1 of the next stage (mod n)
            a = first[s] + i
            for j in {i, (i + 1) % n}:
                devs[a].outputs.append(first[s + 1] + j)
                devs[first[s + 1] + j].inputs.append(a)
    return devs


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_identical_devices_timed_once_exactly(schedule):
    import random

    from hetalloc.schedule import _timing, timing_classes
    rng = random.Random(3)
    for S, per, copies, M in [(3, 1, 4, 7), (4, 2, 3, 9), (2, 3, 5, 5)]:
        devs = _random_pipe(rng, S, per, copies)
        full = _timing(devs, S, M, schedule, False)
        fast = pipeline_timing(devs, S, M, schedule)
        assert fast.makespan_s == full.makespan_s and fast.finish_s == full.finish_s and fast.busy_s == full.busy_s
    # identical copies wired alike are one class; different durations are not
    devs = _random_pipe(rng, 2, 1, 4)
    assert len(timing_classes(devs)[1]) == 2
    devs[0].fwd_s += 1.0
    assert len(timing_classes(devs)[1]) > 2


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_long_schedule_extended_along_its_steady_state(schedule):
    import random

    from hetalloc.schedule import LONG_SCHEDULE, _timing
    rng = random.Random(5)
    devs = _random_pipe(rng, 4, 1, 1)  # four distinct stages
    M = LONG_SCHEDULE // len(devs) + 1000
    full = _timing(devs, 4, M, schedule, False)
    fast = pipeline_timing(devs, 4, M, schedule)
    assert fast.makespan_s == pytest.approx(full.makespan_s, rel=1e-9)
    assert fast.finish_s == pytest.approx(full.finish_s, rel=1e-9)
    assert fast.busy_s == pytest.approx(full.busy_s, rel=1e-9)


def test_warm_backward_only_right_after_its_own_forward():
    # 1F1B, 2 stages, 3 micro-batches: the last stage runs F k B k, warm each time; the
    # first stage's backwards follow another micro-batch's forward or backward (cold).
    # GPipe: only a single micro-batch's backward follows its forward.
    last = stage_op_order("1f1b", 1, 2, 3)
    assert [warm_backward(last, k) for k, (kind, _) in enumerate(last) if kind == "B"] == [True, True, True]
    first = stage_op_order("1f1b", 0, 2, 3)
    assert [warm_backward(first, k) for k, (kind, _) in enumerate(first) if kind == "B"] == [False, False, False]
    g = stage_op_order("gpipe", 0, 1, 2)
    assert [warm_backward(g, k) for k in range(4)] == [False, False, False, False]
    assert warm_backward(stage_op_order("gpipe", 0, 1, 1), 1)


def test_cold_backwards_take_their_own_time():
    # GPipe, 2 stages, 2 micro-batches; backwards 2 s warm, 3 s cold: every backward is
    # cold (each follows another op). Stage 1: F0 [1,2], F1 [2,3], B0 [3,6], B1 [6,9];
    # stage 0: B0 [6,9], B1 [9,12].
    devs = [PipeDevice("a", 0, 1.0, 2.0, [], [1], bwd_cold_s=3.0), PipeDevice("b", 1, 1.0, 2.0, [0], [], bwd_cold_s=3.0)]
    t = pipeline_timing(devs, 2, 2, "gpipe", record=True)
    ev = {(i, k, m): (s, e) for i, k, m, s, e in t.events}
    assert ev[(1, "B", 0)] == (3.0, 6.0) and ev[(1, "B", 1)] == (6.0, 9.0)
    assert ev[(0, "B", 0)] == (6.0, 9.0) and t.makespan_s == 12.0
    # 1F1B on the same: the last stage's backwards are warm (2 s), the first stage's cold.
    # b: F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]; a: F0 [0,1] F1 [1,2] B0 [4,7] B1 [7,10].
    t = pipeline_timing(devs, 2, 2, "1f1b", record=True)
    ev = {(i, k, m): (s, e) for i, k, m, s, e in t.events}
    assert ev[(1, "B", 0)] == (2.0, 4.0) and ev[(1, "B", 1)] == (5.0, 7.0)
    assert ev[(0, "B", 0)] == (4.0, 7.0) and ev[(0, "B", 1)] == (7.0, 10.0) and t.makespan_s == 10.0
