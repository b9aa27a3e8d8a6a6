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
