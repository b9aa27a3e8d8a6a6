"""The straggler monitor (runtime.monitor) on step times worked out by hand.

Three ranks, each predicted at 1.0 s of compute per step; warm-up 1 step, calibration 5
steps (c0 = the median of their ratios), levels the median of the last 3 ratios / c0,
K = 3 consecutive departing steps. A rank at 3.0 s from step S: its level is
median(1, 1, 3) = 1 at S, median(1, 3, 3) = 3 at S + 1, so it departs at S + 1, S + 2,
S + 3 and is reported at S + 3 (4 steps after the change) with level 3 (the median of
those steps' own ratios); back at 1.0 s from R, reported 'faster' at R + 3."""

from __future__ import annotations

import pytest

from runtime.monitor import MonitorConfig, StragglerMonitor

DEVICES = ["host/0", "host/1", "host/2"]


def feed(monitor: StragglerMonitor, rows: dict[int, list[float]], steps: int) -> list[tuple]:
    out = []
    for step in range(1, steps + 1):
        for e in monitor.observe(step, rows.get(step, [1.0, 1.0, 1.0])):
            out.append((e.step, e.rank, e.direction, round(e.level, 6), round(e.previous, 6)))
    return out


def slow(rank: int, factor: float, steps: range, rows: dict | None = None, base: float = 1.0) -> dict:
    rows = rows if rows is not None else {}
    for s in steps:
        row = rows.get(s, [base] * 3)
        row = list(row)
        row[rank] = base * factor
        rows[s] = row
    return rows


def test_a_rank_slowed_is_reported_four_steps_later_and_again_when_it_recovers():
    m = StragglerMonitor(MonitorConfig(), DEVICES, [1.0, 1.0, 1.0], ops_per_step=4)
    events = feed(m, slow(1, 3.0, range(20, 50)), 80)
    assert events == [(23, 1, "slower", 3.0, 1.0), (53, 1, "faster", 1.0, 3.0)]
    assert m.calibration == 1.0 and m.noise == 0.0 and m.threshold == 0.10


def test_predictions_scale_out_and_a_machine_wide_slowdown_is_no_straggler():
    # Predictions 10x too fast (an uncalibrated cost graph) and then every rank 1.5x
    # slower (a busy host): the peers move too, nobody is reported.
    m = StragglerMonitor(MonitorConfig(), DEVICES, [0.1, 0.1, 0.1])
    rows = {s: [1.5, 1.5, 1.5] for s in range(30, 60)}
    assert feed(m, rows, 80) == []
    assert m.calibration == pytest.approx(10.0)


def test_with_two_ranks_only_the_one_that_changed_is_reported():
    m = StragglerMonitor(MonitorConfig(), DEVICES[:2], [1.0, 1.0])
    events = []
    for step in range(1, 40):
        events += [(e.step, e.rank, e.direction) for e in m.observe(step, [1.0, 2.0 if step >= 20 else 1.0])]
    assert events == [(23, 1, "slower")]


def test_below_the_threshold_nothing_is_reported_and_k_sets_the_delay():
    m = StragglerMonitor(MonitorConfig(threshold=0.10), DEVICES, [1.0] * 3)
    assert feed(m, slow(0, 1.09, range(10, 40)), 40) == []
    m = StragglerMonitor(MonitorConfig(consecutive=1), DEVICES, [1.0] * 3)
    assert feed(m, slow(0, 1.5, range(10, 40)), 40) == [(11, 0, "slower", 1.5, 1.0)]


def test_the_threshold_rises_to_twice_the_measured_scatter():
    # Every rank cycles through 0.7, 1.0, 1.3 s, out of phase: at every step one rank has
    # each. Against the median of the other two: 0.7 / 1.15 = 0.609, 1.0 / 1.0 = 1, 1.3 /
    # 0.85 = 1.529; a rank's relative level (median of 3) stays 1, the deviations are
    # 0.391, 0, 0.529: median 0.391, noise 1.4826 x 0.391 = 0.580, threshold 1.16. Rank 2
    # at 1.5x from step 30 is no straggler. At 3x its relative ratios from step 30 are
    # 3.9 / 0.85 = 4.59, 2.1 / 1.15 = 1.83, 3.0 / 1.0 = 3.0, ...: its level is 1.83 at 31
    # (below 1 + 1.16), 3.0 at 32: departing at 32, 33, 34, reported at 34.
    def row(step: int, factor: float) -> list[float]:
        return [(0.7, 1.0, 1.3)[(step + k) % 3] * (factor if k == 2 else 1.0) for k in range(3)]

    noise = 1.4826 * (1 - 0.7 / 1.15)
    for factor, expected in ((1.5, []), (3.0, [(34, 2)])):
        m = StragglerMonitor(MonitorConfig(), DEVICES, [1.0] * 3)
        got = []
        for step in range(1, 60):
            got += [(e.step, e.rank) for e in m.observe(step, row(step, factor if step >= 30 else 1.0))]
            if step == 29:
                assert m.noise == pytest.approx(noise) and m.threshold == pytest.approx(2 * noise)
        assert got == expected


def test_a_layout_change_restarts_levels_after_a_warm_up():
    m = StragglerMonitor(MonitorConfig(), DEVICES, [1.0] * 3)
    assert feed(m, slow(2, 2.0, range(10, 100)), 20) == [(13, 2, "slower", 2.0, 1.0)]
    m.set_predicted([1.0, 1.0, 2.0])  # the new plan predicts rank 2's 2 s: as predicted again
    events = []
    for step in range(21, 40):
        events += m.observe(step, [1.0, 1.0, 2.0])
    assert events == [] and m.levels()["host/2"] == 1.0


def test_config_checks():
    for bad in (dict(threshold=0), dict(consecutive=0), dict(window=0), dict(calibration_steps=0),
                dict(warmup_steps=-1), dict(noise_factor=-1)):
        with pytest.raises(ValueError):
            MonitorConfig(**bad)
