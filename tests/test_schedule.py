"""Pipeline op orders and the exact timing recurrence."""

import pytest

from hetalloc.schedule import PipeDevice, flow_shop_time, pipeline_timing, stage_op_order


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
